"""Batches on every core of this machine: a small pool of child processes.

Why: a batch of small files is Python work under the GIL (open, read, keyed
BLAKE3, the zstd attempt, AES-GCM and the pack encoding per file; a restore's
create, write, rename per file), so the flow's two batch threads share one
core (bench/RESULTS.md: a 1M-file first backup used 51.7 CPU-s in 49.4 s,
restic 54.9 CPU-s in 33.4 s on both cores). Dask's ``--workers`` puts each
batch in a process of its own but each worker carries Prefect (~300 MiB and
~3.4 s to start). These children carry only ``tasks.core``: they are forked
from a fork server that imported it once (``forkserver`` start method, so no
child inherits the flow process's threads or its Prefect state).

How a batch runs here: its Prefect task run stays in the flow process (state,
retries, logs and the task's result are Prefect's as before) and calls
``call(fn, ...)``, which hands ``fn`` and its arguments (URLs, options, the
plan: never a client object) to a child and waits, the GIL released. So:

* the child gets the run's unlocked master keys with each call (over the
  pipe to its own parent, never in its environment, arguments shown anywhere
  or logs), so it derives no key and needs no password;
* what the child reports to ``progress`` comes back over a queue, coalesced
  to a few messages a second, so the command's bars move as before;
* a child that dies (killed, out of memory) fails the batches it held with
  ``BatchProcessDied``, an OSError, which the batch tasks' retry policy
  retries (tasks/retry.py) in a new pool; what the dead child wrote is
  packs no index names yet, which prune sweeps like any interrupted run's;
* children ignore SIGINT (the flow process decides how a run ends, and waits
  for its batches), and die with the fork server (``PR_SET_PDEATHSIG``), which
  exits when the flow process does: nothing is left running.

Each child maps the known-blob set the plan shared (known_blobs.share: one
copy in the page cache for every process of the run) but keeps its own
additions and claims, so a content first met by two batches in two children
at once is stored twice; the index then holds two locations and the first
wins (as with ``--dask``).

Used only when it can pay: ``session()`` is entered by the flows' batch phase
on this machine (not on a Dask cluster), and a run of one batch still runs in
the flow process (a 20-file backup must not wait for a fork server).
``KEEPFLOW_BATCH_PROCESSES`` sets the pool's size; 0 keeps every batch in the
flow process's threads.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from . import pandas_probe, progress
from .errors import UsageError

ENV = "KEEPFLOW_BATCH_PROCESSES"
MAX_DEFAULT = 4                 # each child holds ~100 MiB of imports plus its batch and known-blob set
PRELOAD = ["keepflow.tasks.core.backup", "keepflow.tasks.core.restore", "keepflow.tasks.core.verify"]
PROGRESS_EVERY = 0.25           # seconds between a child's progress messages

T = TypeVar("T")


class BatchProcessDied(OSError):
    """The child process running a batch ended before the batch did (transient: retried)."""


def configured() -> int:
    """The pool size asked for: ``KEEPFLOW_BATCH_PROCESSES``, else one per core up to MAX_DEFAULT (1: none)."""
    text = os.environ.get(ENV, "").strip()
    if text:
        try:
            n = int(text)
            if n < 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"{ENV}={text!r} is not a number of processes; use 0 (batches in the flow "
                             "process) or a whole number such as 2") from None
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, MAX_DEFAULT) if cores > 1 else 0


def threads_for_batches() -> int:
    """How many batches the flow's thread pool should run at once: one per child, at least two."""
    try:
        return max(2, configured())
    except UsageError:          # said in one line when a batch runs; a flow module must still import
        return 2


# -- the flow process's side ------------------------------------------------------------------

class _Pool:
    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        self.queue = ctx.SimpleQueue()
        self.executor = ProcessPoolExecutor(size, mp_context=ctx, initializer=_child_init,
                                            initargs=(self.queue,))
        self.drain = threading.Thread(target=_drain, args=(self.queue,), name="keepflow-batch-progress",
                                      daemon=True)
        self.drain.start()
        self.closing = threading.Lock()
        self.closed = False

    def close(self) -> None:
        """Once only: every batch that met a broken pool discards it (_discard), each on a thread."""
        with self.closing:
            if self.closed:
                return
            self.closed = True
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.queue.put(None)            # ends the drain thread once the children's messages are read
        self.drain.join(timeout=5)
        self.queue.close()


_lock = threading.Lock()
_sessions = 0
_pool: _Pool | None = None


