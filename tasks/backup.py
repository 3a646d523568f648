"""Prefect tasks for a backup: plan, store one batch, commit the snapshot."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keepflow.tasks.core import backup as core
from keepflow.tasks.core import batch_processes
from keepflow.tasks.retry import retry_transient


@task(name="plan-backup", cache_policy=NO_CACHE, task_run_name="plan-{source}")
def plan_backup(source: str, repo: str, excludes: list[str], tags: list[str], rehash: bool,
                parent: str | None, dry_run: bool, storage_options: dict | None,
                source_options: dict | None, work_dir: str | None = None, xattrs: bool = True,
                compression: str | None = None) -> dict:
    # The flow checked the inputs before taking the lease: checked=True.
    plan = core.prepare(source, repo, excludes=excludes, tags=tags, rehash=rehash, parent=parent,
                        dry_run=dry_run, storage_options=storage_options, source_options=source_options,
                        work_dir=work_dir, checked=True, xattrs=xattrs, compression=compression)
    get_run_logger().info(
        "scanned %d files, %d folders: %d new, %d changed, %d unchanged, %d deleted; "
        "%d files (%d bytes) to read in %d batches; parent %s",
        plan.files, plan.dirs, plan.new, plan.changed, plan.unchanged, plan.deleted,
        plan.to_read, plan.bytes_to_read, len(plan.batches), plan.parent or "none")
    return plan.to_dict()


@task(name="store-batch", cache_policy=NO_CACHE, task_run_name="store-b{batch_no}",
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def store_batch(plan: dict, batch_no: int, storage_options: dict | None,
                source_options: dict | None) -> core.BatchSummary:
    # In a child process of this machine when the run has several batches (batch_processes.py).
    summary = batch_processes.call(core.store_range, plan, batch_no, storage_options, source_options,
                                   batches=len(plan["batches"]),
                                   urls=(plan["repo_url"], plan["source"], plan["scratch"]))
    get_run_logger().info(
        "batch %d: %d files, read %d bytes, stored %d bytes in %d packs + %d objects, %d skipped",
        batch_no, summary.files, summary.bytes_read, summary.bytes_stored, summary.packs_written,
        summary.objects_written, len(summary.skipped))
    return summary


@task(name="commit-snapshot", cache_policy=NO_CACHE, task_run_name="commit-{plan[run_id]}",
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def commit_snapshot(plan: dict, summaries: list, storage_options: dict | None) -> core.CommitResult:
    return core.commit(plan, summaries, storage_options)
