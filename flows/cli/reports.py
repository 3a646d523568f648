"""The text of the flow commands' summaries (``--json`` prints the summary itself).

Each ``print_*`` takes the summary dict a flow returned (and the command's
arguments where the text names them); it prints what was done on stdout, and
what went wrong, with what to do about it, on stderr. The exit code is the
summary's ``exit_code``; nothing here changes it.
"""

from __future__ import annotations

import sys

from keepflow.tasks.core.format import human_bytes


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def print_backup(summary: dict) -> None:
    if summary["dry_run"]:
        print(f"dry run: would store {human_bytes(summary['bytes_stored'])} "
              f"(read {human_bytes(summary['bytes_read'])}); nothing was written")
    else:
        parent = f" (parent {summary['parent'][:8]})" if summary["parent"] else ""
        print(f"snapshot {summary['snapshot'][:8]} saved{parent}")
    print(f"files: {summary['files_new']} new, {summary['files_changed']} changed, "
          f"{summary['files_unchanged']} unchanged, {summary['files_deleted']} deleted "
          f"({summary['files']} files, {human_bytes(summary['bytes'])})")
    objects = f" and {summary['objects_written']} objects" if summary["objects_written"] else ""
    print(f"read {human_bytes(summary['bytes_read'])}, stored {human_bytes(summary['bytes_stored'])} of new data, "
          f"{human_bytes(summary['bytes_written'])} written in {summary['packs_written']} packs{objects}")
    if summary["skipped"]:
        _err(f"skipped {len(summary['skipped'])} files:")
        for s in summary["skipped"][:50]:
            _err(f"  {s['path']}: {s['reason']}")
    if "replication" in summary:
        print_replication(summary["replication"])


def print_restore(summary: dict, args) -> None:
    verb = "would write" if args.dry_run else "wrote"
    print(f"restored snapshot {summary['snapshot'][:8]} into {args.target}: {verb} {summary['files_written']} files "
          f"({human_bytes(summary['bytes_written'])}), {summary['files_identical']} already identical, "
          f"{summary['files_kept']} kept")
    if len(summary["blobs_from"]) > 1 or summary["read_from"] != args.repo:
        print("blobs read from: " + ", ".join(f"{url} ({n})" for url, n in summary["blobs_from"].items()))
    for e in summary["errors"][:50]:
        _err(f"  {e['path']}: {e['reason']}")
    if summary["errors"]:
        _err(f"keepflow: error: {len(summary['errors'])} files could not be restored")


def print_replication(summary: dict) -> None:
    for o in summary["replicas"]:
        if not o["ok"]:
            _err(f"{o['replica']}: FAILED: {o['error']}")
        elif summary["dry_run"]:
            print(f"{o['replica']}: lacks {len(o['snapshots_missing'])} snapshots, {o['data_missing']} data objects "
                  f"({human_bytes(o['data_bytes_missing'])}), {o['index_missing']} index files")
        else:
            print(f"{o['replica']}: in step ({o['snapshots']} snapshots); copied {o['data_copied']} data objects "
                  f"({human_bytes(o['bytes_copied'])}), {o['index_copied']} index files, "
                  f"{o['snapshots_copied']} snapshots")
    if summary["failed"]:
        # The remedy follows the cause: only a server that is down is fixed by waiting.
        failed = [o for o in summary["replicas"] if not o["ok"]]
        remedy = ("run replicate again once they are reachable" if all(o.get("transient") for o in failed)
                  else "fix the cause given for each above, then run replicate again")
        _err(f"keepflow: error: {len(failed)} replicas failed: {', '.join(summary['failed'])}; {remedy}")


def print_verify(summary: dict) -> None:
    if summary.get("ciphertext_only"):
        print(f"ciphertext only (no key): {summary['snapshots']} snapshots, {summary['keys']} packs; every file "
              f"checked against its name, {summary['keys_read']} packs read whole "
              f"({human_bytes(summary['bytes_read'])}); tags and references were not checked")
    else:
        print(f"{summary['snapshots']} snapshots, {summary['blobs']} blobs in {summary['keys']} keys; "
              f"re-hashed {summary['keys_read']} keys ({human_bytes(summary['bytes_read'])})")
    for p in summary["problems"][:100]:
        where = ", ".join(p["paths"][:3]) + (" ..." if len(p["paths"]) > 3 else "")
        snaps = ", ".join(s[:8] for s in p["snapshots"][:5])
        _err(f"  {p['kind']}: {p['key'] or p['hash']}: {p['detail']}"
             + (f" (snapshots {snaps}; {where})" if p["snapshots"] else ""))
    if summary["problems"]:
        _err(f"keepflow: error: {len(summary['problems'])} problems found; restore affected files from a "
             "replica (--fallback) or run a new backup")
    else:
        print("no problems found")


