"""Password sources (tasks/core/passwords.py) and the flows' Secret-block parameter (flows/_password.py).

Everything is real: files in tmp_path, commands run as processes, the prompt
on a pseudo-terminal (pty.fork: the child has it as its controlling terminal,
so getpass reads /dev/tty as it would in a shell), Secret blocks on the
session's Prefect test server.
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keepflow.tasks.core import passwords
from keepflow.tasks.core.errors import (
    EXIT_NO_REPO,
    EXIT_USAGE,
    PasswordMissingError,
    PasswordSourceError,
    UsageError,
    WrongPasswordError,
)
from keepflow.tasks.core.passwords import get_password, use_password, use_password_file

ROOT = Path(__file__).resolve().parent.parent
URL = "s3://bucket/kf-repo"
ENV_VARS = ("KEEPFLOW_PASSWORD", "KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND")


@pytest.fixture(autouse=True)
def no_sources(monkeypatch):
    """Every test starts with no source set and stdin not a terminal, and leaves none set."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    passwords.clear()
    yield
    passwords.clear()


def _source_error(excinfo) -> str:
    assert excinfo.value.exit_code == EXIT_NO_REPO
    return str(excinfo.value)


# -- precedence ---------------------------------------------------------------------------------------------

def test_each_source_in_order_of_precedence(tmp_path, monkeypatch):
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    use_password("from-process")
    monkeypatch.setenv("KEEPFLOW_PASSWORD", "from-env")
    monkeypatch.setenv("KEEPFLOW_PASSWORD_FILE", str(pw_file))
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "printf 'from-command\\n'")

    assert get_password(URL) == "from-process"
    passwords.clear()
    assert get_password(URL) == "from-env"
    monkeypatch.delenv("KEEPFLOW_PASSWORD")
    assert get_password(URL) == "from-file"
    monkeypatch.delenv("KEEPFLOW_PASSWORD_FILE")
    assert get_password(URL) == "from-command"
    monkeypatch.delenv("KEEPFLOW_PASSWORD_COMMAND")
    with pytest.raises(PasswordMissingError):
        get_password(URL)


def test_a_source_that_is_set_but_fails_does_not_fall_through(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPFLOW_PASSWORD_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "printf 'from-command'")
    with pytest.raises(PasswordSourceError):
        get_password(URL)


def test_empty_environment_variables_count_as_unset(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "   ")
    with pytest.raises(PasswordMissingError):
        get_password(URL)


def test_use_password_none_forgets_and_empty_is_refused():
    use_password("p1")
    assert get_password(URL) == "p1"
    use_password(None)
    with pytest.raises(PasswordMissingError):
        get_password(URL)
    with pytest.raises(ValueError):
        use_password("")
    with pytest.raises(TypeError):
        use_password(b"bytes")


# -- file ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (b"hunter2\n", "hunter2"),
    (b"hunter2", "hunter2"),
    (b"hunter2\r\n", "hunter2"),
    (b"hunter2\r", "hunter2"),
    (b"hunter2\n\n", "hunter2"),              # exactly one line ending, and only the first line
    (b"hunter2\r\r\n", "hunter2\r"),          # exactly one line ending
    (b"first\nsecond\n", "first"),
    (b"first\r\nsecond", "first"),
    (b"  spaced out \t\n", "  spaced out \t"),  # other whitespace is part of the password
    ("pässwörd ✓\n".encode(), "pässwörd ✓"),
])
def test_file_source_first_line_without_its_line_ending(tmp_path, monkeypatch, content, expected):
    path = tmp_path / "pw"
    path.write_bytes(content)
    monkeypatch.setenv("KEEPFLOW_PASSWORD_FILE", str(path))
    assert get_password(URL) == expected


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "cannot read"),                         # missing
    (lambda p: p.mkdir(), "cannot read"),                    # unreadable (a directory; chmod does not stop root)
    (lambda p: p.write_bytes(b"\nsecond-line-secret\n"), "empty"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"\xffnot-utf8-secret\n"), "UTF-8"),
])
def test_file_source_errors_name_the_variable_and_the_file(tmp_path, monkeypatch, make, reason):
    path = tmp_path / "pw"
    make(path)
    monkeypatch.setenv("KEEPFLOW_PASSWORD_FILE", str(path))
    with pytest.raises(PasswordSourceError) as excinfo:
        get_password(URL)
    message = _source_error(excinfo)
    assert "KEEPFLOW_PASSWORD_FILE" in message and str(path) in message and reason in message
    assert "secret" not in message


