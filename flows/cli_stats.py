"""``keepflow stats REPO [--json] [--last N]``: what a repository holds and how it grows.

Read-only, like ``snapshots``/``ls``/``diff``: it calls ``keepflow.tasks.core`` directly
(no Prefect, no pandas) and reads only the snapshot facts (format 2: each
manifest's small encrypted facts block; format 1: the Parquet footers), the
index and a listing of ``packs/`` (and format 1's ``objects/``), so it answers
in well under a second even for a long history. An encrypted repository
needs its password (``--password-file``, ``KEEPFLOW_PASSWORD``, ...). The
richer per-snapshot figures (stored bytes recomputed from the index with the
chunks of chunked files, churn, largest files) are in ``keepflow.tasks.core.analysis``
and the notebooks.
"""

from __future__ import annotations

import json
import sys


def add_stats_parser(sub) -> None:
    help_text = "repository statistics: snapshots, sizes, deduplication, recent growth"
    sp = sub.add_parser("stats", help=help_text, description=help_text)
    sp.add_argument("repo", metavar="REPO", help="repository path or fsspec URL")
    sp.add_argument("--last", type=int, default=10, metavar="N",
                    help="show growth over the last N snapshots (default 10)")
    sp.add_argument("--json", action="store_true", help="print one JSON object and nothing else")


def cmd_stats(args) -> int:
    from keepflow.tasks.core.analysis import repository_summary
    from keepflow.tasks.core.errors import UsageError
    from keepflow.tasks.core.format import human_bytes

    if args.last < 1:
        raise UsageError(f"--last must be at least 1, not {args.last}")
    s = repository_summary(args.repo, last=args.last)
    if args.json:
        sys.stdout.write(json.dumps(s, indent=2) + "\n")
        return 0

    ratio = f"{s['dedup_ratio']:.2f}x" if s["dedup_ratio"] else "-"
    if s["format"] >= 2:
        fmt = f"format {s['format']}, " + ("not encrypted" if s["encryption"] in (None, "none") else s["encryption"])
        stored = f"{human_bytes(s['stored_bytes'])} in {s['packs']:,} packs"
        blobs = (f"{s['blobs']:,} ({human_bytes(s['blob_bytes'])} stored, {human_bytes(s['blob_raw_bytes'])} "
                 f"before compression; {s['chunk_lists']:,} chunk list{'' if s['chunk_lists'] == 1 else 's'})")
    else:
        fmt = "format 1"
        stored = (f"{human_bytes(s['stored_bytes'])} ({s['packs']:,} packs {human_bytes(s['pack_bytes'])}, "
                  f"{s['objects']:,} objects {human_bytes(s['object_bytes'])})")
        blobs = f"{s['blobs']:,} ({human_bytes(s['blob_bytes'])})"
    lines = [
        ("repository", f"{s['repository']} ({s['id'][:8]}, {fmt})"),
        ("snapshots", f"{s['snapshots']}" + (f", {s['first'][:19].replace('T', ' ')} .. "
                                             f"{s['latest_time'][:19].replace('T', ' ')} UTC" if s["snapshots"] else "")),
        ("files", f"{s['files']:,} in the latest snapshot" + (f" ({s['latest'][:8]})" if s["latest"] else "")),
        ("logical size", f"{human_bytes(s['logical_bytes'])} latest, "
                         f"{human_bytes(s['logical_bytes_all'])} all snapshots together"),
        ("stored size", stored),
        ("blobs", blobs),
        ("dedup ratio", f"{ratio} (all snapshots' logical size / stored size)"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")

    g = s["growth"]
    if not g["rows"]:
        return 0
    since = f"since {g['from'][:8]}" if g["from"] else "since the first"
    print(f"\ngrowth over the last {g['snapshots']} snapshots ({since}): "
          f"{_signed(g['files_delta'])} files, {_signed_bytes(g['logical_bytes_delta'], human_bytes)} logical, "
          f"{human_bytes(g['stored_bytes_added'])} of new data stored, {human_bytes(g['written_bytes_added'])} written")
    rows = [("ID", "TIME", "FILES", "SIZE", "+NEW", "~CHANGED", "-DELETED", "STORED", "WRITTEN")]
    for r in g["rows"]:
        rows.append((r["id"][:8], r["time"][:19].replace("T", " "), f"{r['files']:,}", human_bytes(r["bytes"]),
                     f"{r['added']:,}", f"{r['changed']:,}", f"{r['deleted']:,}", human_bytes(r["bytes_stored"]),
                     human_bytes(r["bytes_written"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return 0


def _signed(n: int) -> str:
    return f"+{n:,}" if n >= 0 else f"{n:,}"


def _signed_bytes(n: int, human_bytes) -> str:
    return f"+{human_bytes(n)}" if n >= 0 else f"-{human_bytes(-n)}"
