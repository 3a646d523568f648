"""Where a backup's memory goes: peak and retained RSS per phase of the core steps.

    KEEPFLOW_PASSWORD=... python -m bench.memory_phases SRC REPO [--threads 2] [--format 1|2]
                                                    [--restore TARGET] [--code DIR]

Runs ``core.backup.prepare``, every ``store_range`` (on a thread pool like the
flow's) and ``commit`` in this process, without Prefect, with a thread that
samples this process's RSS every 2 ms. The core functions each step calls
(scan, diff, parent manifest read, index loads, plan and work-list writes,
known-blob set, commit's merge and manifest write) are wrapped so that every
sample is booked to the innermost phase running at that moment. For each
phase it prints the RSS on entry, the highest RSS seen while it (or anything
it called) ran, and the RSS on exit, so "peak - entry" is what the phase
needed and "exit - entry" what it kept. ``--restore`` then restores the
snapshot the same way (core.restore's plan and batches). ``--format`` makes
REPO first (``keepflow init --format N``; format 2 takes the password from
``KEEPFLOW_PASSWORD``) when it does not exist yet.

``--code DIR`` imports keepflow from a frozen source copy instead of this
checkout: one laid out as the package (``DIR/keepflow/{tasks,flows}``) or,
from before the ``keepflow`` namespace, plain ``DIR/tasks``.

Prefect's own share is measured by ``bench.scale`` (the whole ``keepflow
backup`` command against this in-process figure; bench/RESULTS.md, "Memory at
scale").
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Phases:
    def __init__(self):
        self.stack: list[str] = []
        self.rows: dict[str, list] = {}     # label -> [entry, peak, exit, seconds, calls, Arrow peak]
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.stop = False
        self.peak = 0.0
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        import pyarrow as pa
        while not self.stop:
            r = rss_mib()
            arrow = pa.total_allocated_bytes() / 2**20
            with self.lock:
                self.peak = max(self.peak, r)
                for label in self.stack:          # every open phase saw this RSS
                    row = self.rows[label]
                    row[1] = max(row[1], r)
                    row[5] = max(row[5], arrow)
            time.sleep(0.002)

    def wrap(self, module, name: str, label: str | None = None):
        fn = getattr(module, name, None)
        if fn is None:                     # another version of the code: book nothing to it
            print(f"(no {module.__name__}.{name} to measure)", file=sys.stderr)
            return
        label = label or name

        def wrapped(*args, **kwargs):
            r0 = rss_mib()
            t0 = time.perf_counter()
            with self.lock:
                if label not in self.rows:
                    self.rows[label] = [r0, r0, r0, 0.0, 0, 0.0]
                    self.order.append(label)
                self.stack.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                r1 = rss_mib()
                with self.lock:
                    self.stack.remove(label)
                    row = self.rows[label]
                    row[1] = max(row[1], r1)
                    row[2] = r1
                    row[3] += time.perf_counter() - t0
                    row[4] += 1
        setattr(module, name, wrapped)

    def report(self) -> str:
        lines = ["| phase | calls | seconds | RSS on entry (first call) | peak RSS | RSS on exit (last call) "
                 "| peak Arrow allocations |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label in self.order:
            e, p, x, s, n, arrow = self.rows[label]
            lines.append(f"| {label} | {n} | {s:.2f} | {e:.0f} MiB | {p:.0f} MiB | {x:.0f} MiB | {arrow:.0f} MiB |")
        lines.append(f"\nprocess peak RSS (sampled): {self.peak:.0f} MiB; "
                     f"VmHWM: {_hwm():.0f} MiB")
        return "\n".join(lines)


def _hwm() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def core_package(code: str | None):
    """The ``tasks.core`` package to measure: ``keepflow.tasks.core``, or plain
    ``tasks.core`` of a source copy from before the ``keepflow`` namespace."""
    import importlib

    if code:
        sys.path.insert(0, code)
        if not os.path.isdir(os.path.join(code, "keepflow", "tasks")):
            return importlib.import_module("tasks.core")
    return importlib.import_module("keepflow.tasks.core")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_phases", description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("repo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--restore", help="also restore the snapshot into this (new) folder")
    p.add_argument("--format", type=int, choices=[1, 2], help="create REPO in this format first")
    p.add_argument("--decay-ms", type=int, help="jemalloc decay (pa.jemalloc_set_decay_ms)")
    p.add_argument("--code", help="import keepflow from this source copy (see the docstring)")
    a = p.parse_args(argv)
    if a.decay_ms is not None:
        import pyarrow as pa
        pa.jemalloc_set_decay_ms(a.decay_ms)
    t_import = time.perf_counter()
    core = core_package(a.code)
    import importlib

    def mod(name):
        return importlib.import_module(f"{core.__name__}.{name}")
    print(f"measuring {os.path.dirname(core.__file__)}", file=sys.stderr)
    if a.format and not os.path.exists(a.repo):
        repository = mod("repository")
        repository.Repository.init(a.repo, config=repository.RepoConfig() if a.format == 1 else None)
    backup, diff, index, manifest, scratch, snapshots = (
        mod(n) for n in ("backup", "diff", "index", "manifest", "scratch", "snapshots"))
    base = rss_mib()
    ph = Phases()
    print(f"after imports: {base:.0f} MiB ({time.perf_counter() - t_import:.1f} s)", file=sys.stderr)
    ph.wrap(backup, "prepare")
    ph.wrap(backup, "scan")                 # before the streamed scan (--code of an older commit)
    ph.wrap(diff, "_diff_piece", "diff of one slice (scan + parent streamed)")
    ph.wrap(snapshots, "list_snapshots")
    ph.wrap(manifest, "read_manifest", "read_manifest (parent)")
    ph.wrap(diff, "distrust_unindexed")
    ph.wrap(index, "load_index")
    if os.path.exists(os.path.join(os.path.dirname(core.__file__), "restore_plan.py")):    # since the streamed plan
        ph.wrap(mod("restore_plan"), "write_plan", "restore_plan.write_plan")
    ph.wrap(index, "read_index_files")
    ph.wrap(scratch, "write_parts", "scratch.write_parts (work lists)")
    ph.wrap(scratch, "write_part", "scratch.write_part (results)")
    ph.wrap(scratch, "cut_ranges")
    ph.wrap(backup, "store_range")
    ph.wrap(index, "known_blobs", "known_blobs (load)")
    ph.wrap(backup, "commit")
    ph.wrap(index, "merge_run_index")
    ph.wrap(index, "require_chunks_indexed")
    ph.wrap(backup, "indexed_now", "indexed_now (commit guard's set)")
    ph.wrap(backup, "_merge_results", "_merge_results (plan + results)")
    ph.wrap(scratch, "read_part", "scratch.read_part (work lists, results)")
    ph.wrap(diff, "final_counts")
    ph.wrap(backup, "_require_indexed", "_require_indexed (commit guard)")
    ph.wrap(index, "require_indexed")
    ph.wrap(manifest, "write_manifest")

    t0 = time.perf_counter()
    plan = backup.prepare(a.src, a.repo).to_dict()
    t1 = time.perf_counter()
    with ThreadPoolExecutor(a.threads) as pool:
        summaries = list(pool.map(lambda b: backup.store_range(plan, b), range(len(plan["batches"]))))
    t2 = time.perf_counter()
    result = backup.commit(plan, summaries)
    t3 = time.perf_counter()
    print(f"snapshot {result.info.id}: {result.info.files} files, {plan['to_read']} read; "
          f"prepare {t1 - t0:.1f} s, store {t2 - t1:.1f} s, commit {t3 - t2:.1f} s", file=sys.stderr)
    if a.restore:
        restore = mod("restore")
        for name in ("prepare", "restore_range", "finish"):
            ph.wrap(restore, name, f"restore.{name}")
        _restore(restore, a.repo, a.restore, a.threads)
        print(f"restore {time.perf_counter() - t3:.1f} s", file=sys.stderr)
    ph.stop = True
    ph.thread.join()
    print(ph.report())
    return 0


def _restore(restore, repo, target, threads):
    plan = restore.prepare(repo, target).to_dict()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: restore.restore_range(plan, b), range(len(plan["batches"]))))
        restore.finish(plan)
    finally:
        restore.cleanup(plan)


if __name__ == "__main__":
    sys.exit(main())
