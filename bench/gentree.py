"""Reproducible benchmark trees.

    python -m bench.gentree small DEST      # 100,000 files of ~4 KiB in 1,000 folders (~390 MiB)
    python -m bench.gentree large DEST      # 20 files of 100 MiB (2 GiB)
    python -m bench.gentree change DEST     # the reproducible "1% change", applied in place

Everything is derived from a seed with the standard library only, so the same seed gives
byte-identical trees on any machine and any Python 3.9+:

- layout and sizes come from ``random.Random(seed).random()`` (the one method whose sequence
  Python guarantees across versions), turned into integers here rather than with
  ``randrange``/``choice`` whose algorithms may change;
- file contents are ``shake_128(b"keepflow-bench/<seed>/<relative path>")`` output of the
  file's size: incompressible, unique per file (no accidental de-duplication), and
  independent of the order in which files are written.

Only the contents and names are reproducible; mtimes are whatever the clock says when the
tree is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

KiB = 1024
MiB = 1024 * KiB

SMALL_FILES = 100_000
SMALL_TOP = 20  # top-level folders
SMALL_SUB = 49  # sub-folders in each top-level folder -> 20 + 20 * 49 = 1,000 folders
SMALL_MIN, SMALL_SPAN = 1 * KiB, 6 * KiB  # sizes uniform in [1 KiB, 7 KiB): mean 4 KiB

LARGE_FILES = 20
LARGE_SIZE = 100 * MiB

DEFAULT_SEED = 20240601
CHANGE_SEED = 7
CHUNK = 8 * MiB


def _randint(rng: random.Random, n: int) -> int:
    """An integer in [0, n) from ``rng.random()`` only (stable across Python versions)."""
    return min(int(rng.random() * n), n - 1)


def content(seed: int, rel: str, size: int, salt: str = "") -> bytes:
    """Deterministic incompressible bytes for one file (or one change of it)."""
    return hashlib.shake_128(f"keepflow-bench/{seed}/{salt}{rel}".encode()).digest(size)


@dataclass
class TreeStats:
    kind: str
    root: str
    seed: int
    files: int = 0
    folders: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class ChangeStats:
    root: str
    seed: int
    modified: int = 0
    added: int = 0
    deleted: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    sample_modified: list = field(default_factory=list)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def small_layout(seed: int, n_files: int = SMALL_FILES, size_min: int = SMALL_MIN, size_span: int = SMALL_SPAN):
    """(folders, [(relative path, size)]) of the small tree, fully determined by the seed
    (sizes uniform in [size_min, size_min + size_span))."""
    folders = []
    for t in range(SMALL_TOP):
        top = f"d{t:02d}"
        folders.append(top)
        folders.extend(f"{top}/s{s:02d}" for s in range(SMALL_SUB))
    rng = random.Random(seed)
    files = []
    for i in range(n_files):
        folder = folders[_randint(rng, len(folders))]
        size = size_min + _randint(rng, size_span)
        files.append((f"{folder}/f{i:06d}.dat", size))
    return folders, files


def large_layout(seed: int, n_files: int = LARGE_FILES, size: int = LARGE_SIZE):
    folders = ["part1", "part2", "part2/sub"]
    files = []
    for i in range(n_files):
        folder = "part1" if i < n_files // 2 else "part2/sub"
        files.append((f"{folder}/big{i:02d}.bin", size))
    return folders, files


def _write_large(args) -> int:
    root, seed, rel, size = args
    # shake_128 cannot stream an arbitrary-length output in pieces without recomputing, and
    # one 100 MiB digest is fast (~400 MB/s) and fits in memory, so write it in one go.
    _write(os.path.join(root, rel), content(seed, rel, size))
    return size


def generate(kind: str, root: str, seed: int = DEFAULT_SEED, n_files: int | None = None,
             large_size: int = LARGE_SIZE, jobs: int | None = None,
             small_sizes: tuple[int, int] = (SMALL_MIN, SMALL_MIN + SMALL_SPAN)) -> TreeStats:
    """Write the tree under ``root`` (which must not exist or be empty).

    ``small_sizes``: the small tree's [min, max) file size (the scale runs use
    tiny files for 5M-file trees: memory costs are per file, and 4 KiB files
    would need 20 GB per copy)."""
    t0 = time.perf_counter()
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(f"{root} is not empty; benchmarks write into fresh folders")
    if kind == "small":
        if not 0 <= small_sizes[0] < small_sizes[1]:
            raise ValueError(f"small_sizes must be [min, max) with 0 <= min < max, not {small_sizes}")
        folders, files = small_layout(seed, n_files or SMALL_FILES, small_sizes[0], small_sizes[1] - small_sizes[0])
    elif kind == "large":
        folders, files = large_layout(seed, n_files or LARGE_FILES, large_size)
    else:
        raise ValueError(f"unknown tree kind {kind!r} (small or large)")
    os.makedirs(root, exist_ok=True)
    for d in folders:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    total = 0
    if kind == "small":
        for rel, size in files:
            _write(os.path.join(root, rel), content(seed, rel, size))
            total += size
    else:
        jobs = jobs or os.cpu_count() or 1
        work = [(root, seed, rel, size) for rel, size in files]
        if jobs > 1:
            with ProcessPoolExecutor(jobs) as pool:
                total = sum(pool.map(_write_large, work))
        else:
            total = sum(map(_write_large, work))
    return TreeStats(kind, root, seed, len(files), len(folders), total,
                     time.perf_counter() - t0)


def list_files(root: str) -> list[tuple[str, int]]:
    """Sorted (relative POSIX path, size) of every regular file under root."""
    out = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir)) as it:
            for e in it:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif e.is_file(follow_symlinks=False):
                    out.append((rel, e.stat(follow_symlinks=False).st_size))
    out.sort()
    return out


def _sample(rng: random.Random, n: int, k: int) -> list[int]:
    """k distinct indices of range(n), partial Fisher-Yates on rng.random() only."""
    idx = list(range(n))
    k = min(k, n)
    for i in range(k):
        j = i + _randint(rng, n - i)
        idx[i], idx[j] = idx[j], idx[i]
    return idx[:k]


def apply_change(root: str, fraction: float = 0.01, seed: int = CHANGE_SEED) -> ChangeStats:
    """The reproducible "1% change", applied in place.

    Given the same tree it always does the same thing:
    - modifies ``max(1, round(n * fraction))`` files in place (``open r+b``, same inode):
      small files get up to 1 KiB overwritten at a random offset, and every fourth one also
      grows by 100 bytes; large files (>= 1 MiB) get 1 MiB overwritten at a random offset;
    - adds ``round(n * fraction / 10)`` new files next to existing ones, sized like them;
    - deletes ``round(n * fraction / 10)`` files that were not modified.
    For the small tree that is 1,000 modified, 100 added, 100 deleted; for the large tree one
    100 MiB file gets 1 MiB rewritten.
    """
    t0 = time.perf_counter()
    files = list_files(root)
    n = len(files)
    if not n:
        raise FileNotFoundError(f"no files under {root}")
    rng = random.Random(seed)
    n_mod = max(1, round(n * fraction))
    n_add = round(n * fraction / 10)
    n_del = round(n * fraction / 10)
    picked = _sample(rng, n, n_mod + n_del)
    st = ChangeStats(root, seed)
    for i in picked[:n_mod]:
        rel, size = files[i]
        path = os.path.join(root, rel)
        if size >= MiB:
            length = MiB
            offset = _randint(rng, size - length + 1)
            grow = 0
        else:
            length = min(size, 256 + _randint(rng, 769)) if size else 0
            offset = _randint(rng, size - length + 1) if size else 0
            grow = 100 if st.modified % 4 == 3 else 0
        with open(path, "r+b") as f:
            if length:
                f.seek(offset)
                f.write(content(seed, rel, length, salt="change/"))
            if grow:
                f.seek(0, os.SEEK_END)
                f.write(content(seed, rel, grow, salt="grow/"))
        st.modified += 1
        st.bytes_written += length + grow
        if len(st.sample_modified) < 5:
            st.sample_modified.append(rel)
    for i in picked[n_mod:]:
        os.unlink(os.path.join(root, files[i][0]))
        st.deleted += 1
    for a in range(n_add):
        rel_like, size_like = files[_randint(rng, n)]
        folder = rel_like.rsplit("/", 1)[0] if "/" in rel_like else ""
        rel = f"{folder}/new{seed}_{a:05d}.dat" if folder else f"new{seed}_{a:05d}.dat"
        _write(os.path.join(root, rel), content(seed, rel, size_like, salt="new/"))
        st.added += 1
        st.bytes_written += size_like
    st.seconds = time.perf_counter() - t0
    return st


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gentree", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["small", "large", "change"])
    p.add_argument("dest")
    p.add_argument("--seed", type=int, default=None,
                   help=f"default {DEFAULT_SEED} for trees, {CHANGE_SEED} for change")
    p.add_argument("--files", type=int, default=None, help="override the number of files (smoke tests)")
    p.add_argument("--fraction", type=float, default=0.01, help="change: fraction of files modified")
    p.add_argument("--sizes", default=f"{SMALL_MIN}:{SMALL_MIN + SMALL_SPAN}",
                   help="small tree: MIN:MAX file sizes in bytes (default 1024:7168)")
    a = p.parse_args(argv)
    if a.kind == "change":
        st = apply_change(a.dest, a.fraction, CHANGE_SEED if a.seed is None else a.seed)
    else:
        lo, hi = (int(x) for x in a.sizes.split(":"))
        if not 0 <= lo < hi:
            p.error(f"--sizes MIN:MAX needs 0 <= MIN < MAX, not {a.sizes}")
        st = generate(a.kind, a.dest, DEFAULT_SEED if a.seed is None else a.seed, a.files, small_sizes=(lo, hi))
    print(json.dumps(asdict(st)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