def print_prune(summary: dict, args) -> None:
    verb = "would forget" if args.dry_run else "forgot"
    print(f"{verb} {len(summary['forgotten'])} snapshots, keeping {len(summary['kept'])}")
    for s in summary["forgotten"][:50]:
        print(f"  - {s['id'][:8]}  {s['time'][:19].replace('T', ' ')}  {s['source']}")
    m, w = summary["marked"], summary["swept"]
    print(f"{'would mark' if args.dry_run else 'marked'} {m['keys']} keys ({human_bytes(m['bytes'])}) unreferenced"
          + (f", repacked {m['repacked_packs']} packs" if m["repacked_packs"] else ""))
    if "postponed" in w:
        print(f"deletion postponed: {w['postponed']}")
    else:
        print(f"{'would delete' if args.dry_run else 'deleted'} {w['keys_deleted']} keys, "
              f"freeing {human_bytes(w['bytes_freed'])}; {w['marks_waiting']} marks wait for the "
              f"{args.grace:g} h grace period")
    for r in summary.get("replicas", []):
        if r["ok"]:
            print(f"replica {r['repository']}: forgot {r['forgotten']} snapshots, "
                  f"freed {human_bytes(r['bytes_freed'])}")
        else:
            _err(f"keepflow: error: prune of replica {r['repository']} failed: {r['error']}")


def print_unlock(removed, kept, crashed, elsewhere) -> None:
    print(f"removed {len(removed)} stale leases")
    for r in crashed:
        print(f"marked flow run {r.flow_run_name} Crashed ({r.flow}, pid {r.pid} is gone)")
    for held in kept:
        _err(f"kept live lease {held.id[:8]}: {held.kind} {held.source or ''} on {held.host} pid {held.pid}, "
             f"expires {held.expires[:19]} (wait for it to finish or expire)")
    for url in sorted({r.api_url or "" for r in elsewhere}):
        how = f"with PREFECT_API_URL={url}" if url else "without PREFECT_API_URL (the embedded server)"
        _err(f"left dead flow runs recorded in another Prefect API alone; run unlock again {how}")


def print_repair_index(summary: dict, args) -> None:
    _print_index_repair(summary, args.repo)
    lost = summary["lost"]
    if lost:
        files = sum(p["files"] for p in lost)
        _err(f"keepflow: error: {len(lost)} blobs are lost ({files} files in "
             f"{len({s for p in lost for s in p['snapshots']})} snapshots); run `keepflow repair snapshots "
             f"{args.repo}` to replace those snapshots by ones without the lost files")
    elif summary["exit_code"]:
        _err(f"keepflow: error: {len(summary['unreadable'])} unreadable keys, {len(summary['corrupt'])} corrupt "
             f"blobs, {len(summary['damaged_manifests'])} damaged manifests (left alone, listed above); "
             "restore what they hold from a replica")


def print_repair_snapshots(summary: dict, args) -> None:
    _print_index_repair(summary["index"], args.repo, brief=True)
    verb = "would replace" if args.dry_run else "replaced"
    print(f"{summary['snapshots']} snapshots checked, {summary['snapshots_damaged']} reference "
          f"{summary['blobs_lost']} lost blobs")
    for r in summary["replaced"]:
        print(f"{verb} snapshot {r['original'][:8]} by {r['replacement'][:8]} (tagged repaired): "
              f"dropped {r['files_dropped']} files")
    for f in summary["files_dropped"]:
        print(f"  dropped {f['snapshot'][:8]}: {f['path']}")
    for r in summary["already_replaced"]:
        print(f"snapshot {r['original'][:8]} was replaced before by {r['replacement'][:8]}")
    for snap in summary["forgotten"]:
        print(f"{'would forget' if args.dry_run else 'forgot'} snapshot {snap[:8]}")
    if summary["files_dropped"]:
        _err(f"keepflow: error: the content of {len(summary['files_dropped'])} files is lost; the replacement "
             "snapshots restore everything else (restore the lost files from a replica if one has them)")
    elif summary["already_replaced"] and not args.forget:
        _err(f"keepflow: error: {len(summary['already_replaced'])} replaced originals still reference lost data; "
             f"remove them with `keepflow repair snapshots {args.repo} --forget`")
    elif summary["exit_code"]:
        _err("keepflow: error: unreadable or corrupt data or damaged manifests were found (listed above, left "
             "alone); restore what they hold from a replica")


def _print_index_repair(s: dict, repo: str, brief: bool = False) -> None:
    verb = "would index" if s["dry_run"] else "indexed"
    print(f"{verb} {s['blobs_indexed']} blobs in {s['packs']} packs and {s['objects']} objects: "
          f"{s['blobs_found']} newly found, {s['rows_dropped']} old index rows dropped (their data is gone)")
    if s["index_written"]:
        print(f"wrote index/{s['index_written']}, then removed {s['index_files_removed']} old index files")
    elif not s["dry_run"]:
        print("the index was already complete: nothing written")
    if s["read_data"]:
        print(f"re-hashed {s['keys_read']} keys ({s['bytes_read']} bytes)")
    for kind in ("unreadable", "corrupt", "foreign", "index_files_unreadable", "damaged_manifests"):
        for p in s[kind]:
            _err(f"  {kind.replace('_', ' ')}: {p['key']}{' ' + p['hash'][:16] if p.get('hash') else ''}: "
                 f"{p['detail']}")
    if not brief:
        for p in s["lost"]:
            where = ", ".join(p["paths"][:3]) + (" ..." if len(p["paths"]) > 3 else "")
            _err(f"  lost {p['hash'][:16]}: {p['detail']} (snapshots {', '.join(x[:8] for x in p['snapshots'])}"
                 f"; {where})")
