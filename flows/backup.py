"""The backup flow: scan -> diff -> store changed files in batches -> index -> manifest.

Runnable as ``python -m keepflow backup SOURCE REPO [options]`` (same options as
``keepflow backup``) and importable: ``from keepflow.flows.backup import backup``.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from keepflow.flows import _dask
from keepflow.flows._credentials import resolve, resolve_map
from keepflow.flows._flow import flow
from keepflow.flows._naming import run_name
from keepflow.flows._password import resolve_password_param
from keepflow.flows._progress_artifact import track
from keepflow.flows._runs import HOOKS
from keepflow.tasks.backup import commit_snapshot, plan_backup, store_batch
from keepflow.tasks.core import batch_processes
from keepflow.tasks.core.backup import check_inputs, cleanup, normalise_source
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL
from keepflow.tasks.core.format import human_bytes
from keepflow.tasks.core.lease import backup_lease
from keepflow.tasks.core.liveness import remove_dead_repo_temporaries

# Small-file batches are bound by Python work under the GIL: measured on 100k
# files, 1 thread 2.75 s, 2 threads 2.80 s, 4 threads 3.54 s for the store
# phase. So a run of several batches puts them in child processes, one per
# core (tasks/core/batch_processes.py), and the threads only wait for them;
# at least two keep large-file copies and uploads overlapping.
DEFAULT_WORKERS = batch_processes.threads_for_batches()


@flow(name="backup", flow_run_name=lambda: run_name("backup", "source"),
      task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_WORKERS), validate_parameters=False, **HOOKS)
def backup(source: str, repo: str, tags: list[str] | None = None, excludes: list[str] | None = None,
           rehash: bool = False, parent: str | None = None, dry_run: bool = False,
           storage_options: dict | str | None = None, source_options: dict | str | None = None,
           replicate_to: list[str] | None = None, replica_options: dict | None = None,
           wait_for_lease: float = 0.0, work_dir: str | None = None, dask_address: str | None = None,
           workers: int | None = None, xattrs: bool = True, compression: str | None = None,
           password: str | None = None) -> dict:
    """Back up ``source`` (a folder or fsspec URL) into the repository at ``repo``.

    With ``replicate_to``, the same flow run then brings each replica up to date
    (one task run per replica, see flows/replicate.py). ``work_dir`` is where
    the run folder goes (default ``$KEEPFLOW_WORK_DIR`` or the temporary folder);
    ``dask_address`` or ``workers`` run the batches on a Dask cluster
    (flows/_dask.py). Returns the run summary (the same object
    ``keepflow backup --json`` prints).

    ``password`` names a Prefect Secret block (``"secret/NAME"``) holding the
    repository password; left out, the password comes from the environment
    (``KEEPFLOW_PASSWORD``...), never from a flow parameter's value.
    """
    resolve_password_param(password)
    # The lease keeps a second backup of this source, and prune's deletion
    # phase, away until the manifest is written (tasks/core/lease.py).
    storage_options, source_options = resolve(storage_options), resolve(source_options)
    replica_options = resolve_map(replica_options)
    check_inputs(source, excludes or [], source_options)
    with _dask.batches(dask_address, workers, work_dir=work_dir, uses_work_dir=True) as batches:
        remove_dead_repo_temporaries(repo, storage_options)   # large-file copies of killed runs (liveness.py)
        holder = None if dry_run else backup_lease(repo, normalise_source(source), storage_options,
                                                   wait=wait_for_lease)
        plan, futures = None, []
        try:
            plan = plan_backup(source, repo, list(excludes or []), list(tags or []), rehash, parent, dry_run,
                               storage_options, source_options, work_dir, xattrs, compression)
            futures = [batches.submit(store_batch, plan=plan, batch_no=i, storage_options=storage_options,
                                      source_options=source_options)
                       for i in range(len(plan["batches"]))]
            track(futures, "backup-progress", f"storing {plan['to_read']} files")
            summaries = [f.result() for f in futures]
            batches.done()          # the batch processes go before the commit's peak, not after it
            committed = commit_snapshot(plan, summaries, storage_options)
        finally:
            # Whatever happened: release the lease, remove the run folder, and
            # drop the run's known-blob set here and on every worker.
            batches.settle(futures)      # no batch may still run when the lease and run folder go
            if holder is not None:
                holder.release()
            if plan is not None:
                batches.forget_run(plan["repo_url"], plan["run_id"])
                if not cleanup(plan):
                    get_run_logger().warning("could not remove the run folder %s; remove it by hand",
                                             plan["scratch"])
    summary = summarise(plan, summaries, committed)
    _artifacts(summary)
    if not dry_run:
        emit_completed(summary, storage_options)
    if replicate_to and not dry_run:
        from keepflow.flows.replicate import replicate_all, write_artifacts

        replication = replicate_all(repo, list(replicate_to), storage_options, replica_options, False)
        write_artifacts(replication)
        summary["replication"] = replication
        summary["task_runs"] += replication["task_runs"]
        if replication["failed"]:
            summary["exit_code"] = EXIT_FAILED
            return Failed(message=f"snapshot {summary['snapshot'][:8]} saved; replicas failed: "
                                  f"{', '.join(replication['failed'])}", data=summary)
    return summary


def summarise(plan: dict, summaries: list, committed) -> dict:
    info = committed.info
    skipped = [{"path": p, "reason": r} for p, r in committed.skipped]
    return {
        "snapshot": None if plan["dry_run"] else info.id,
        "dry_run": plan["dry_run"],
        "parent": info.parent,
        "source": info.source,
        "repository": plan["repo_url"],
        "host": info.host,
        "tags": info.tags,
        "time": info.time,
        "files": info.files,
        "dirs": info.dirs,
        "bytes": info.bytes,
        "files_new": info.new,
        "files_changed": info.changed,
        "files_unchanged": info.unchanged,
        "files_deleted": info.deleted,
        "bytes_read": info.bytes_read,
        "bytes_stored": info.bytes_stored,
        "bytes_written": info.bytes_written,
        "blobs_stored": sum(s.blobs_stored for s in summaries),
        "packs_written": sum(s.packs_written for s in summaries),
        "objects_written": sum(s.objects_written for s in summaries),
        "batches": len(summaries),
        "ran_on": _processes(summaries),
        "task_runs": len(summaries) + 2,
        "skipped": skipped,
        "exit_code": EXIT_PARTIAL if skipped else EXIT_OK,
    }


def _processes(summaries: list) -> dict:
    """``host:pid`` -> batches it ran: where the work went (one entry on the thread pool)."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.process] = counts.get(s.process, 0) + 1
    return counts


