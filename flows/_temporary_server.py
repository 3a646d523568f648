"""The temporary Prefect server of a command run with no server set up, started early.

Why: with no ``PREFECT_API_URL``, Prefect starts a temporary server the first
time a flow talks to its API. The command then first imports
``prefect.server`` (~3.5 s here, only to spawn it), then waits while the
subprocess imports the same and starts (~2-3 s more). Spawning that same
subprocess ourselves before Prefect is imported lets it start on another core
while this process imports Prefect and keepflow, and this process never
imports ``prefect.server`` at all: a no-change backup on the embedded default
measured 9.5-10.3 s before, see bench/RESULTS.md "Fixed cost".

What stays as Prefect's own: the command line (uvicorn with Prefect's
``create_app`` factory, ephemeral mode, no UI, bound to 127.0.0.1), the SQLite
database in ``PREFECT_HOME``, and the server stopped when the command exits
(an ``atexit`` handler, which runs after Prefect has drained its log and event
workers). The command then has ``PREFECT_API_URL`` pointing at it, and
``KEEPFLOW_TEMPORARY_API`` naming it, so keepflow still treats the run as one
on the embedded server (``flows._history.uses_temporary_server``: the run
registry records no API URL, and the command waits until the run's history
is recorded before the server stops).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from keepflow.tasks.core.errors import KeepflowError

ENV = "KEEPFLOW_TEMPORARY_API"
_process: subprocess.Popen | None = None
_log: Path | None = None


def started() -> bool:
    return _process is not None


def pid() -> int | None:
    """The temporary server's process (for the run registry: a killed command's server is stopped later)."""
    return _process.pid if _process is not None and _process.poll() is None else None


def start() -> str:
    """Spawn the temporary server now; returns its API URL (set as PREFECT_API_URL for this process)."""
    global _process, _log
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise KeepflowError("Prefect is not installed in this environment; pip install keepflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    _log = home / "keepflow" / "temporary-server.log"
    _log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(_log, "wb") as log:
        _process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url
    os.environ[ENV] = url
    return url


def wait_ready(timeout: float | None = None) -> None:
    """Block until the server answers /api/health (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``)."""
    if _process is None:
        return
    limit = timeout if timeout is not None else float(
        os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 90)
    url = os.environ[ENV] + "/health"
    deadline = time.monotonic() + limit
    while True:
        if _process.poll() is not None:
            raise KeepflowError(f"Prefect's temporary server exited with code {_process.returncode} before it "
                                f"answered (its output: {_log}); run the command again, or keep a server "
                                "running with `keepflow server start`")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise KeepflowError(f"Prefect's temporary server did not answer within {limit:g} s (its output: "
                                f"{_log}); keep a server running with `keepflow server start`")
        time.sleep(0.05)


def stop() -> None:
    global _process
    proc, _process = _process, None
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
