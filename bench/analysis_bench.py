"""Time the manifest-analysis API on a synthetic history (no real files needed).

    .venv/bin/python -m bench.analysis_bench [--format 2|2-plain|1] [--snapshots 100] [--files 100000]
                                             [--repo DIR] [--repeats 3] [--only list]

Builds a repository (format 2 encrypted by default, ``--format 2-plain`` for
``--encryption none``, ``--format 1``) whose manifests are written with
keepflow's own manifest writer (``keepflow.tasks.core.manifest.write_manifest``) and
whose index lists every blob: ``--files`` files in folders of 100, a 1%
change per snapshot (new hashes and sizes), as a nightly backup of a busy
tree would produce. Then times, each the median of ``--repeats`` runs in
this process:

- ``snapshots.list_snapshots`` (what ``keepflow snapshots`` reads: format 2's
  facts block, a Parquet footer) and ``load_snapshots`` (the same as a DataFrame),
- ``load_manifests`` with ``path,size``; ``path,size,hash``; all columns,
- ``analysis.duckdb`` (every column of every snapshot registered with DuckDB)
  and one query over it,
- ``repository_summary`` (what ``keepflow stats`` computes),
- ``dedup_stats`` (all hash columns against the index).

``--only list`` stops after the listing (for ``--snapshots 1000 --files 10``).
The password of an encrypted repository is ``$KEEPFLOW_PASSWORD`` (a fixed
bench password when unset) with a cheap KDF: the bench times reading, not
unlocking.

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

import blake3
import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("KEEPFLOW_PASSWORD", "keepflow analysis bench")
os.environ.setdefault("KEEPFLOW_KDF", "argon2id:t=1,m=1024,p=1")

from keepflow.tasks.core import analysis, manifest, snapshots  # noqa: E402
from keepflow.tasks.core import index as indexmod  # noqa: E402
from keepflow.tasks.core.repository import RepoConfig, Repository  # noqa: E402

CONFIGS = {"2": lambda: RepoConfig.new_v2(), "2-plain": lambda: RepoConfig.new_v2(encryption="none"),
           "1": lambda: RepoConfig()}


def _hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.bytes(32 * n)
    return np.array([raw[i * 32:(i + 1) * 32].hex() for i in range(n)], dtype=object)


def _index_rows(repo: Repository, run: str, blob_hashes, blob_sizes) -> pa.Table:
    """Index rows for the run's blobs, in packs of 16 MiB (format 2: 16-byte tags, raw payloads)."""
    tag = 16 if repo.encrypted else 0
    stored = blob_sizes.astype(np.int64) + (tag if repo.version >= 2 else 0)
    offsets = np.concatenate([[0], np.cumsum(stored)[:-1]]).astype(np.int64)
    pack_no = offsets // (16 * 2**20)
    if repo.version < 2:
        keys = [f"packs/{run[:2]}/{run}{p:04d}" for p in pack_no]
        return pa.table({"hash": pa.array(list(blob_hashes), pa.string()), "key": pa.array(keys, pa.string()),
                         "offset": pa.array(offsets), "length": pa.array(stored)})
    names = {p: blake3.blake3(f"{run}-{p}".encode()).hexdigest() for p in set(pack_no.tolist())}
    keys = [repo.pack_key(names[p]) for p in pack_no.tolist()]
    n = len(blob_hashes)
    return pa.table({"hash": pa.array(list(blob_hashes), pa.string()), "key": pa.array(keys, pa.string()),
                     "offset": pa.array(offsets), "length": pa.array(stored),
                     "type": pa.array(np.zeros(n, np.int8)), "seq": pa.array(np.arange(n, dtype=np.int32)),
                     "salt": pa.array([bytes(32)] * n, pa.binary(32)),
                     "raw_length": pa.array(blob_sizes.astype(np.int64)),
                     "compressed": pa.array(np.zeros(n, bool))}, schema=indexmod.schema(repo))


def build(repo_dir: str, n_snapshots: int, n_files: int, seed: int = 1, fmt: str = "2") -> Repository:
    rng = np.random.default_rng(seed)
    repo = Repository.init(repo_dir, config=CONFIGS[fmt]())
    paths = np.array([f"d{i // 100:04d}/f{i:06d}.dat" for i in range(n_files)], dtype=object)
    dirs = sorted({p.split("/")[0] for p in paths})
    sizes = rng.integers(1024, 8192, n_files)
    hashes = _hashes(rng, n_files)
    start = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.UTC)
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
            **{name: pa.nulls(n_all, manifest.MANIFEST_SCHEMA.field(name).type) for name in manifest.OPTIONAL_COLUMNS},
        })
        run = f"{k:04d}{rng.bytes(6).hex()}"
        blob_hashes = hashes[new_idx]
        blob_sizes = sizes[new_idx]
        indexmod.write_index(repo, _index_rows(repo, run, blob_hashes, blob_sizes), run)
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
    ap.add_argument("--format", choices=sorted(CONFIGS), default="2")
    ap.add_argument("--only", choices=["list"], help="time only the listing")
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
    build(repo_dir, args.snapshots, args.files, fmt=args.format)
    built = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(repo_dir, "snapshots"))
               for f in fs)
    print(f"built {args.snapshots} format {args.format} manifests x {args.files:,} files in {built:.1f} s "
          f"({size / 2**20:.1f} MiB of manifests) at {repo_dir}", file=sys.stderr)

    rows = []

    def case(name, fn):
        secs, out = timed(fn, args.repeats)
        n = len(out) if hasattr(out, "__len__") and not isinstance(out, dict) else ""
        rows.append((name, f"{secs:.2f}", f"{n:,}" if n != "" else ""))
        print(f"{name}: {secs:.2f} s", file=sys.stderr)

    opened = Repository.open(repo_dir)           # unlocked once, as a long-lived process would be
    case("snapshots.list_snapshots", lambda: snapshots.list_snapshots(opened))
    case("load_snapshots", lambda: analysis.load_snapshots(opened))
    if not args.only:
        case("load_manifests columns=path,size", lambda: analysis.load_manifests(opened, columns=["path", "size"]))
        case("load_manifests columns=path,size,hash",
             lambda: analysis.load_manifests(opened, columns=["path", "size", "hash"]))
        case("load_manifests all columns", lambda: analysis.load_manifests(opened))
        case("load_manifests arrow=True columns=path,size",
             lambda: analysis.load_manifests(opened, columns=["path", "size"], arrow=True))
        case("duckdb (all columns) + one GROUP BY",
             lambda: analysis.duckdb(opened).sql(
                 "SELECT snapshot, count(*), sum(size) FROM entries GROUP BY snapshot").fetchall())
        case("repository_summary (keepflow stats)", lambda: analysis.repository_summary(opened))
        case("dedup_stats", lambda: analysis.dedup_stats(opened).per_snapshot)

    print(f"\nformat {args.format}, {args.snapshots} snapshots x {args.files:,} files, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, median of {args.repeats}\n")
    print("| call | seconds | rows |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| `{r[0]}` | {r[1]} | {r[2]} |")
    if not args.repo and not args.keep:
        shutil.rmtree(repo_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