def test_use_password_file_reads_now_and_its_errors_name_the_option(tmp_path, monkeypatch):
    path = tmp_path / "pw"
    path.write_text("cli-password\nnext\n")
    monkeypatch.setenv("KEEPFLOW_PASSWORD", "from-env")
    use_password_file(path)
    path.write_text("changed later\n")
    assert get_password(URL) == "cli-password"
    with pytest.raises(PasswordSourceError) as excinfo:
        use_password_file(tmp_path / "absent")
    message = _source_error(excinfo)
    assert "--password-file" in message and str(tmp_path / "absent") in message
    assert get_password(URL) == "cli-password"          # a failed read leaves the password set before


# -- command ------------------------------------------------------------------------------------------------

def test_command_source_real_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "printf 'cmd pw\\nsecond line\\n'")
    assert get_password(URL) == "cmd pw"
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "/bin/sh -c \"printf 'via sh\\r\\n'\"")
    assert get_password(URL) == "via sh"
    # No shell: $HOME and ';' reach echo as they are.
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "echo '$HOME;' x")
    assert get_password(URL) == "$HOME; x"
    # A script in a directory whose name needs quoting, reading an argument.
    folder = tmp_path / "with space"
    folder.mkdir()
    script = folder / "pw.sh"
    script.write_text("#!/bin/sh\necho \"script-$1\"\necho ignored\n")
    script.chmod(0o755)
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", f"'{script}' arg")
    assert get_password(URL) == "script-arg"


@pytest.mark.parametrize("command, reason", [
    ("/bin/sh -c 'echo leaked-secret; exit 3'", "exit code 3"),
    ("/bin/sh -c 'echo leaked-secret >&2; exit 1'", "exit code 1"),
    ("true", "empty"),
    ("/bin/sh -c 'echo; echo leaked-secret'", "empty"),
    ("/bin/sh -c \"printf '\\377leaked-secret'\"", "UTF-8"),
    ("/nonexistent/kf-no-such-program", "kf-no-such-program"),
    ("printf 'unbalanced", "cannot split"),
])
def test_command_source_failures(monkeypatch, command, reason):
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", command)
    with pytest.raises(PasswordSourceError) as excinfo:
        get_password(URL)
    message = _source_error(excinfo)
    assert "KEEPFLOW_PASSWORD_COMMAND" in message and reason in message
    assert "leaked-secret" not in message                  # never the output


def test_command_source_timeout(monkeypatch):
    monkeypatch.setattr(passwords, "COMMAND_TIMEOUT", 0.5)
    monkeypatch.setenv("KEEPFLOW_PASSWORD_COMMAND", "sleep 30")
    started = time.monotonic()
    with pytest.raises(PasswordSourceError) as excinfo:
        get_password(URL)
    assert time.monotonic() - started < 10
    message = _source_error(excinfo)
    assert "KEEPFLOW_PASSWORD_COMMAND" in message and "0.5 s" in message


def test_default_command_timeout_is_60_seconds():
    assert passwords.COMMAND_TIMEOUT == 60


# -- nothing set --------------------------------------------------------------------------------------------

def test_missing_names_the_repository_and_every_source_and_no_password(monkeypatch):
    use_password("stale-password-1")
    passwords.clear()
    monkeypatch.setenv("KEEPFLOW_PASSWORD", "")
    with pytest.raises(PasswordMissingError) as excinfo:
        get_password(URL)
    message = _source_error(excinfo)
    assert URL in message
    for way in (*ENV_VARS, "--password-file", "terminal", "secret/NAME"):
        assert way in message
    assert "stale-password-1" not in message
    assert "\n" not in message


