"""The repair flow: rebuild the index from the data, or replace snapshots that lost data.

``what="index"``: one ``rebuild-index`` task run (tasks/core/repair.py): the
index is rebuilt from the packs' trailers and the objects (format 2: the
packs' encrypted headers, so it needs the password), written, and only then
are the index files it replaces removed. ``what="snapshots"``: one
``replace-snapshots`` task run: the index repair first, then a replacement
(tagged ``repaired``) for every snapshot that references data no pack or
object holds. Both hold a prune lease for their whole run.

Artifacts: ``repair-summary`` (markdown) and a table of what was found
(``repair-problems``) or dropped (``repair-dropped-files``). A run that found
data lost or unreadable ends Failed and still carries its summary (CLI exit 1).
Runnable as ``python -m keepflow repair index REPO`` (the CLI's arguments).
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from keepflow.flows._credentials import resolve
from keepflow.flows._flow import flow
from keepflow.flows._naming import run_name
from keepflow.flows._password import resolve_password_param
from keepflow.flows._runs import HOOKS
from keepflow.tasks.core.errors import EXIT_OK, UsageError
from keepflow.tasks.core.format import human_bytes
from keepflow.tasks.repair import rebuild_index, replace_damaged_snapshots

WHATS = ("index", "snapshots")
TABLE_ROWS = 1000


def _run_name() -> str:
    from prefect.runtime import flow_run

    return run_name(f"repair-{flow_run.parameters.get('what') or 'index'}", "repo")


@flow(name="repair", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=1),
      validate_parameters=False, **HOOKS)
def repair(repo: str, what: str = "index", read_data: bool = False, forget: bool = False, dry_run: bool = False,
           storage_options: dict | str | None = None, password: str | None = None) -> dict:
    """Repair ``repo``'s index (``what="index"``) or its snapshots (``what="snapshots"``).

    ``read_data`` (index): re-hash every blob and leave out what does not
    match. ``forget`` (snapshots): remove each damaged original once its
    replacement is written. ``dry_run``: report, change nothing.

    ``password`` names a Prefect Secret block (``"secret/NAME"``) holding the
    repository password; left out, the password comes from the environment
    (``KEEPFLOW_PASSWORD``...), never from a flow parameter's value.
    """
    resolve_password_param(password)
    if what not in WHATS:
        raise UsageError(f"repair what={what!r}: choose 'index' or 'snapshots'")
    storage_options = resolve(storage_options)
    if what == "index":
        summary = rebuild_index(repo, read_data, dry_run, storage_options)
        _index_artifacts(summary)
        failure = _index_failure(summary)
    else:
        summary = replace_damaged_snapshots(repo, forget, dry_run, storage_options)
        _index_artifacts(summary["index"], write_summary=False)
        _snapshot_artifacts(summary)
        failure = _snapshots_failure(summary) if summary["exit_code"] != EXIT_OK else None
    summary = dict(summary, what=what, task_runs=1)
    if failure:
        return Failed(message=f"repair {what} of {repo}: {failure}", data=summary)
    return summary


def _index_failure(s: dict) -> str | None:
    parts = [f"{len(s[k])} {k.replace('_', ' ')}" for k in ("lost", "unreadable", "corrupt", "damaged_manifests")
             if s[k]]
    return ", ".join(parts) if parts else None


def _snapshots_failure(s: dict) -> str:
    parts = [f"{len(s['files_dropped'])} files of {len(s['replaced'])} snapshots lost"] if s["files_dropped"] else []
    if s["already_replaced"] and not s["forget"]:
        parts.append(f"{len(s['already_replaced'])} replaced originals still reference lost data")
    parts += [f"{len(s['index'][k])} {k.replace('_', ' ')}" for k in ("unreadable", "corrupt", "damaged_manifests")
              if s["index"][k]]
    return ", ".join(parts)


def _index_md(s: dict) -> str:
    verb = "Would index" if s["dry_run"] else "Indexed"
    if s["index_written"]:
        wrote = f"Wrote `index/{s['index_written']}`, then removed {s['index_files_removed']} old index files."
    elif s["dry_run"]:
        wrote = "Dry run: nothing written."
    else:
        wrote = "The index was already complete: nothing written."
    return (f"{verb} {s['blobs_indexed']} blobs in {s['packs']} packs and {s['objects']} objects "
            f"({s['blobs_found']} newly found; {s['rows_dropped']} old index rows dropped, their data is gone"
            + (f"; re-hashed {s['keys_read']} keys, {human_bytes(s['bytes_read'])}" if s["read_data"] else "")
            + f").\n\n{wrote}\n\n"
            + f"Unreadable: {len(s['unreadable'])}, foreign: {len(s['foreign'])}, corrupt: {len(s['corrupt'])}, "
              f"damaged manifests: {len(s['damaged_manifests'])}, lost blobs: {len(s['lost'])}.")


def _index_artifacts(s: dict, write_summary: bool = True) -> None:
    if write_summary:
        create_markdown_artifact(f"# Repair index of {s['repository']}\n\n{_index_md(s)}", key="repair-summary",
                                 description=f"repair index of {s['repository']}")
    rows = ([{"kind": "lost", "key": "", "hash": p["hash"][:16], "detail": p["detail"],
              "snapshots": ", ".join(x[:8] for x in p["snapshots"]), "paths": ", ".join(p["paths"][:5])}
             for p in s["lost"]]
            + [{"kind": kind, "key": p["key"], "hash": (p.get("hash") or "")[:16], "detail": p["detail"],
                "snapshots": "", "paths": ""}
               for kind, plist in (("unreadable", s["unreadable"]), ("corrupt", s["corrupt"]),
                                   ("unreadable index file", s["index_files_unreadable"]),
                                   ("damaged manifest", s["damaged_manifests"]),
                                   ("foreign", s["foreign"]))
               for p in plist])
    if rows:
        create_table_artifact(rows[:TABLE_ROWS], key="repair-problems",
                              description=f"what repair found in {s['repository']}")


def _snapshot_artifacts(s: dict) -> None:
    verb = "Would write" if s["dry_run"] else "Wrote"
    md = [f"# Repair snapshots of {s['repository']}\n",
          f"{s['snapshots']} snapshots checked; {s['snapshots_damaged']} reference {s['blobs_lost']} lost blobs.\n",
          f"{verb} {len(s['replaced'])} replacement snapshots (tagged `repaired`) without "
          f"{len(s['files_dropped'])} lost files; {len(s['already_replaced'])} were replaced before; "
          f"{'would forget' if s['dry_run'] else 'forgot'} {len(s['forgotten'])} originals.\n"]
    md += [f"- `{r['original'][:8]}` -> `{r['replacement'][:8]}`: {r['files_dropped']} files "
           f"({human_bytes(r['bytes_dropped'])}) dropped" for r in s["replaced"]]
    md += ["", "Index repair first: " + _index_md(s["index"])]
    create_markdown_artifact("\n".join(md), key="repair-summary", description=f"repair snapshots of {s['repository']}")
    if s["files_dropped"]:
        create_table_artifact([{"snapshot": f["snapshot"][:8], "replacement": f["replacement"][:8],
                                "path": f["path"], "size": f["size"]} for f in s["files_dropped"][:TABLE_ROWS]],
                              key="repair-dropped-files", description="files whose content is lost")
