"""The warm process itself (flows/cli/warm.py says what it is for and how commands reach it).

``serve`` imports Prefect and the flows once, then forks one child per
command; ``_child`` turns a child into that command (its fds, environment,
cwd and argv), runs it as the console script would and reports its exit code.
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

from keepflow.flows.cli.warm import PRELOAD, socket_path


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def relevant_environment(env: dict[str, str]) -> dict[str, str]:
    """What of ``env`` Prefect and the flow modules read at import, after prepare_prefect's defaults
    (with no ``PREFECT_API_URL``: the active Prefect profile's, else the persistent server's if it
    runs, as ``use_running_server`` decides)."""
    from keepflow.flows.cli import server, startup

    env = {**startup.PREFECT_DEFAULTS, **startup.QUIET_CONSOLE, server.VERSION_CHECK: "false", **env}
    if not env.get("PREFECT_API_URL"):
        env["PREFECT_API_URL"] = server.profile_api_url() or server.api_url_if_running() or ""
    return {k: v for k, v in env.items()
            if k.startswith("PREFECT_") or k in ("DO_NOT_TRACK", "KEEPFLOW_BATCH_PROCESSES")}


def code_fingerprint() -> tuple:
    """Size and mtime of every installed source file of keepflow, Prefect's build info and its profiles file."""
    import importlib.util

    import keepflow
    from keepflow import flows, tasks

    seen = []
    for folder in [*keepflow.__path__, *flows.__path__, *tasks.__path__]:
        for path in sorted(Path(folder).rglob("*.py")):
            try:
                st = path.stat()
            except OSError:
                continue
            seen.append((str(path), st.st_size, st.st_mtime_ns))
    from keepflow.flows.cli import server

    with contextlib.suppress(OSError):       # Prefect reads its profile at import: a changed one is stale too
        profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or server.prefect_home() / "profiles.toml")
        st = profiles.stat()
        seen.append(("profiles", st.st_size, st.st_mtime_ns))
    spec = importlib.util.find_spec("prefect")
    if spec and spec.origin:
        st = (Path(spec.origin).parent / "_build_info.py").stat()
        seen.append(("prefect", st.st_size, st.st_mtime_ns))
    return tuple(seen)


def serve() -> int:
    """The warm process's main loop."""
    # numpy's OpenBLAS would start a thread pool at import; keepflow does no linear algebra.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from keepflow.flows.cli import startup
    from keepflow.tasks.core.pandas_probe import skip_pyarrow_pandas_probe

    skip_pyarrow_pandas_probe()
    startup.prepare_prefect(verbose=False)
    api_url = os.environ.get("PREFECT_API_URL")
    imported_with = relevant_environment(dict(os.environ))
    import importlib

    with startup.importing():
        for name in PRELOAD:
            importlib.import_module(name)
    others = _other_threads()
    if others:
        _log(f"not serving: threads {others} run after the imports (a fork would copy only this one)")
        return 1
    fingerprint = code_fingerprint()
    path = socket_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    bound = os.stat(path).st_ino          # a later warm process's socket at the same path is not ours to remove
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)       # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stop(_signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    _log(f"serving on {path} (pid {os.getpid()}, Prefect API {api_url})")
    try:
        while True:
            conn, _ = listener.accept()
            reason = _serve_one(conn, listener, imported_with, fingerprint)
            if reason == "stale":
                _log("keepflow's or Prefect's code changed since the start: exiting")
                return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == bound:
                path.unlink()
        listener.close()


# Commands that never import Prefect nor a flow module: any Prefect environment is theirs to have.
NO_PREFECT = {"init", "snapshots", "ls", "diff", "replicas", "stats"}


def _other_threads() -> list[str]:
    """Threads besides this one, but jemalloc's purging thread (pyarrow's allocator, fork-safe: it
    takes its locks around a fork and the child starts its own)."""
    import threading

    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        native = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    except OSError:
        return names
    return names + [n for n in native if n != "jemalloc_bg_thd"][1:]


def _serve_one(conn, listener, imported_with, fingerprint) -> str | None:
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        conn.settimeout(5.0)
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
        if not data:
            return None                      # `running()` only connects
        (size,) = struct.unpack("!I", data[:4])
        body = data[4:]
        while len(body) < size:
            more = conn.recv(size - len(body))
            if not more:
                raise ConnectionError("the command went away")
            body += more
        request = json.loads(body)
        if uid != os.getuid() or len(fds) != 3:
            _send(conn, {"declined": "another user" if uid != os.getuid() else "no standard streams"})
            return None
        if code_fingerprint() != fingerprint:
            _send(conn, {"declined": "stale"})
            return "stale"
        command = request["command"]
        theirs = imported_with if command in NO_PREFECT else relevant_environment(request["env"])
        if theirs != imported_with:
            names = sorted(k for k in theirs.keys() | imported_with.keys() if theirs.get(k) != imported_with.get(k))
            _send(conn, {"declined": "environment"})
            _log(f"declined {command}: Prefect's environment differs from the one imported with "
                 f"({', '.join(names)})")          # names only: a value may be a credential
            return None
        pid = os.fork()
        if pid == 0:
            listener.close()
            _child(conn, fds, request)       # never returns
        _log(f"{command} in pid {pid}")
        return None
    except (OSError, ValueError, KeyError, struct.error) as exc:
        _log(f"a request failed: {type(exc).__name__}")
        return None
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    code = 1
    try:
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["keepflow", *request["argv"]]
        import random

        random.seed()
        # Prefect's settings see this environment once the command's prepare_prefect has set it up
        # (startup.py); commands that never call it never use Prefect.
        conn.settimeout(None)
        _send(conn, {"pid": os.getpid()})
        _watch_command(conn)
        from keepflow.flows.cli import main, shut_down

        code = shut_down(main(request["argv"]), exit_process=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:             # noqa: BLE001 - the child must report and exit, whatever happened
        try:
            print(f"keepflow: error: {type(exc).__name__} in the warm process; run the command again with "
                  "KEEPFLOW_WARM=0", file=sys.stderr)
        except Exception:
            pass
    finally:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # the command closes its end once it has the code
        finally:
            try:
                _send(conn, {"exit": code})
            except BaseException:           # noqa: BLE001 - nothing may keep this child from exiting
                pass
            os._exit(code)


def _watch_command(conn: socket.socket) -> None:
    """SIGINT this child when the command that sent it goes away (its end of the socket closes)."""
    import threading

    def watch():
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="keepflow-warm-watch", daemon=True).start()


def _log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {text}", file=sys.stderr, flush=True)
