"""What a 1 MiB overwrite inside a 100 MiB file costs to store: keepflow's chunker against restic's.

    python -m bench.format2_change_cost [--trials 40] [--restic-trials 10]

The change is ``bench.gentree change`` on the large tree: 1 MiB of new random
bytes written in place at a random offset of one 100 MiB random file. What
it stores again is every chunk of the new file that the old file did not
have, and that depends on the chunker's secret (a keyed table per keepflow
repository, a random polynomial per restic repository) and on the offset:
one run per repository tells little, so this draws many.

- keepflow: the format's chunker (``keepflow.tasks.core.chunker.Chunker``, FastCDC
  2020 512 KiB / 1 MiB / 8 MiB, NC 2, a random 32-byte key per trial) on the
  old and new bytes in memory; bytes to store = the new chunks' lengths (the
  data is incompressible: stored = raw + a 16-byte tag + a 41-byte header
  entry per chunk, left out). The same for NC 0, 1 and 3 on the same draws,
  for comparison only (NC is fixed by the format: changing it would stop new
  chunks from deduplicating against old ones).
- restic: ``restic init`` (a new polynomial), ``restic backup`` of the old
  file, the same overwrite, ``restic backup`` again; the repository's growth
  (its data packs, and all files: with its tree blob, index and snapshot).

Prints both distributions (mean, median, quartiles, max, in MiB) and the ratio
of the means. ``--out`` replaces the ``<!-- format2-change-cost -->``
section of that file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
SIZE = 100 * MiB
SECTION = "format2-change-cost"


def new_chunk_bytes(chunker, old: bytes, new: bytes) -> tuple[int, int]:
    """(bytes of chunks of ``new`` that ``old`` lacks, how many)."""
    def chunks(data):
        out, pos = [], 0
        for n in chunker.cut(data, final=True):
            out.append(hashlib.blake2b(data[pos: pos + n], digest_size=16).digest() + n.to_bytes(8, "little"))
            pos += n
        return out
    before = set(chunks(old))
    fresh = [c for c in chunks(new) if c not in before]
    return sum(int.from_bytes(c[16:], "little") for c in fresh), len(fresh)


def summary(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return (f"mean {statistics.mean(xs):.2f}, median {statistics.median(xs):.2f}, quartiles {q[0]:.2f}-{q[2]:.2f}, "
            f"max {max(xs):.2f} (n={len(xs)})")


def repo_size(path: str) -> tuple[int, int]:
    total = data = 0
    for folder, _, files in os.walk(path):
        for name in files:
            n = os.path.getsize(os.path.join(folder, name))
            total += n
            if os.path.relpath(folder, path).split(os.sep)[0] == "data":
                data += n
    return total, data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.format2_change_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=40, help="keepflow draws (key, offset)")
    p.add_argument("--restic-trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="write the results into this file's section")
    a = p.parse_args(argv)
    from keepflow.tasks.core.chunker import Chunker

    rng = random.Random(a.seed)
    base = hashlib.shake_128(b"keepflow-bench/format2-change-cost").digest(SIZE)
    draws = []
    for t in range(a.trials + a.restic_trials):
        offset = int(rng.random() * (SIZE - MiB))
        patch = hashlib.shake_128(f"change/{t}".encode()).digest(MiB)
        draws.append((offset, patch, bytes(rng.getrandbits(8) for _ in range(32))))
    results: dict[str, list[float]] = {f"nc{nc}": [] for nc in (2, 0, 1, 3)}
    counts: list[int] = []
    t0 = time.perf_counter()
    for offset, patch, key in draws[: a.trials]:
        new = base[:offset] + patch + base[offset + MiB:]
        for nc in (2, 0, 1, 3):
            stored, n = new_chunk_bytes(Chunker(key, nc=nc), base, new)
            results[f"nc{nc}"].append(stored / MiB)
            if nc == 2:
                counts.append(n)
    print(f"keepflow chunker, {a.trials} draws in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    restic_data, restic_all = [], []
    if a.restic_trials and shutil.which("restic"):
        work = tempfile.mkdtemp(prefix="kf-change-cost-",
                                dir="/work/bench-tmp" if os.path.isdir("/work/bench-tmp") else None)
        env = dict(os.environ, RESTIC_PASSWORD="keepflow-bench")
        try:
            src = os.path.join(work, "src")
            os.makedirs(src)
            for k, (offset, patch, _) in enumerate(draws[a.trials:]):
                path = os.path.join(src, "big.bin")
                with open(path, "wb") as f:
                    f.write(base)
                repo = os.path.join(work, f"repo{k}")
                def run(*args, repo=repo):
                    subprocess.run(["restic", "-r", repo, "--cache-dir", os.path.join(work, "cache"), *args],
                                   env=env, cwd=src, check=True, capture_output=True)
                run("init", "-q")
                run("backup", ".", "--quiet")
                before = repo_size(repo)
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(patch)
                run("backup", ".", "--quiet")
                after = repo_size(repo)
                restic_all.append((after[0] - before[0]) / MiB)
                restic_data.append((after[1] - before[1]) / MiB)
                shutil.rmtree(repo)
                print(f"restic trial {k + 1}: {restic_data[-1]:.2f} MiB data, {restic_all[-1]:.2f} MiB in all",
                      file=sys.stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    lines = [f"<!-- {SECTION} -->", "### What a 1 MiB overwrite inside a 100 MiB file stores", "",
             f"`.venv/bin/python -m bench.format2_change_cost --trials {a.trials} --restic-trials {a.restic_trials}` "
             f"on {time.strftime('%Y-%m-%d %H:%M %Z')}: the `bench.gentree change` edit of the large tree (1 MiB of "
             "new random bytes in place at a random offset of a random 100 MiB file), each draw with a new chunker "
             "secret (keepflow: a random key; restic: `restic init`). MiB stored again per change:", "",
             "| chunker | MiB stored per change |", "| --- | --- |",
             f"| keepflow format 2 (FastCDC 2020, NC 2, as specified) | {summary(results['nc2'])}; chunks "
             f"{statistics.mean(counts):.1f} on average, at most {max(counts)} |"]
    for nc in (0, 1, 3):
        lines.append(f"| same draws, NC {nc} (not the format: comparison only) | {summary(results[f'nc{nc}'])} |")
    if restic_data:
        lines += [f"| restic {subprocess.run(['restic', 'version'], capture_output=True, text=True).stdout.split()[1]}"
                  f" (data packs) | {summary(restic_data)} |",
                  f"| restic (every file it added: packs, index, snapshot) | {summary(restic_all)} |", "",
                  f"Ratio of the means, keepflow (chunks) / restic (data packs): "
                  f"**{statistics.mean(results['nc2']) / statistics.mean(restic_data):.2f}x**."]
    lines += ["", f"<!-- /{SECTION} -->"]
    text = "\n".join(lines)
    print(text)
    if a.out:
        old = Path(a.out).read_text() if os.path.exists(a.out) else ""
        pattern = re.compile(rf"<!-- {SECTION} -->.*?<!-- /{SECTION} -->", re.S)
        old = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
        Path(a.out).write_text(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
