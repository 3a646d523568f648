"""Keep the run history when the command exits (PREFECT_NOTES "Lost history").

With no ``PREFECT_API_URL`` Prefect runs a temporary server inside this
process, backed by the SQLite database in ``PREFECT_HOME``. Task-run states
reach that server as events, asynchronously; if the process exits first, the
temporary server stops before it has recorded them, and ``prefect flow-run
ls`` later shows a half-recorded run. So after the flow returns we drain the
client's events worker, then poll the API until the flow run and every task
run it made are recorded in a final state (bounded by a timeout).

With a real server (``PREFECT_API_URL`` set) the server keeps consuming
after we exit, so draining the client's queues is enough.
"""

from __future__ import annotations

import os
import time


def uses_temporary_server() -> bool:
    """No server set up: Prefect's temporary one, or the CLI's early-started equivalent (_temporary_server.py)."""
    from prefect.settings import PREFECT_API_URL

    from keepflow.flows._temporary_server import ENV

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    return not url or url == os.environ.get(ENV)


def settle(flow_run_id, expected_task_runs: int, timeout: float = 60.0) -> bool:
    """Wait until the run's history is recorded. Returns True when complete."""
    from prefect.events.worker import EventsWorker

    try:
        EventsWorker.drain_all(timeout=timeout, at_exit=False)
    except Exception:
        pass
    if not uses_temporary_server() or flow_run_id is None:
        return True

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = (flow_run.state is not None and flow_run.state.is_final()
                    and len(task_runs) >= expected_task_runs
                    and all(tr.state is not None and tr.state.is_final() for tr in task_runs))
            if done:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
