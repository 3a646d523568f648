"""``keepflow server start|stop|status``: a persistent local Prefect server for everyday commands.

With no ``PREFECT_API_URL``, every command that runs a flow starts Prefect's
temporary server and stops it again (5-10 s per command here). ``keepflow
server start`` starts Prefect's own background server once (``prefect server
start --background``, bound to 127.0.0.1, analytics off) and records where it
listens in ``$PREFECT_HOME/keepflow/server.json``; later commands find it
there (``api_url_if_running``: one local health request, ~ms) and use it with
no variable to set, so their runs are in its UI and history. ``stop`` stops
it; ``status`` says whether it runs and where (``--json``: ``running``,
``api_url``, ``ui_url``), so scripts and notebooks can point Prefect's client
at it (``PREFECT_API_URL=$(keepflow server status --json | jq -r .api_url)``).

A ``PREFECT_API_URL`` in the environment or in the active Prefect profile
always wins: keepflow never overrides a server the user chose
(``use_running_server``, called by ``startup.prepare_prefect``, which also
prints the once-an-hour hint on the temporary server). With such a chosen
API, ``start`` starts no server, only the warm process for that API (a
team's server or Prefect Cloud: commands skip the imports there too), and
``status`` reports that API (``chosen_by``); ``stop`` stops what keepflow
started. No Prefect import here: the command must start fast.

The state file also records the Prefect version that started the server.
While the installed one is the same, commands skip Prefect's API version
check, as they do on the temporary server they start themselves
(``PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED=false``, unless the user set
it): a GET /admin/version per client, one of them on a new TLS context (the
CA bundle loaded again, on the thread that sends events), ~0.03 s of CPU per
command here, to learn what the state file already says. After a Prefect
upgrade the versions differ and the check is made as before.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from keepflow.flows.cli import output

DEFAULT_PORT = 4200
VERSION_CHECK = "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"
HOST = "127.0.0.1"
START_TIMEOUT = 90.0


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def state_file() -> Path:
    return prefect_home() / "keepflow" / "server.json"


def _healthy(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _read_state() -> dict | None:
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "api_url" in state else None


def _running_state() -> dict | None:
    state = _read_state()
    return state if state and _healthy(state["api_url"]) else None


def api_url_if_running() -> str | None:
    """The API URL of the server ``keepflow server start`` left running, or None."""
    state = _running_state()
    return state["api_url"] if state else None


def prefect_version() -> str | None:
    """The installed Prefect's version, from its generated ``_build_info.py`` (importing Prefect costs ~1 s)."""
    try:
        spec = importlib.util.find_spec("prefect")
        text = (Path(spec.origin).parent / "_build_info.py").read_text()  # type: ignore[union-attr, arg-type]
    except (ImportError, AttributeError, TypeError, OSError, ValueError):
        return None
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    return found.group(1) if found else None


def skip_version_check() -> None:
    """This process talks to a server of the installed Prefect: no API version check (see the module docstring)."""
    os.environ.setdefault(VERSION_CHECK, "false")


def profile_api_url() -> str | None:
    """``PREFECT_API_URL`` of the active Prefect profile, if it sets one (read without importing prefect)."""
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml")
    try:
        import tomllib

        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")
    return value or None