class Session:
    """One run's claim on the pool; ``end`` gives it up (once), and the last claim's end closes the pool."""

    def __init__(self) -> None:
        self._open = True

    def end(self) -> None:
        """No more batches of this run: the children go now if no other run uses them.

        A backup ends its session when its last batch is done, before the
        commit: the commit's own peak (the merged results of every file) must
        not add to the ~110 MiB each idle child still holds.
        """
        global _sessions, _pool
        with _lock:
            if not self._open:
                return
            self._open = False
            _sessions -= 1
            pool = _pool if _sessions == 0 else None
            if pool is not None:
                _pool = None
        if pool is not None:
            pool.close()


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """Let batch calls in this process run in children until the block ends or the
    session's ``end`` (nested and concurrent: counted)."""
    global _sessions
    with _lock:
        _sessions += 1
    claim = Session()
    try:
        yield claim
    finally:
        claim.end()


def active() -> bool:
    """Would a run of several batches started now put them in child processes?"""
    return _sessions > 0 and configured() > 1


def call(fn: Callable[..., T], *args: Any, batches: int, urls: tuple[str, ...] = ()) -> T:
    """``fn(*args)`` in a child process when a session is open and the run has ``batches`` >= 2, else here.

    ``urls`` are the storage the batch touches: one held in this process's
    memory (fsspec's ``memory://``) is out of a child's reach, so such a
    batch runs here.
    """
    if batches < 2 or not active() or any(str(u).startswith("memory:") for u in urls):
        return fn(*args)
    pool = _get_pool()
    from . import keyring

    try:
        future = pool.executor.submit(_child_call, keyring.unlocked(), fn, args)
    except (BrokenProcessPool, RuntimeError) as exc:     # broken, or shut down by a session that ended
        _discard(pool)
        raise BatchProcessDied(f"the batch process pool is gone ({exc}); retrying starts a new one") from None
    try:
        return future.result()
    except BrokenProcessPool:
        _discard(pool)
        raise BatchProcessDied("a batch process ended before its batch did (killed, or out of memory); "
                               "the batch is retried in a new process") from None


def _get_pool() -> _Pool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = _Pool(configured())
        return _pool


def _discard(pool: _Pool) -> None:
    """Forget a broken pool (the next call starts another); its survivors finish and exit."""
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    threading.Thread(target=pool.close, name="keepflow-batch-pool-close", daemon=True).start()


def _drain(queue) -> None:
    while True:
        try:
            item = queue.get()
        except (EOFError, OSError):
            return
        if item is None:
            return
        for phase, files, nbytes in item:
            progress.advance(phase, files, nbytes)   # a start marker too: same sink


# -- the child's side -------------------------------------------------------------------------

class _Forwarder:
    """The child's progress sink: sums advances per phase and sends them a few times a second."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.pending: list[list] = []
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, phase: str, files: int, nbytes: int) -> None:
        with self.lock:
            if self.pending and self.pending[-1][0] == phase and not phase.endswith(":start"):
                self.pending[-1][1] += files
                self.pending[-1][2] += nbytes
            else:
                self.pending.append([phase, files, nbytes])
            if phase.endswith(":start") or time.monotonic() - self.last >= PROGRESS_EVERY:
                self._send()

    def flush(self) -> None:
        with self.lock:
            self._send()

    def _send(self) -> None:
        if self.pending:
            self.queue.put([tuple(p) for p in self.pending])
            self.pending = []
        self.last = time.monotonic()


_forwarder: _Forwarder | None = None


def _child_init(queue) -> None:
    global _forwarder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    pandas_probe.skip_pyarrow_pandas_probe()       # 23 MiB and ~0.3 s per child otherwise
    _forwarder = _Forwarder(queue)
    progress.set_sink(_forwarder)


def _die_with_parent() -> None:
    """SIGKILL this child when the fork server (its parent) exits, which it does when the flow process does."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):     # not Linux: children still exit when their work queue closes
        pass
    if os.getppid() == 1:                 # the parent went before prctl took effect
        os._exit(1)


def _child_call(masters: dict[str, bytes], fn: Callable[..., T], args: tuple) -> T:
    from . import keyring

    keyring.install(masters)
    try:
        return fn(*args)
    except BaseException as exc:
        raise _sendable(exc) from None
    finally:
        if _forwarder is not None:
            _forwarder.flush()


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives the trip to the flow process, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
