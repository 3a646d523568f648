"""The warm process: commands forked from a process that has already imported Prefect.

Why: importing Prefect and the flow modules is most of a command's fixed
cost, paid again by every command (3.6 s here on 2026-12-03; with this, a
no-change backup of 20 files on the persistent server went from 3.26 to
1.47 s: bench/RESULTS.md, "The warm process").
``keepflow server start`` therefore also starts one warm process
(``warm_process.serve()``): it imports Prefect and the flows
once, with the environment a command would give them, checks that it runs
no thread (a fork copies only the calling thread), and listens on a Unix
socket, ``$PREFECT_HOME/keepflow/warm.sock`` (mode 0600, peers of another
user refused).

A command (``console``, before anything heavy is imported) sends its
arguments, environment and working directory and passes its own stdin,
stdout and stderr (SCM_RIGHTS); the warm process forks a child that takes
them over (so progress bars, pipes and ``--json`` behave as in a process of
its own), runs the command as ``console`` would, and reports the exit code
back over the socket. The command forwards SIGINT, SIGTERM and SIGHUP to the
child; a child whose command went away gets SIGINT (Ctrl-C semantics: the
run ends, its lease is released). Nothing of the command is kept by the warm
process: no key, no password (the environment goes to the child only), no
log of it beyond one line per command (its name, never its arguments).

The warm process declines (the command then runs in its own process as
before, nothing having started) when the command's Prefect-relevant
environment (``PREFECT_*``, ``DO_NOT_TRACK``, ``KEEPFLOW_BATCH_PROCESSES``,
after the defaults ``startup.prepare_prefect`` applies) differs from the one
it imported with, and it exits when keepflow's or Prefect's installed code
changed since it started (stat of the source files per request, ~1 ms), so
it never runs stale code. Commands that may prompt (a terminal on stdin and
no password given), ``--verbose`` ones (Prefect's console logging is set at
import) and ``server``, ``serve`` and ``key`` never go to it.
``KEEPFLOW_WARM=0`` keeps every command in its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from keepflow.flows.cli import server

ENV = "KEEPFLOW_WARM"
NEVER = {"server", "serve", "key"}
PASSWORD_SOURCES = ("KEEPFLOW_PASSWORD", "KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND")
PRELOAD = ["prefect", "prefect.flow_engine", "prefect.task_engine", "prefect.client.orchestration",
           "keepflow.flows.backup", "keepflow.flows.restore", "keepflow.flows.verify",
           "keepflow.flows.prune", "keepflow.flows.replicate", "keepflow.flows.repair",
           "keepflow.flows._history", "keepflow.flows._progress"]
START_TIMEOUT = 60.0


def socket_path() -> Path:
    return server.prefect_home() / "keepflow" / "warm.sock"


def log_path() -> Path:
    return socket_path().with_name("warm.log")


# -- the command's side -----------------------------------------------------------------------

def may_take(args) -> bool:
    """Could this parsed command run in the warm process?"""
    if os.environ.get(ENV, "").strip() == "0" or args.command in NEVER:
        return False
    if getattr(args, "verbose", False):
        return False
    might_prompt = os.isatty(0) and not getattr(args, "password_file", None) \
        and not any(os.environ.get(name) for name in PASSWORD_SOURCES)
    return not might_prompt and socket_path().exists()


def delegate(argv: list[str], command: str) -> int | None:
    """Run ``argv`` (the subcommand ``command``) in the warm process; its exit code, or None when it
    declined or is not there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(socket_path()))
        request = json.dumps({"argv": argv, "command": command, "env": dict(os.environ),
                              "cwd": os.getcwd()}).encode()
        socket.send_fds(sock, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        reader = sock.makefile("rb")
        first = _message(reader)
    except (OSError, ValueError):
        sock.close()
        return None
    if first is None or "pid" not in first:
        sock.close()
        return None                         # declined: nothing ran, the command runs here
    pid = int(first["pid"])
    sock.settimeout(None)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            last = _message(reader)
            break
        except InterruptedError:
            continue
        except (OSError, ValueError):
            last = None
            break
    if last is None or "exit" not in last:
        print("keepflow: error: the command's process in the warm process ended without an exit code "
              f"(see {log_path()}); run it again, or with KEEPFLOW_WARM=0", file=sys.stderr)
        return 1
    return int(last["exit"])


def _message(reader) -> dict | None:
    line = reader.readline()
    return json.loads(line) if line else None



# -- started and stopped by `keepflow server` ---------------------------------------------------

def start(api_url: str, env: dict[str, str] | None = None) -> bool:
    """Start the warm process for the server at ``api_url``; True once it listens (False: commands run as before).

    ``env``: the environment it imports with (default: this process's); commands whose Prefect
    environment differs from it run in their own process.
    """
    import subprocess

    if os.environ.get(ENV, "").strip() == "0":
        return False
    stop()
    path = socket_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env, PREFECT_API_URL=api_url)
    with open(log_path(), "ab") as log:
        # -P and cwd "/": the keepflow this command runs, never a `keepflow/` folder where it was started.
        proc = subprocess.Popen([sys.executable, "-P", "-c", "import sys; from keepflow.flows.cli import warm_process; "
                                 "sys.exit(warm_process.serve())"], env=env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, close_fds=True)
    state_path().write_text(json.dumps({"pid": proc.pid, "api_url": api_url}) + "\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if running():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def state_path() -> Path:
    """``{"pid", "api_url"}`` of the warm process ``start`` started."""
    return socket_path().with_name("warm.json")


def serving() -> str | None:
    """The Prefect API URL the running warm process imported with, or None when none listens."""
    try:
        api_url = json.loads(state_path().read_text())["api_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return api_url if running() else None


def running() -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(str(socket_path()))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def stop() -> None:
    """End the warm process, if one runs (its children, running commands, finish)."""
    pid_file = state_path()
    try:
        pid = int(json.loads(pid_file.read_text())["pid"])
        if b"warm_process.serve()" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            raise ValueError("another process has that pid now")
    except (OSError, ValueError, KeyError, TypeError):
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.05)
    except OSError:
        pass
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()

