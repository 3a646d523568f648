"""Where a format 2 backup spends its time: per stage, and in the real code under cProfile.

    python -m bench.format2_profile stages FILE            # one large file, each stage alone
    python -m bench.format2_profile store SRC [--threads 2] [--cprofile N] [--repo DIR]
    python -m bench.format2_profile restore REPO TARGET [--threads 2] [--cprofile N]

``stages`` reads FILE (e.g. one 100 MiB file of ``bench.gentree large``) and
times, one after the other on one thread, every step format 2 applies to it
(ARCHITECTURE.md, "Repository format 2 (specification)"): read in windows,
``perm`` (pyarrow take), the cut (pyfastcdc), ``Chunker.iter_chunks`` as
backup calls it, the keyed BLAKE3 id of every chunk, zstd level 3 of every
chunk, AES-256-GCM of every payload, the pack's deterministic salt and name
(two more BLAKE3 passes), the join of each 16 MiB pack's parts and the write.
CPU and wall milliseconds per MiB, the least of ``--repeats`` runs (CPU time
is what the step costs; wall time also shows how much the shared machine
took away).

``store`` runs a backup's core steps in this process without Prefect
(``core.backup.prepare``, every ``store_range`` on a thread pool of
``--threads`` like the flow's, ``commit``) into a fresh encrypted format 2
repository, and prints wall time per step, the process's CPU time, and with
``--cprofile N`` the N most expensive functions (cumulative, then own time)
of the store step. cProfile sees only the thread that runs it, so with
``--cprofile`` the batches run on one thread (the profile of what the main
thread does, not of the pool's threads; the wall time is then not the
flow's). ``restore`` does the same for ``core.restore``.

The password is ``KEEPFLOW_PASSWORD`` or ``keepflow-bench``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1024 * 1024


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn()``: the least of ``repeats`` runs each (the machine is shared)."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return min(cpu), min(wall)


def stages(path: str, repeats: int) -> None:
    """Every step of storing ``path`` as format 2 does, one at a time on one thread, one chunk
    (or one pack) at a time as backup does, so memory is reused as it is there."""
    import blake3
    import pyarrow as pa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keepflow.tasks.core import compress, store_v2
    from keepflow.tasks.core.chunker import Chunker

    store_v2.tune_malloc()            # as a backup that stores large files does
    MiB_ = MiB
    ch = Chunker(bytes(range(32)))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    view, win = memoryview(data), pa.py_buffer(data)
    lengths = [c.length for c in ch._cdc.cut_buf(ch._permute_window(win, size))]
    chunks, off = [], 0
    for n in lengths:
        chunks.append(view[off: off + n])
        off += n
    raw = [bytes(c) for c in chunks]
    key = bytes(32)
    aes = AESGCM(key)
    payloads = [compress.compress(c, "auto")[0] for c in raw]
    enc = [aes.encrypt(i.to_bytes(12, "big"), p, bytes(41)) for i, p in enumerate(payloads)]
    packs, cur, n = [], [], 0
    for e in enc:                                   # 16 MiB packs, as PackWriter fills them
        cur.append(e)
        n += len(e)
        if n >= 16 * MiB_:
            packs.append(cur)
            cur, n = [], 0
    if cur:
        packs.append(cur)
    out_dir = tempfile.mkdtemp(prefix="kf-stage-", dir=os.path.dirname(os.path.abspath(path)))
    written = [0]

    def each(items, fn):              # one result alive at a time, as in the pipeline
        for x in items:
            fn(x)

    def read_windows():
        fd = os.open(path, os.O_RDONLY)
        buf = memoryview(bytearray(16 * MiB_))
        try:
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)

    def permute():
        for i in range(0, size, 16 * MiB_):
            n = min(16 * MiB_, size - i)
            ch._permute_window(win.slice(i, n), n)

    perm = ch._permute_window(win, size)

    def salt():
        h = blake3.blake3(b"KFPACK02", key=key)
        for p in payloads:
            h.update(p)
        h.digest()

    def name():
        for pk in packs:
            h = blake3.blake3()
            for e in pk:
                h.update(e)
            h.digest()

    def write(join: bool):
        for pk in packs:
            written[0] += 1
            fd = os.open(os.path.join(out_dir, f"p{written[0]}"), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"".join(pk)) if join else os.writev(fd, pk)
            finally:
                os.close(fd)

    def iter_into():
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in ch.iter_chunks(readinto=lambda mv: os.readv(fd, [mv])):
                pass
        finally:
            os.close(fd)

    rows = [
        ("read in 16 MiB windows (os.readv, page cache)", read_windows),
        ("permute (pyarrow take, 16 MiB windows)", permute),
        ("cut (pyfastcdc over the permuted bytes)", lambda: [c.length for c in ch._cdc.cut_buf(perm)]),
        ("Chunker.iter_chunks(readinto=os.readv): read + permute + cut", iter_into),
        ("copy a chunk stored raw (bytes(view))", lambda: each(chunks, bytes)),
        ("keyed BLAKE3 id of each chunk", lambda: each(chunks, lambda c: blake3.blake3(c, key=key).digest())),
        ("zstd level 3 of each chunk (+ the 1/32 test)", lambda: each(raw, lambda c: compress.compress(c, "auto"))),
        ("AES-256-GCM of each payload", lambda: each(range(len(payloads)), lambda i: aes.encrypt(
            i.to_bytes(12, "big"), payloads[i], bytes(41)))),
        ("pack salt: keyed BLAKE3 over the payloads", salt),
        ("pack name: BLAKE3 over the stored bytes", name),
        ("join each 16 MiB pack (b''.join)", lambda: each(packs, b"".join)),
        ("join + write each pack to a new file", lambda: write(True)),
        ("writev each pack's parts to a new file (no join)", lambda: write(False)),
    ]
    results = [(label, *_timed(fn, repeats)) for label, fn in rows]
    for name_ in os.listdir(out_dir):
        os.unlink(os.path.join(out_dir, name_))
    os.rmdir(out_dir)
    mib = size / MiB_
    print(f"{path}: {mib:.0f} MiB, {len(lengths)} chunks (mean {size / len(lengths) / MiB_:.2f} MiB), "
          f"zstd output {sum(len(p) for p in payloads) / size:.4f} of raw; least of {repeats} runs; "
          f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("| stage | CPU ms per MiB | wall ms per MiB |\n| --- | ---: | ---: |")
    for label, cpu, wall in results:
        print(f"| {label} | {cpu * 1000 / mib:.3f} | {wall * 1000 / mib:.3f} |")


def _password() -> None:
    os.environ.setdefault("KEEPFLOW_PASSWORD", "keepflow-bench")


def _profiled(fn, n: int):
    if not n:
        return fn(), ""
    prof = cProfile.Profile()
    result = prof.runcall(fn)
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("cumulative").print_stats(n)
    st.sort_stats("tottime").print_stats(n)
    return result, out.getvalue()


def store(src: str, threads: int, n: int, repo_dir: str | None) -> None:
    _password()
    import resource

    from keepflow.tasks.core import backup
    from keepflow.tasks.core.repository import Repository

    repo = repo_dir or tempfile.mkdtemp(prefix="kf-profile-", dir="/work/bench-tmp")
    if os.path.exists(os.path.join(repo, "keepflow.json")):
        raise SystemExit(f"{repo} already holds a repository: give a fresh --repo")
    Repository.init(repo, password=os.environ["KEEPFLOW_PASSWORD"])
    c0, t0 = time.process_time(), time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    plan = backup.prepare(src, repo).to_dict()
    t1 = time.perf_counter()
    batches = range(len(plan["batches"]))

    def run_store():
        if n or threads == 1:
            return [backup.store_range(plan, b) for b in batches]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda b: backup.store_range(plan, b), batches))

    summaries, report = _profiled(run_store, n)
    t2 = time.perf_counter()
    backup.commit(plan, summaries)
    t3 = time.perf_counter()
    c1 = time.process_time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stored = sum(s.bytes_stored for s in summaries)
    read = sum(s.bytes_read for s in summaries)
    print(f"store {src} -> {repo}: {len(summaries)} batches, {read / MiB:.0f} MiB read, {stored / MiB:.0f} MiB "
          f"stored; prepare {t1 - t0:.2f} s, store {t2 - t1:.2f} s "
          f"({'1 thread, cProfile' if n else f'{threads} threads'}), "
          f"commit {t3 - t2:.2f} s, total {t3 - t0:.2f} s wall, {c1 - c0:.2f} s CPU (all threads: user "
          f"{ru1.ru_utime - ru0.ru_utime:.2f} s, sys {ru1.ru_stime - ru0.ru_stime:.2f} s, "
          f"{ru1.ru_minflt - ru0.ru_minflt:,} minor page faults); "
          f"load {Path('/proc/loadavg').read_text().split()[:3]}")
    if report:
        print(report)
    if not repo_dir:
        shutil.rmtree(repo, ignore_errors=True)     # 2 GiB per run of the large tree


def restore_cmd(repo: str, target: str, threads: int, n: int) -> None:
    _password()
    import resource

    from keepflow.tasks.core import restore

    c0, t0 = time.process_time(), time.perf_counter()
    plan = restore.prepare(repo, target).to_dict()
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    batches = range(len(plan["batches"]))

    def run():
        if n or threads == 1:
            return [restore.restore_range(plan, b) for b in batches]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda b: restore.restore_range(plan, b), batches))

    results, report = _profiled(run, n)
    t2 = time.perf_counter()
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    restore.finish(plan)
    restore.cleanup(plan)
    t3 = time.perf_counter()
    errors = sum(len(r.errors) for r in results)
    print(f"restore {repo} -> {target}: prepare {t1 - t0:.2f} s, batches {t2 - t1:.2f} s "
          f"(user {ru2.ru_utime - ru1.ru_utime:.2f} s, sys {ru2.ru_stime - ru1.ru_stime:.2f} s; "
          f"{sum(r.written for r in results):,} files written, {errors} errors), finish {t3 - t2:.2f} s, "
          f"total {t3 - t0:.2f} s wall, {time.process_time() - c0:.2f} s CPU; "
          f"load {Path('/proc/loadavg').read_text().split()[:3]}")
    if report:
        print(report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.format2_profile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stages")
    s.add_argument("file")
    s.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("store")
    s.add_argument("src")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--cprofile", type=int, default=0, metavar="N")
    s.add_argument("--repo")
    s = sub.add_parser("restore")
    s.add_argument("repo")
    s.add_argument("target")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--cprofile", type=int, default=0, metavar="N")
    a = p.parse_args(argv)
    if a.cmd == "stages":
        stages(a.file, a.repeats)
    elif a.cmd == "store":
        store(a.src, a.threads, a.cprofile, a.repo)
    else:
        restore_cmd(a.repo, a.target, a.threads, a.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
