"""What commands print: the one JSON writer, and the text of the read-only commands.

``--json`` prints exactly one JSON document on stdout (``print_json``: two-space
indent, anything not JSON-native as its ``str``) and nothing else on stdout.
Without it, text for people: tables with columns padded to the widest cell,
sizes through ``human_bytes``. Warnings and errors go to stderr. The text of
the flow commands' summaries is in ``reports.py``. Nothing here imports
Prefect or pandas.
"""

from __future__ import annotations

import json
import sys


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_rows(rows, right_from: int | None = None) -> None:
    """``rows`` as columns padded to their widest cell; columns from ``right_from`` on right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())


def _time(iso: str) -> str:
    return iso[:19].replace("T", " ")


def print_init(repo, url: str) -> None:
    kind = ("plaintext" if repo.version < 2 else
            "encrypted" if repo.encrypted else "not encrypted")
    print(f"created keepflow repository {repo.config.id[:8]} at {url} (format {repo.version}, {kind})")


def print_snapshots(snaps, damaged) -> None:
    from keepflow.tasks.core.format import human_bytes

    rows = [("ID", "TIME", "HOST", "SOURCE", "FILES", "SIZE", "TAGS")]
    for s in snaps:
        rows.append((s.short_id, _time(s.time), s.host, s.source, str(s.files),
                     human_bytes(s.bytes), ",".join(s.tags)))
    print_rows(rows)
    print(f"{len(snaps)} snapshots" + (f", {len(damaged)} unreadable" if damaged else ""))


def print_ls(table) -> None:
    import datetime as dt
    import stat

    out = sys.stdout
    for row in table.to_pylist():
        when = dt.datetime.fromtimestamp(row["mtime_ns"] / 1e9).strftime("%Y-%m-%d %H:%M")
        name = row["path"] + ("/" if row["type"] == "dir" else "")
        if row["type"] == "symlink":
            name += f" -> {row['link_target']}"
        out.write(f"{stat.filemode(row['mode'] or 0)} {row['size']:>12} {when}  {name!s}\n")


def print_diff(result: dict) -> None:
    for kind, mark in (("added", "+"), ("modified", "M"), ("deleted", "-")):
        for row in result[kind]:
            print(f"{mark} {row['path']}  ({row['size']} bytes)")
    c = result["summary"]
    print(f"{c['added']} added, {c['modified']} modified, {c['deleted']} deleted")


def print_replicas(statuses) -> None:
    from keepflow.tasks.core.format import human_bytes

    for s in statuses:
        if not s.exists:
            print(f"{s.replica}: no replica yet (lacks all {len(s.snapshots_missing)} snapshots, "
                  f"{human_bytes(s.data_bytes_missing)})")
            continue
        state = "in step" if not (s.snapshots_missing or s.data_missing or s.index_missing) else "behind"
        print(f"{s.replica}: {state}: has {len(s.snapshots_present)} snapshots, lacks {len(s.snapshots_missing)}"
              f" ({s.data_missing} data objects, {human_bytes(s.data_bytes_missing)})"
              + (f"; {len(s.damaged)} damaged objects" if s.damaged else ""))
        for snap in s.snapshots_missing[:20]:
            print(f"  missing {snap}")


def print_stats(s: dict) -> None:
    from keepflow.tasks.core.format import human_bytes

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
        ("snapshots", f"{s['snapshots']}" + (f", {_time(s['first'])} .. {_time(s['latest_time'])} UTC"
                                             if s["snapshots"] else "")),
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
        return
    since = f"since {g['from'][:8]}" if g["from"] else "since the first"
    print(f"\ngrowth over the last {g['snapshots']} snapshots ({since}): "
          f"{_signed(g['files_delta'])} files, {_signed_bytes(g['logical_bytes_delta'], human_bytes)} logical, "
          f"{human_bytes(g['stored_bytes_added'])} of new data stored, {human_bytes(g['written_bytes_added'])} written")
    rows = [("ID", "TIME", "FILES", "SIZE", "+NEW", "~CHANGED", "-DELETED", "STORED", "WRITTEN")]
    for r in g["rows"]:
        rows.append((r["id"][:8], _time(r["time"]), f"{r['files']:,}", human_bytes(r["bytes"]),
                     f"{r['added']:,}", f"{r['changed']:,}", f"{r['deleted']:,}", human_bytes(r["bytes_stored"]),
                     human_bytes(r["bytes_written"])))
    print_rows(rows, right_from=2)


def _signed(n: int) -> str:
    return f"+{n:,}" if n >= 0 else f"{n:,}"


def _signed_bytes(n: int, human_bytes) -> str:
    return f"+{human_bytes(n)}" if n >= 0 else f"-{human_bytes(-n)}"


def print_key(out: dict) -> None:
    action = out["action"]
    if action == "list":
        for k in out["keys"]:
            params = ", ".join(f"{p}={k[p]}" for p in ("t", "m", "p", "n", "r") if p in k)
            mark = "*" if k["current"] else " "
            print(f"{mark} {k['id']}  {k['created'] or '?':25}  {k['kdf'] or '?'} {params}"
                  + (f"  DAMAGED: {k['problem']}" if k["problem"] else ""))
        print(f"{len(out['keys'])} key file(s); * opens with the password given")
    elif action == "add":
        print(f"added key {out['added']}")
    elif action == "remove":
        print(f"removed key {out['removed']}")
    else:
        print(f"password changed: key {out['removed']} replaced by {out['added']}")
