"""Process-local progress reporting, decoupled from any UI.

The core calls ``advance(phase, files, nbytes)`` as it works; by default that
does nothing. The CLI installs a sink (rich progress bars on a terminal) with
``set_sink``; batches running in the flow's thread pool report into it, and
batches in this machine's child processes through it (batch_processes.py
passes on what they report, start markers included, with ``advance``). Under
a distributed runner the batches run elsewhere and simply report nowhere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

FLOW_RUNNING = "flow:running"     # the flow run has started (flows/_runs.py); the CLI's bars say what runs
_sink: Callable[[str, int, int], None] | None = None
_lock = threading.Lock()


def set_sink(sink: Callable[[str, int, int], None] | None) -> None:
    global _sink
    _sink = sink


def advance(phase: str, files: int = 0, nbytes: int = 0) -> None:
    sink = _sink
    if sink is not None:
        with _lock:
            sink(phase, files, nbytes)


def start(phase: str, total_files: int, total_bytes: int) -> None:
    """Announce a phase's totals (a negative ``files`` value marks a start)."""
    sink = _sink
    if sink is not None:
        with _lock:
            sink(phase + ":start", total_files, total_bytes)

