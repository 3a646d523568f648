"""Request cost on S3: a backup of the bench tree into SeaweedFS, counted at the server.

    python -m bench.s3_requests [--files 100000] [--out bench/RESULTS.md]

Generates the small bench tree (bench.gentree), starts SeaweedFS on
127.0.0.1 (the tests' fixture class, telemetry off), and runs a first
backup, a no-change backup and a 1%-changed backup through the core (the
same code the flow's tasks run). Counts come from SeaweedFS's Prometheus
counter by request type (HEAD is counted under GET there) and from a client
side counter of botocore operations. The section between the
``<!-- s3-requests -->`` markers of RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from bench import gentree
from tests import core_helpers
from tests.servers import S3RequestCounter, SeaweedS3

MARK_START, MARK_END = "<!-- s3-requests -->", "<!-- /s3-requests -->"


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            if after.get(k, 0) - before.get(k, 0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=gentree.SMALL_FILES)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="keepflow-s3bench-", dir="/work" if os.path.isdir("/work") else None)
    src = os.path.join(work, "small")
    gentree.generate("small", src, n_files=args.files)
    server = SeaweedS3()
    server.start()
    rows = []
    try:
        url = server.url(f"bench-{int(time.time())}")
        so = server.storage_options
        for name, prepare in (("first backup", None), ("no-change backup", None),
                              ("1%-changed backup", lambda: gentree.apply_change(src))):
            if prepare:
                prepare()
            before = server.s3_request_counts()
            started = time.perf_counter()
            with S3RequestCounter() as client:
                committed, _, summaries = core_helpers.backup(src, url, storage_options=so)
            seconds = time.perf_counter() - started
            rows.append((name, delta(server.s3_request_counts(), before), dict(client.counts),
                         sum(s.packs_written for s in summaries), committed.info.bytes_stored, seconds))
            print(name, rows[-1], file=sys.stderr)
    finally:
        server.stop()
        server.cleanup()
    lines = [MARK_START, "", f"### S3 requests for a backup of the bench tree ({args.files:,} files)", "",
             f"`python -m bench.s3_requests` on {time.strftime('%Y-%m-%d')}: SeaweedFS `weed mini` on 127.0.0.1, "
             "backups through the core steps the flow's tasks run (no Prefect server involved). Server counts "
             "from `SeaweedFS_s3_request_total` (HEAD is counted as GET); client counts are botocore operations.", "",
             "| backup | server PUT | server GET | server LIST | other (server) | client operations | packs | stored "
             "| time |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for name, server_counts, client_counts, packs, stored, seconds in rows:
        other = ", ".join(f"{k} {v}" for k, v in server_counts.items() if k not in ("PUT", "GET", "LIST"))
        client_text = ", ".join(f"{k} {v}" for k, v in sorted(client_counts.items()))
        lines.append(f"| {name} | {server_counts.get('PUT', 0)} | {server_counts.get('GET', 0)} | "
                     f"{server_counts.get('LIST', 0)} | {other or '-'} | {client_text} | {packs} | "
                     f"{stored / 2**20:.1f} MiB | {seconds:.1f} s |")
    lines += ["", MARK_END]
    section = "\n".join(lines)
    text = Path(args.out).read_text() if os.path.exists(args.out) else ""
    if MARK_START in text:
        text = re.sub(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    Path(args.out).write_text(text)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
