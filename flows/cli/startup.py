"""Start-up of a command: what runs before the command itself, and how a flow is run.

Every command: ``skip_pyarrow_pandas_probe`` (pyarrow would import pandas,
~0.3 s, to check objects the command line never gives it); every command that
imports Prefect: ``skip_httpx_cli`` (httpx would import its own command line). Commands that run
a flow on an encrypted repository: ``unlock_ahead`` (the KDF on a thread while
Prefect is imported). Commands that run a flow import it inside ``importing()``
(no garbage collection while Prefect's thousands of modules and models load).
Commands that run a flow: ``prepare_prefect`` sets
Prefect's environment before Prefect is imported (analytics off, a quiet
console, the persistent server of ``keepflow server start`` when the user
chose no other, else a once-an-hour hint on a terminal about the temporary
one), then ``run_flow`` runs the flow with
progress bars and waits until its history is recorded. ``cluster`` and
``on_cluster`` turn ``--dask``/``--workers``/``--work-dir`` into flow
parameters and a task runner.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from contextlib import contextmanager

from keepflow.flows.cli import server

HINT_EVERY = 3600.0
# Set by prepare_prefect unless the user set them. A backup tool sends nothing anywhere by
# default: Prefect's SDK and server analytics are off.
PREFECT_DEFAULTS = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
# ... and without --verbose: logs still go to the API (run history); only the console is quiet,
# so failures reach the user as our one-line errors, not tracebacks.
QUIET_CONSOLE = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL"}


def skip_httpx_cli() -> None:
    """Save ~0.02 s per flow command: keep ``import httpx`` from importing httpx's own command line.

    httpx's ``__init__`` imports its ``httpx`` console tool (click, pygments'
    lexers, rich's progress, syntax and table) whenever click is installed,
    and Prefect installs click for its CLI. Prefect imports httpx; nothing in
    a keepflow command runs httpx's tool. So, before Prefect is imported,
    ``httpx._main`` is a stand-in whose ``main`` loads the real module if it
    is ever called. Measured: importing the real ``httpx._main`` once
    Prefect is loaded (rich's console already is) took 19-27 ms of CPU (5
    runs, load 4).
    """
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    import types

    def main(*args, **kwargs):
        del sys.modules["httpx._main"]
        from httpx._main import main as real

        return real(*args, **kwargs)

    stand_in = types.ModuleType("httpx._main", "a stand-in until httpx's command line is used (keepflow startup)")
    stand_in.main = main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stand_in


@contextmanager
def importing():
    """Import Prefect and a flow module with the cyclic garbage collector paused (~0.1 s saved).

    Importing Prefect creates a few hundred thousand objects (modules, classes,
    pydantic models and their schemas) and almost no garbage; the collector
    still runs a full pass over all of them every so often while they are
    created: 0.08-0.1 s of the ~0.9 s import here (CPU and wall, `import
    prefect, prefect.main, prefect.flow_engine` with and without
    ``gc.disable()``, 3 alternating runs each). Afterwards ``gc.freeze()`` moves
    what was imported to the collector's permanent generation, so the
    collections the command then triggers do not walk those objects again; the
    collector is on again for the command's own work. Only a first import
    freezes: a process that calls ``main()`` again (tests) imports nothing new,
    and its garbage of the commands before stays collectable.
    """
    was_enabled, modules = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) != modules:
            gc.freeze()
        if was_enabled:
            gc.enable()


def unlock_ahead(args) -> None:
    """Derive the repository's key on a thread while Prefect is imported (~0.5 s of KDF hidden).

    keyring.unlock_ahead reads the config and the password here and never
    prompts; whatever it cannot do is left to the flow's own unlock, which
    reports it as before.
    """
    from keepflow.tasks.core import keyring

    keyring.unlock_ahead(args.repo, args.storage_options)


def prepare_prefect(verbose: bool, start_server: bool = False) -> None:
    """Environment for Prefect, set before it is imported.

    ``start_server`` (commands that run a flow): with no server set up, spawn
    the temporary one now (flows/_temporary_server.py), so it starts while
    Prefect is imported instead of after.
    """
    skip_httpx_cli()
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # A server `keepflow server start` left running serves this command (unless the
    # user chose another); otherwise Prefect's temporary one, announced on a terminal.
    if not server.use_running_server() and not os.environ.get("PREFECT_API_URL") \
            and not server.profile_api_url():
        hint_once_per_hour()
        if start_server:
            from keepflow.flows import _temporary_server

            _temporary_server.start()
            server.skip_version_check()         # it runs this interpreter's Prefect: the check can only pass
    if not verbose:
        for name, value in QUIET_CONSOLE.items():
            os.environ.setdefault(name, value)
    if "prefect.context" in sys.modules:
        # Prefect is imported already (a command in the warm process, flows/cli/warm.py; tests):
        # its settings must see the environment set here, not the one it was imported with.
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def hint_once_per_hour() -> None:
    """On a terminal, at most once an hour: how to make commands faster."""
    if not sys.stderr.isatty():
        return
    stamp = server.prefect_home() / "keepflow" / "server-hint"
    try:
        if time.time() - stamp.stat().st_mtime < HINT_EVERY:
            return
    except OSError:
        pass
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        return
    print("keepflow: starting Prefect's temporary server (5-10 s); `keepflow server start` keeps one running "
          "so commands start faster and their runs stay in its UI", file=sys.stderr)


@contextmanager
def without_heartbeats():
    """Prefect's settings with ``flows.heartbeat_frequency`` None, for this run.

    An ad hoc run from the command line sends no heartbeats: the engine joins
    the heartbeat thread at the end, which costs up to a second per command,
    and nothing acts on heartbeats unless a zombie-run automation is set up.
    Deployments (serve, workers) keep Prefect's heartbeat. What
    ``temporary_settings(updates=...)`` would do, without its cost: it builds
    and validates the whole settings tree again from the environment and
    profile (0.02-0.04 s here); a copy of the current settings with that one
    field replaced (None is a valid value: no validation needed) is the same
    settings object.
    """
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    settings = context.settings
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(profile=context.profile, settings=settings.model_copy(update={"flows": flows})):
        yield


def run_flow(flow_fn, kwargs, args, phase: str) -> dict:
    from keepflow.flows import _history, _temporary_server
    from keepflow.flows._progress import progress_for

    with without_heartbeats(), progress_for(phase, enabled=sys.stderr.isatty() and not args.json):
        _temporary_server.wait_ready()          # started early by prepare_prefect, if at all
        state = flow_fn(**kwargs, return_state=True)
    flow_run_id = state.state_details.flow_run_id if state.state_details else None
    outcome = state.result(raise_on_failure=False)
    expected = outcome.get("task_runs", 0) if isinstance(outcome, dict) else 0
    _history.settle(flow_run_id, expected)
    if isinstance(outcome, dict):
        return outcome  # a summary, even when the run ended Failed (e.g. restore errors)
    return state.result(raise_on_failure=True)  # re-raises the task's own exception


def cluster(args, uses_work_dir: bool) -> dict:
    """The flow parameters for --dask/--workers/--work-dir; usage errors before Prefect is imported."""
    from keepflow.flows import _dask

    address, workers = _dask.choose(args.dask, args.workers)
    out = dict(dask_address=address, workers=workers)
    if uses_work_dir:
        out["work_dir"] = args.work_dir
    return out


def on_cluster(flow_fn, cluster: dict):
    """``flow_fn`` with its batches on the Dask cluster asked for (or as it is)."""
    from keepflow.flows import _dask

    address, workers = cluster["dask_address"], cluster["workers"]
    _dask.check(address, workers, work_dir=cluster.get("work_dir"), uses_work_dir="work_dir" in cluster,
                api_url=_dask.api_url())
    runner = _dask.task_runner(address, workers)
    return flow_fn.with_options(task_runner=runner) if runner is not None else flow_fn
