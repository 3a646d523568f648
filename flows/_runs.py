"""Prefect side of the run registry (tasks/core/runs.py): runs killed without a trace end Crashed.

Every keepflow flow carries ``HOOKS`` (``@flow(..., **HOOKS)``). Entering
``Running`` registers the run, then sets this repository's dead runs (this
host, process gone) ``Crashed``; reaching a final state removes the record.
Hooks rather than code in the flow body, because Prefect calls a state hook
after the state is recorded: a kill between the end of the flow's code and
its final state still leaves a record, so no window remains in which a run
can be left ``Running`` untracked.

With the embedded server the record also names that server's process,
which outlives a SIGKILLed parent; a dead record's server is stopped when
the record is looked at (runs.stop_orphaned_helper). A dead record is
marked only by a process talking to the Prefect API it was recorded in; a
run already in a final state (it finished, then the process died before
removing its record; or Prefect's runner reported it) is left as it is and
only its record removed. The hooks never fail a run: a registry
that cannot be written costs only crash detection, with a warning in the
run's log.
"""

from __future__ import annotations

from keepflow.tasks.core import runs


def api_url() -> str | None:
    """The Prefect API this process records runs in; None for the embedded temporary server."""
    from prefect.settings import PREFECT_API_URL

    from keepflow.flows._history import uses_temporary_server

    return None if uses_temporary_server() else str(PREFECT_API_URL.value()).rstrip("/")


def crash_dead_runs(repo: str, by: str) -> tuple[list[runs.RunRecord], list[runs.RunRecord]]:
    """Set the dead runs of ``repo`` Crashed and drop their records.

    Returns (runs marked Crashed, dead runs left alone because they were
    recorded against another Prefect API). A run the API cannot be asked
    about now keeps its record for the next attempt.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    folder = runs.default_folder()
    dead = runs.dead_runs(folder, repo)
    for record in dead:
        runs.stop_orphaned_helper(record)     # the embedded server a killed CLI run left running
    ours = api_url()
    mine = [r for r in dead if (r.api_url or None) == ours]
    other = [r for r in dead if (r.api_url or None) != ours]
    marked = []
    if not mine:
        return marked, other
    with get_client(sync_client=True) as client:
        for record in mine:
            try:
                flow_run = client.read_flow_run(record.flow_run_id)
            except ObjectNotFound:      # e.g. the database was reset: nothing to mark
                runs.unregister(folder, record.flow_run_id)
                continue
            except Exception:
                continue
            if flow_run.state is None or not flow_run.state.is_final():
                try:
                    client.set_flow_run_state(record.flow_run_id,
                                              Crashed(message=runs.crash_message(record, by)), force=True)
                except Exception:
                    continue
                marked.append(record)
            runs.unregister(folder, record.flow_run_id)
    return marked, other


def _temporary_server_pid() -> int | None:
    """The pid of the embedded server this process started (None with a real server)."""
    import sys

    from keepflow.flows import _temporary_server
    from keepflow.flows._history import uses_temporary_server

    early = _temporary_server.pid()                         # the CLI's early-started one
    if early is not None:
        return early
    module = sys.modules.get("prefect.server.api.server")   # imported only if this process started one
    if module is None or not uses_temporary_server():
        return None
    for server in list(getattr(module.SubprocessASGIServer, "_instances", {}).values()):
        process = getattr(server, "server_process", None)
        if process is not None and process.poll() is None:
            return process.pid
    return None


def _logger(flow, flow_run):
    from prefect.logging.loggers import flow_run_logger

    return flow_run_logger(flow_run, flow)


def _started(flow, flow_run, state) -> None:
    from keepflow.tasks.core import progress

    progress.advance(progress.FLOW_RUNNING)       # the CLI's progress stops saying "starting Prefect…"
    repo = (flow_run.parameters or {}).get("repo")
    if not isinstance(repo, str) or not repo:
        return
    try:
        runs.register(runs.default_folder(), flow_run.id, flow_run.name, flow.name, repo, api_url(),
                      helper_pid=_temporary_server_pid())
        marked, _ = crash_dead_runs(repo, by=f"flow run {flow_run.name}")
    except Exception as exc:  # crash detection is a courtesy; the run itself goes on
        _logger(flow, flow_run).warning("run registry (%s): %s", runs.default_folder(), exc)
        return
    if marked:
        _logger(flow, flow_run).warning(
            "marked %d dead flow runs of %s Crashed: %s", len(marked), repo,
            ", ".join(f"{r.flow_run_name} (pid {r.pid})" for r in marked))


def _ended(flow, flow_run, state) -> None:
    try:
        runs.unregister(runs.default_folder(), flow_run.id)
    except OSError as exc:
        _logger(flow, flow_run).warning("run registry (%s): %s", runs.default_folder(), exc)


HOOKS = dict(on_running=[_started], on_completion=[_ended], on_failure=[_ended], on_crashed=[_ended],
             on_cancellation=[_ended])
