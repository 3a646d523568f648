"""Where a repository's password comes from (ARCHITECTURE.md, "### Keys and passwords").

``get_password(url)`` returns the password from the first source that is set:

1. a password set in this process with ``use_password`` / ``use_password_file``
   (the CLI's ``--password-file``; a flow that resolved its ``password``
   parameter, a Prefect ``Secret`` block, see flows/_password.py);
2. ``KEEPFLOW_PASSWORD``;
3. ``KEEPFLOW_PASSWORD_FILE``: the file's first line, without its line ending;
4. ``KEEPFLOW_PASSWORD_COMMAND``: run without a shell (``shlex.split``), the
   first line it prints on stdout;
5. a prompt on the terminal, when stdin is one (twice with ``confirm=True``).

None of them: ``PasswordMissingError``. An environment variable set to the
empty string counts as not set. An empty password is never returned: no key
file can be made with one, so an empty file, an empty command output or an
empty answer at the prompt is an error rather than a later "wrong password".

The password never reaches a log line, a print or an exception message (the
command's output is never quoted either: it may be the password). Pure Python,
no Prefect: the read-only CLI commands and keepflow.tasks.core.keyring use it.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
import threading

from keepflow.tasks.core.errors import PasswordMissingError, PasswordSourceError

ENV_PASSWORD = "KEEPFLOW_PASSWORD"
ENV_PASSWORD_FILE = "KEEPFLOW_PASSWORD_FILE"
ENV_PASSWORD_COMMAND = "KEEPFLOW_PASSWORD_COMMAND"

COMMAND_TIMEOUT = 60.0     # seconds KEEPFLOW_PASSWORD_COMMAND may take (tests shorten it)

_lock = threading.Lock()
_password: str | None = None
_asked: dict[tuple[str, str], str] = {}     # what a command or the prompt gave, per command / repository


def use_password(value: str | None) -> None:
    """Use ``value`` as the password in this process, ahead of every other source; None forgets it."""
    global _password
    if value is not None:
        if not isinstance(value, str):
            raise TypeError(f"a password is a str, not {type(value).__name__}")
        if value == "":
            raise ValueError("an empty password cannot open any key file")
    with _lock:
        _password = value


def use_password_file(path: str, *, origin: str = "--password-file") -> None:
    """Read the password from ``path`` now (its first line, as KEEPFLOW_PASSWORD_FILE) and use it.

    ``origin`` names the option in error messages.
    """
    use_password(_read_password_file(os.fspath(path), origin))


def clear() -> None:
    """Forget a password set with ``use_password``/``use_password_file``, and what commands and prompts gave."""
    use_password(None)
    with _lock:
        _asked.clear()


def password_in_process() -> str | None:
    """The password set in this process (``use_password``, or a source already asked), else None.

    For handing it on to processes this one starts (flows/_dask.py: a local
    cluster's workers), which cannot see it otherwise.
    """
    with _lock:
        return _password


def get_password(repo_url: str, *, confirm: bool = False, interactive: bool = True) -> str:
    """The password for ``repo_url`` from the first source that is set (see the module docstring).

    ``confirm=True`` (init, a new key) asks twice at the terminal and refuses a
    mismatch. Raises PasswordMissingError when no source is set, and
    PasswordSourceError when the source that is set fails. ``interactive=False``
    (a background thread) raises PasswordMissingError instead of prompting.
    """
    with _lock:
        value = _password
    if value is not None:
        return value
    value = os.environ.get(ENV_PASSWORD)
    if value:
        return value
    path = os.environ.get(ENV_PASSWORD_FILE)
    if path:
        return _read_password_file(path, ENV_PASSWORD_FILE)
    command = os.environ.get(ENV_PASSWORD_COMMAND, "")
    if command.strip():
        key = ("command", command)
    elif _stdin_is_a_tty() and interactive:
        key = ("prompt", repo_url)
    else:
        raise PasswordMissingError(url=repo_url)
    # Asked once per process and source: a command that opens the repository
    # twice (or a key command that checks which key the password opens) does not
    # run the password command or prompt again. Kept apart from use_password, so
    # the order of the sources above still holds.
    with _lock:
        value = _asked.get(key)
    if value is None:
        value = _run_password_command(command) if key[0] == "command" else _prompt(repo_url, confirm)
        with _lock:
            _asked[key] = value
    return value


def read_password_file(path: str, *, origin: str) -> str:
    """The password in ``path`` (its first line), without using it; ``origin`` names the option."""
    return _read_password_file(os.fspath(path), origin)


def prompt_new(label: str) -> str:
    """Ask twice on the terminal for a new password (``label`` says for what)."""
    source = "the terminal"
    try:
        password = getpass.getpass(f"{label}: ")
        if not password:
            raise PasswordSourceError(source=source, reason="an empty password was entered")
        if getpass.getpass(f"{label} (again): ") != password:
            raise PasswordSourceError(source=source, reason="the two passwords entered do not match")
    except EOFError:
        raise PasswordSourceError(source=source, reason="no password was entered (end of input)") from None
    return password


def password_sources_described() -> str:
    """One paragraph for help texts: every way to give the password, in order of precedence."""
    return (
        "The repository password comes from the first of: --password-file FILE; "
        f"{ENV_PASSWORD}; {ENV_PASSWORD_FILE} (a file whose first line is the password); "
        f"{ENV_PASSWORD_COMMAND} (a command, run without a shell, whose first line of output "
        f"is the password; {COMMAND_TIMEOUT:g} s at most); a prompt when run from a terminal "
        "(asked twice at init). A flow takes password='secret/NAME', a Prefect Secret block; "
        "left empty, the flow uses the same environment variables."
    )


def _first_line(text: str) -> str:
    """Up to the first line ending, without it: ``\\n``, ``\\r\\n`` or a trailing ``\\r``."""
    line = text.split("\n", 1)[0]
    return line[:-1] if line.endswith("\r") else line


def _read_password_file(path: str, origin: str) -> str:
    source = f"{origin} ({path})"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PasswordSourceError(source=source,
                                  reason=f"cannot read the file: {exc.strerror or type(exc).__name__}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordSourceError(source=source, reason="the file is not UTF-8 text") from None
    password = _first_line(text)
    if not password:
        raise PasswordSourceError(source=source, reason="the first line of the file is empty")
    return password


def _run_password_command(command: str) -> str:
    source = ENV_PASSWORD_COMMAND
    try:
        argv = shlex.split(command)
    except ValueError as exc:                       # shlex's message quotes nothing of the command
        raise PasswordSourceError(source=source, reason=f"cannot split the command: {exc}") from None
    try:
        # stdin and stderr are the caller's, so a password manager can ask and complain.
        proc = subprocess.run(argv, stdout=subprocess.PIPE, timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise PasswordSourceError(source=source,
                                  reason=f"the command did not finish within {COMMAND_TIMEOUT:g} s") from None
    except OSError as exc:
        raise PasswordSourceError(source=source,
                                  reason=f"cannot run {argv[0]!r}: {exc.strerror or type(exc).__name__}") from None
    if proc.returncode != 0:
        raise PasswordSourceError(source=source,
                                  reason=f"the command failed with exit code {proc.returncode}")
    try:
        text = proc.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordSourceError(source=source, reason="the command's output is not UTF-8 text "
                                  "(exit code 0)") from None
    password = _first_line(text)
    if not password:
        raise PasswordSourceError(source=source,
                                  reason="the command printed an empty first line (exit code 0)")
    return password


def _stdin_is_a_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):                   # closed or detached stdin
        return False


def _prompt(repo_url: str, confirm: bool) -> str:
    source = "the terminal"
    try:
        password = getpass.getpass(f"password for {repo_url}: ")
        if not password:
            raise PasswordSourceError(source=source, reason="an empty password was entered")
        if confirm and getpass.getpass(f"password for {repo_url} (again): ") != password:
            raise PasswordSourceError(source=source, reason="the two passwords entered do not match")
    except EOFError:
        raise PasswordSourceError(source=source, reason="no password was entered (end of input)") from None
    return password
