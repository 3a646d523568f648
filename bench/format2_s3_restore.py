"""Restore of chunked files from S3: one range GET per chunk against one per span of adjacent chunks.

    python -m bench.format2_s3_restore [--files 4] [--repeats 2]

Starts SeaweedFS (``weed mini`` on 127.0.0.1, the tests' fixture class),
backs up ``--files`` files of ``bench.gentree large`` (100 MiB each, random)
into an encrypted format 2 repository there through the core steps (no
Prefect), then restores the snapshot into fresh local folders, alternately
with ``restore_chunks.SPAN_BYTES`` as shipped (adjacent chunks of one pack
read together, up to 8 MiB) and set to 0 (one range read per chunk, as
before), ``--repeats`` times each. Prints wall time, the server's GET count
and the client's operations per restore, and checks every restored file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import gentree
from tests import core_helpers
from tests.servers import S3RequestCounter, SeaweedS3

os.environ.setdefault("KEEPFLOW_PASSWORD", "keepflow-bench")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.format2_s3_restore", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    from keepflow.tasks.core import restore_chunks
    from keepflow.tasks.core.repository import Repository

    shipped = restore_chunks.SPAN_BYTES
    work = tempfile.mkdtemp(prefix="keepflow-s3restore-",
                            dir="/work/bench-tmp" if os.path.isdir("/work/bench-tmp") else None)
    src = os.path.join(work, "large")
    gentree.generate("large", src, n_files=a.files)
    server = SeaweedS3()
    server.start()
    rows: dict[str, list] = {"span": [], "chunk": []}
    try:
        url = server.url(f"restore-{int(time.time())}")
        so = server.storage_options
        Repository.init(url, so, password=os.environ["KEEPFLOW_PASSWORD"])
        t0 = time.perf_counter()
        core_helpers.backup(src, url, storage_options=so)
        print(f"backup of {a.files} x 100 MiB: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        expected = gentree.list_files(src)
        n = 0
        for r in range(a.repeats):
            for mode in (("span", "chunk") if r % 2 == 0 else ("chunk", "span")):
                restore_chunks.SPAN_BYTES = shipped if mode == "span" else 0
                n += 1
                target = os.path.join(work, f"out{n}")
                before = server.s3_request_counts()
                t0 = time.perf_counter()
                with S3RequestCounter() as client:
                    _, _, errors = core_helpers.restore(url, target, storage_options=so)
                seconds = time.perf_counter() - t0
                gets = server.s3_request_counts().get("GET", 0) - before.get("GET", 0)
                ok = not errors and gentree.list_files(target) == expected and all(
                    Path(src, rel).read_bytes() == Path(target, rel).read_bytes()
                    for rel, _ in expected)
                rows[mode].append((seconds, gets, dict(client.counts), ok))
                print(f"{mode:5s} r{r + 1}: {seconds:.2f} s, server GET {gets}, client {dict(client.counts)}, "
                      f"{'OK' if ok else 'WRONG ' + str(errors[:3])}; "
                      f"load {Path('/proc/loadavg').read_text().split()[0]}",
                      file=sys.stderr)
                shutil.rmtree(target, ignore_errors=True)
    finally:
        restore_chunks.SPAN_BYTES = shipped
        server.stop()
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    for mode, label in (("chunk", "one range GET per chunk (SPAN_BYTES = 0)"),
                        ("span", f"adjacent chunks together (SPAN_BYTES = {shipped >> 20} MiB)")):
        xs = rows[mode]
        if xs:
            print(f"| {label} | {statistics.median(x[0] for x in xs):.2f} s "
                  f"[{min(x[0] for x in xs):.2f}-{max(x[0] for x in xs):.2f}] | {xs[0][1]} | "
                  f"{'all OK' if all(x[3] for x in xs) else 'WRONG'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
