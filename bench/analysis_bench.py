"""Time the manifest-analysis API on a synthetic history (no real files needed).

    .venv/bin/python -m bench.analysis_bench [--snapshots 100] [--files 100000] [--repo DIR] [--repeats 3]

Builds a repository whose manifests are written with keepflow's own manifest
writer (``tasks.core.manifest.write_manifest``) and whose index lists every
blob: ``--files`` files in folders of 100, a 1% change per snapshot (new
hashes and sizes), as a nightly backup of a busy tree would produce. Then
times, each the median of ``--repeats`` runs in this process:

- ``load_snapshots`` (footers only),
- ``load_manifests`` with ``path,size``; ``path,size,hash``; all columns,
- ``repository_summary`` (what ``keepflow stats`` computes),
- ``dedup_stats`` (all hash columns against the index).

Prints a markdown table; the repository stays in ``--repo`` (a temporary
folder by default, removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tasks.core import analysis, index as indexmod, manifest  # noqa: E402
from tasks.core.repository import Repository  # noqa: E402


def _hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.bytes(32 * n)
    return np.array([raw[i * 32:(i + 1) * 32].hex() for i in range(n)], dtype=object)


def build(repo_dir: str, n_snapshots: int, n_files: int, seed: int = 1) -> Repository:
    rng = np.random.default_rng(seed)
    repo = Repository.init(repo_dir)
    paths = np.array([f"d{i // 100:04d}/f{i:06d}.dat" for i in range(n_files)], dtype=object)
    dirs = sorted({p.split("/")[0] for p in paths})
    sizes = rng.integers(1024, 8192, n_files)
    hashes = _hashes(rng, n_files)
    start = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone.utc)
    ino = np.arange(n_files, dtype=np.int64) + 1000
    n_change = max(1, n_files // 100)
    parent = None
    for k in range(n_snapshots):
        new_idx = np.arange(n_files) if k == 0 else rng.choice(n_files, n_change, replace=False)
        if k:
            hashes[new_idx] = _hashes(rng, len(new_idx))
            sizes[new_idx] = rng.integers(1024, 8192, len(new_idx))
        when = start + dt.timedelta(days=k)
        mt = int(when.timestamp() * 1e9)
        n_all = n_files + len(dirs)
        table = pa.table({
            "path": pa.array(list(paths) + dirs, pa.string()),
            "type": pa.array(["file"] * n_files + ["dir"] * len(dirs), pa.string()),
            "size": pa.array(np.concatenate([sizes, np.zeros(len(dirs), np.int64)])),
            "mtime_ns": pa.array(np.full(n_all, mt, np.int64)),
            "ctime_ns": pa.array(np.full(n_all, mt, np.int64)),
            "inode": pa.array(np.concatenate([ino, np.arange(len(dirs), dtype=np.int64)])),
            "mode": pa.array(np.full(n_all, 0o100644, np.int32)),
            "uid": pa.array(np.zeros(n_all, np.int32)),
            "gid": pa.array(np.zeros(n_all, np.int32)),
            "hash": pa.array(list(hashes) + [None] * len(dirs), pa.string()),
            "link_target": pa.nulls(n_all, pa.string()),
        })
        run = f"{k:04d}{rng.bytes(6).hex()}"
        blob_hashes = hashes[new_idx]
        blob_sizes = sizes[new_idx]
        offsets = np.concatenate([[0], np.cumsum(blob_sizes)[:-1]])
        pack_no = offsets // (16 * 2**20)
        keys = [f"packs/{run[:2]}/{run}{p:04d}" for p in pack_no]
        indexmod.write_index(repo, pa.table({"hash": pa.array(list(blob_hashes), pa.string()),
                                             "key": pa.array(keys, pa.string()),
                                             "offset": pa.array(offsets.astype(np.int64)),
                                             "length": pa.array(blob_sizes.astype(np.int64))}), run)
        info = manifest.SnapshotInfo(
            id=rng.bytes(8).hex(), time=when.isoformat(), end_time=(when + dt.timedelta(minutes=3)).isoformat(),
            parent=parent, source="/data", host="bench", files=n_files, dirs=len(dirs),
            bytes=int(sizes.sum()), new=n_files if k == 0 else 0, changed=0 if k == 0 else len(new_idx),
            unchanged=n_files - len(new_idx) if k else 0, bytes_read=int(blob_sizes.sum()),
            bytes_stored=int(blob_sizes.sum()), keepflow_version="bench")
        manifest.write_manifest(repo, table, info)
        parent = info.id
    return repo


def timed(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repo", help="build here (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the repository")
    args = ap.parse_args(argv)

    repo_dir = args.repo or tempfile.mkdtemp(prefix="keepflow-analysis-bench-")
    if args.repo and os.path.exists(args.repo):
        shutil.rmtree(args.repo)
    t0 = time.perf_counter()
    build(repo_dir, args.snapshots, args.files)
    built = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(repo_dir, "snapshots"))
               for f in fs)
    print(f"built {args.snapshots} manifests x {args.files:,} files in {built:.1f} s "
          f"({size / 2**20:.0f} MiB of Parquet) at {repo_dir}", file=sys.stderr)

    rows = []

    def case(name, fn):
        secs, out = timed(fn, args.repeats)
        n = len(out) if hasattr(out, "__len__") and not isinstance(out, dict) else ""
        rows.append((name, f"{secs:.2f}", f"{n:,}" if n != "" else ""))
        print(f"{name}: {secs:.2f} s", file=sys.stderr)

    case("load_snapshots", lambda: analysis.load_snapshots(repo_dir))
    case("load_manifests columns=path,size", lambda: analysis.load_manifests(repo_dir, columns=["path", "size"]))
    case("load_manifests columns=path,size,hash",
         lambda: analysis.load_manifests(repo_dir, columns=["path", "size", "hash"]))
    case("load_manifests all columns", lambda: analysis.load_manifests(repo_dir))
    case("load_manifests arrow=True columns=path,size",
         lambda: analysis.load_manifests(repo_dir, columns=["path", "size"], arrow=True))
    case("repository_summary (keepflow stats)", lambda: analysis.repository_summary(repo_dir))
    case("dedup_stats", lambda: analysis.dedup_stats(repo_dir).per_snapshot)

    print(f"\n{args.snapshots} snapshots x {args.files:,} files, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}\n")
    print("| call | seconds | rows |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| `{r[0]}` | {r[1]} | {r[2]} |")
    if not args.repo and not args.keep:
        shutil.rmtree(repo_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