COMPLETED_EVENT = "keepflow.backup.completed"


def emit_completed(summary: dict, storage_options: dict | None) -> None:
    """Emit ``keepflow.backup.completed`` for a committed snapshot.

    The resource is the repository (``keepflow.repository.<id from keepflow.json>``,
    named by its URL), so a deployment trigger can start replication of exactly
    that repository. A failure here is logged, never fails a saved backup.
    """
    from prefect import get_run_logger
    from prefect.events import emit_event

    from keepflow.tasks.core.repository import Repository

    try:
        repo_id = Repository.open(summary["repository"], storage_options).config.id
        emit_event(COMPLETED_EVENT,
                   resource={"prefect.resource.id": f"keepflow.repository.{repo_id}",
                             "prefect.resource.name": summary["repository"]},
                   payload={k: summary[k] for k in (
                       "snapshot", "parent", "source", "repository", "host", "tags", "time", "files",
                       "dirs", "bytes", "files_new", "files_changed", "files_unchanged", "files_deleted",
                       "bytes_read", "bytes_stored", "bytes_written", "exit_code")}
                   | {"skipped": len(summary["skipped"])})
    except Exception as exc:  # the snapshot is saved; only the notification is lost
        get_run_logger().warning("could not emit %s: %s", COMPLETED_EVENT, exc)


def _artifacts(summary: dict) -> None:
    rows = [
        ("snapshot", summary["snapshot"] or "(dry run)"), ("source", summary["source"]),
        ("files", summary["files"]), ("new / changed / unchanged / deleted",
                                      f"{summary['files_new']} / {summary['files_changed']} / "
                                      f"{summary['files_unchanged']} / {summary['files_deleted']}"),
        ("logical size", human_bytes(summary["bytes"])), ("read", human_bytes(summary["bytes_read"])),
        ("stored", human_bytes(summary["bytes_stored"])),
        ("written to the repository", human_bytes(summary["bytes_written"])),
        ("skipped files", len(summary["skipped"])),
    ]
    md = "# Backup summary\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    create_markdown_artifact(md, key="backup-summary", description=f"backup of {summary['source']}")
    if summary["skipped"]:
        create_table_artifact(summary["skipped"][:1000], key="backup-skipped-files",
                              description="files that could not be backed up (first 1000)")