def chosen_api_url() -> tuple[str, str] | None:
    """The Prefect API the user chose, and where: ``(url, "PREFECT_API_URL" | "the Prefect profile")``."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "PREFECT_API_URL"
    url = profile_api_url()
    return (url, "the Prefect profile") if url else None


def use_running_server() -> bool:
    """Point this process at the persistent server when the user chose no other; True when it did."""
    if chosen_api_url():
        return False
    state = _running_state()
    if state is None:
        return False
    os.environ["PREFECT_API_URL"] = state["api_url"]
    if state.get("prefect_version") and state["prefect_version"] == prefect_version():
        skip_version_check()
    return True


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def _prefect() -> str:
    return str(Path(sys.executable).parent / "prefect")


def _status() -> dict:
    """What commands use: the API the user chose (``chosen_by``), else the persistent server."""
    from keepflow.flows.cli import warm

    chosen = chosen_api_url()
    if chosen:
        running = _healthy(chosen[0])
        return {"running": running, "api_url": chosen[0], "ui_url": None, "prefect_home": str(prefect_home()),
                "warm_process": running and warm.serving() == chosen[0], "chosen_by": chosen[1]}
    state = _read_state() or {}
    running = bool(state) and _healthy(state["api_url"])
    return {"running": running, "api_url": state.get("api_url") if running else None,
            "ui_url": state.get("ui_url") if running else None, "prefect_home": str(prefect_home()),
            "warm_process": running and warm.serving() == state["api_url"]}


def cmd_server(args) -> int:
    from keepflow.flows.cli import warm
    from keepflow.tasks.core.errors import KeepflowError

    action = args.server_command
    if action == "status":
        out = _status()
        if args.json:
            output.print_json(out)
        elif out.get("chosen_by"):
            print(f"{out['chosen_by']} names the Prefect API {out['api_url']}: "
                  f"{'answering' if out['running'] else 'not answering'}, warm process "
                  f"{'ready' if out['warm_process'] else 'not running'}")
        elif out["running"]:
            print(f"running: API {out['api_url']}, UI {out['ui_url']}, warm process "
                  f"{'ready' if out['warm_process'] else 'not running'}")
        else:
            print("not running; `keepflow server start` starts one")
        return 0 if out["running"] else 3
    if action == "stop":
        state = _read_state()
        was_running = bool(state) and _healthy(state["api_url"])   # keepflow's own server, not a chosen one
        warm.stop()
        proc = subprocess.run([_prefect(), "server", "stop"], capture_output=True, text=True,
                              env=_server_env(None))
        try:
            state_file().unlink()
        except FileNotFoundError:
            pass
        out = {"stopped": was_running, "api_url": state["api_url"] if was_running else None}
        if args.json:
            output.print_json(out)
        else:
            print("stopped" if was_running or proc.returncode == 0 else "no server was running")
        return 0
    current = _status()
    if current.get("chosen_by"):
        # The user's own server (a team's, Prefect Cloud): keepflow starts none beside it, only
        # the warm process for it, so commands there skip the imports too.
        if not _healthy(current["api_url"], timeout=5.0):
            raise KeepflowError(f"the Prefect API {current['api_url']} ({current['chosen_by']}) does not answer; "
                                + ("start that server, or unset PREFECT_API_URL to start keepflow's own"
                                   if current["chosen_by"] == "PREFECT_API_URL" else "start that server, or "
                                   "`prefect config unset PREFECT_API_URL` to start keepflow's own"))
        out = {**current, "running": True, "started": False}
    elif current["running"]:
        out = {**current, "started": False}
    else:
        port = _free_port(args.port or DEFAULT_PORT) if not args.port else args.port
        api_url = f"http://{HOST}:{port}/api"
        proc = subprocess.run([_prefect(), "server", "start", "--host", HOST, "--port", str(port), "--background",
                               "--analytics-off"], capture_output=True, text=True, env=_server_env(api_url))
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise KeepflowError(f"cannot start the Prefect server on {HOST}:{port}: {last[0]}; "
                                "`prefect server stop` ends one that is still starting")
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(api_url, timeout=2.0):
            if time.monotonic() > deadline:
                raise KeepflowError(f"the Prefect server on {HOST}:{port} did not answer within "
                                    f"{START_TIMEOUT:.0f} s; see `prefect server stop`")
            time.sleep(0.3)
        state = {"api_url": api_url, "ui_url": f"http://{HOST}:{port}", "port": port,
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "prefect_version": prefect_version()}
        state_file().parent.mkdir(parents=True, exist_ok=True)
        state_file().write_text(json.dumps(state, indent=2) + "\n")
        out = {"running": True, "api_url": api_url, "ui_url": state["ui_url"],
               "prefect_home": str(prefect_home()), "started": True, "warm_process": False}
    if not out["warm_process"]:
        out["warm_process"] = warm.start(out["api_url"])
    if args.json:
        output.print_json(out)
    else:
        warm_note = "" if out["warm_process"] else f" (no warm process: see {warm.log_path()})"
        if out.get("chosen_by"):
            print(f"{out['chosen_by']} names the Prefect API {out['api_url']}: keepflow starts no server of its "
                  f"own; {'the warm process for it is ready' if out['warm_process'] else 'no warm process'}"
                  + ("" if out["warm_process"] else f" (see {warm.log_path()})"))
        else:
            verb = "started" if out["started"] else "already running"
            print(f"{verb}: API {out['api_url']}, UI {out['ui_url']}; keepflow commands use it from now "
                  f"on{warm_note}")
    return 0


def _server_env(api_url: str | None) -> dict:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)          # the server itself must not point at another one
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    if api_url:
        env["PREFECT_UI_API_URL"] = api_url     # the UI must reach the API where it really listens
    return env