def test_no_stdin_at_all_is_missing_not_a_crash(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(PasswordMissingError):
        get_password(URL)


def test_error_classes_exit_10_and_wrong_password_message():
    message = str(WrongPasswordError(url=URL))
    assert message.startswith(f"wrong password for {URL}: no key file in keys/ opens with it; ")
    for cls in (PasswordMissingError, WrongPasswordError, PasswordSourceError):
        assert cls.exit_code == EXIT_NO_REPO


def test_sources_described_for_help_texts():
    text = passwords.password_sources_described()
    for way in (*ENV_VARS, "--password-file", "terminal", "secret/NAME", "Secret block"):
        assert way in text
    # Listed in order of precedence.
    positions = [text.index(w) for w in ("--password-file", "KEEPFLOW_PASSWORD;", "KEEPFLOW_PASSWORD_FILE",
                                         "KEEPFLOW_PASSWORD_COMMAND", "terminal")]
    assert positions == sorted(positions)


def test_passwords_module_does_not_import_prefect():
    code = ("import sys, keepflow.tasks.core.passwords; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- the terminal prompt, on a real pseudo-terminal ---------------------------------------------------------

_CHILD = """
import sys
sys.path.insert(0, {root!r})
from keepflow.tasks.core.errors import KeepflowError
from keepflow.tasks.core.passwords import get_password
try:
    pw = get_password({url!r}, confirm={confirm!r})
    print("RESULT", pw.encode().hex(), flush=True)
except KeepflowError as exc:
    print("ERROR", exc.exit_code, exc, flush=True)
"""


class _Terminal:
    """A child Python whose controlling terminal is a fresh pty; we type at its master side."""

    def __init__(self, confirm: bool):
        code = _CHILD.format(root=str(ROOT), url=URL, confirm=confirm)
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        pid, fd = pty.fork()
        if pid == 0:                                           # the child: exec at once
            try:
                os.execve(sys.executable, [sys.executable, "-c", code], env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.transcript = pid, fd, b""

    def read_until(self, marker: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.transcript:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} on the terminal; saw {self.transcript!r}"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:                                 # EIO: the child closed its side
                    chunk = b""
                assert chunk, f"terminal closed before {marker!r}; saw {self.transcript!r}"
                self.transcript += chunk

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def finish(self) -> str:
        """The child's last line, RESULT or ERROR, after it exited."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.transcript += chunk
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, self.transcript
        lines = [ln for ln in self.transcript.decode().splitlines() if ln.startswith(("RESULT", "ERROR"))]
        assert len(lines) == 1, self.transcript
        return lines[0]


PROMPT = f"password for {URL}: ".encode()
AGAIN = f"password for {URL} (again): ".encode()


def test_terminal_prompt_returns_the_typed_password_without_echo():
    term = _Terminal(confirm=False)
    term.read_until(PROMPT)
    term.type("typed pässword\r")
    line = term.finish()
    assert line == "RESULT " + "typed pässword".encode().hex()
    assert "typed pässword".encode() not in term.transcript     # not echoed
    assert AGAIN not in term.transcript                         # asked once


def test_terminal_prompt_confirm_asks_twice():
    term = _Terminal(confirm=True)
    term.read_until(PROMPT)
    term.type("new-password\n")
    term.read_until(AGAIN)
    term.type("new-password\n")
    assert term.finish() == "RESULT " + b"new-password".hex()


def test_terminal_prompt_confirm_mismatch_is_refused():
    term = _Terminal(confirm=True)
    term.read_until(PROMPT)
    term.type("first-attempt\n")
    term.read_until(AGAIN)
    term.type("second-attempt\n")
    line = term.finish()
    assert line.startswith(f"ERROR {EXIT_NO_REPO} ") and "do not match" in line
    assert "first-attempt" not in line and "second-attempt" not in line


@pytest.mark.parametrize("confirm", [True, False])
def test_terminal_prompt_refuses_an_empty_password(confirm):
    term = _Terminal(confirm=confirm)
    term.read_until(PROMPT)
    term.type("\n")
    line = term.finish()
    assert line.startswith(f"ERROR {EXIT_NO_REPO} ") and "empty" in line
    assert AGAIN not in term.transcript


def test_a_source_that_is_set_wins_over_the_terminal(tmp_path):
    """With KEEPFLOW_PASSWORD_FILE set, a terminal child is not asked."""
    path = tmp_path / "pw"
    path.write_text("file-wins\n")
    code = _CHILD.format(root=str(ROOT), url=URL, confirm=True)
    pid, fd = pty.fork()
    if pid == 0:
        try:
            env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
            env["KEEPFLOW_PASSWORD_FILE"] = str(path)
            os.execve(sys.executable, [sys.executable, "-c", code], env)
        finally:
            os._exit(127)
    term = _Terminal.__new__(_Terminal)
    term.pid, term.fd, term.transcript = pid, fd, b""
    assert term.finish() == "RESULT " + b"file-wins".hex()
    assert PROMPT not in term.transcript


# -- the flows' password parameter: Secret blocks on a real Prefect API -------------------------------------

def test_secret_block_becomes_the_password(prefect_api_url, monkeypatch):
    from prefect.blocks.system import Secret

    from keepflow.flows._password import resolve_password_param

    Secret(value="block-password ✓").save("kf-test-password", overwrite=True, _sync=True)
    monkeypatch.setenv("KEEPFLOW_PASSWORD", "from-env")
    resolve_password_param("secret/kf-test-password")
    assert get_password(URL) == "block-password ✓"          # ahead of the environment
    resolve_password_param(None)                             # None leaves it in place
    assert get_password(URL) == "block-password ✓"


@pytest.mark.parametrize("value", ["12345", '"quoted"', "null", '{"a": 1}', "with\nnewline"])
def test_secret_block_value_is_taken_exactly_not_parsed_as_json(prefect_api_url, value):
    from prefect.blocks.system import Secret

    from keepflow.flows._password import resolve_password_param

    Secret(value=value).save("kf-test-password-exact", overwrite=True, _sync=True)
    resolve_password_param("secret/kf-test-password-exact")
    assert get_password(URL) == value


def test_secret_block_holding_no_string_is_refused(prefect_api_url):
    from prefect.blocks.system import Secret

    from keepflow.flows._password import resolve_password_param

    Secret(value={"password": "in-a-dict-secret"}).save("kf-test-password-dict", overwrite=True, _sync=True)
    with pytest.raises(PasswordSourceError) as excinfo:
        resolve_password_param("secret/kf-test-password-dict")
    message = _source_error(excinfo)
    assert "kf-test-password-dict" in message and "in-a-dict-secret" not in message
    with pytest.raises(PasswordMissingError):
        get_password(URL)


def test_missing_secret_block_is_one_line_naming_it_and_how_to_create_it(prefect_api_url):
    from keepflow.flows._password import resolve_password_param

    with pytest.raises(PasswordSourceError) as excinfo:
        resolve_password_param("secret/kf-no-such-block")
    message = _source_error(excinfo)
    assert "kf-no-such-block" in message
    assert "prefect block create secret" in message and "Secret(value=...).save('kf-no-such-block')" in message
    assert "\n" not in message
    with pytest.raises(PasswordMissingError):
        get_password(URL)


@pytest.mark.parametrize("given", ["plain text", "secret/", "Secret/kf-test-password", "json/x", ""])
def test_a_plain_password_parameter_is_refused_without_repeating_it(given, monkeypatch):
    """Refused with exit 2; the message never repeats what was given ("secret/" is in the help anyway)."""
    from keepflow.flows._password import resolve_password_param

    monkeypatch.setenv("KEEPFLOW_PASSWORD", "from-env")
    with pytest.raises(UsageError) as excinfo:
        resolve_password_param(given)
    assert excinfo.value.exit_code == EXIT_USAGE
    message = str(excinfo.value)
    assert "Secret block" in message and "secret/NAME" in message and "parameters" in message
    if given not in ("", "secret/"):
        assert given not in message
    assert "\n" not in message
    assert get_password(URL) == "from-env"                   # nothing was set


def test_a_non_string_password_parameter_is_refused():
    from keepflow.flows._password import resolve_password_param

    with pytest.raises(UsageError) as excinfo:
        resolve_password_param({"value": "dict-secret"})
    assert "dict-secret" not in str(excinfo.value)
