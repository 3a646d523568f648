"""Rich progress bars for the CLI, fed by ``keepflow.tasks.core.progress``.

Only used on a terminal; otherwise the context manager does nothing, so
scripts and CI logs stay clean.
"""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def progress_for(phase: str, enabled: bool):
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    from keepflow.tasks.core import progress as core_progress

    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    DownloadColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True)
    # Until the flow run is Running, the time is Prefect's (imports, and with no server
    # a temporary one starting): say so, then what the flow does first.
    first = f"{phase}: scanning" if phase == "backup" else f"{phase}: planning"
    scan = bars.add_task("starting Prefect…", total=None)
    tasks: dict[str, int] = {}

    def sink(name: str, files: int, nbytes: int) -> None:
        if name == core_progress.FLOW_RUNNING:
            bars.update(scan, description=first)
            return
        if name.endswith(":start"):
            base = name.split(":", 1)[0]
            bars.update(scan, visible=False)
            tasks[base] = bars.add_task(base, total=nbytes)
            return
        if name not in tasks:
            bars.update(scan, visible=False)
            tasks[name] = bars.add_task(name, total=None)
        bars.advance(tasks[name], nbytes)

    core_progress.set_sink(sink)
    try:
        with bars:
            yield
    finally:
        core_progress.set_sink(None)
