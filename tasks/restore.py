"""Prefect tasks for a restore: plan, restore one batch, finish (links, folders)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keepflow.tasks.core import batch_processes
from keepflow.tasks.core import restore as core
from keepflow.tasks.retry import retry_transient


@task(name="plan-restore", cache_policy=NO_CACHE)
def plan_restore(repo: str, target: str, snapshot: str, as_of: str | None, includes: list[str],
                 overwrite: str, dry_run: bool, storage_options: dict | None,
                 target_options: dict | None, fallbacks: list[str] | None = None,
                 fallback_options: dict | None = None, work_dir: str | None = None, sparse: bool = True,
                 xattrs: bool = True) -> dict:
    plan = core.prepare(repo, target, snapshot=snapshot, as_of=as_of, includes=includes,
                        overwrite=overwrite, dry_run=dry_run, storage_options=storage_options,
                        target_options=target_options, fallbacks=fallbacks or (),
                        fallback_options=fallback_options, work_dir=work_dir, sparse=sparse, xattrs=xattrs)
    if plan.repo_url != repo:
        get_run_logger().warning("primary %s unavailable: reading snapshot from %s", repo, plan.repo_url)
    get_run_logger().info("snapshot %s: %d files (%d bytes), %d folders, %d symlinks in %d batches",
                          plan.snapshot[:8], plan.files, plan.bytes, plan.dirs, plan.symlinks, len(plan.batches))
    return plan.to_dict()


@task(name="restore-batch", cache_policy=NO_CACHE, task_run_name="restore-b{batch_no}",
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def restore_batch(plan: dict, batch_no: int, storage_options: dict | None,
                  target_options: dict | None) -> core.RestoreBatchResult:
    # In a child process of this machine when the run has several batches (batch_processes.py).
    result = batch_processes.call(core.restore_range, plan, batch_no, storage_options, target_options,
                                  batches=len(plan["batches"]),
                                  urls=(plan["repo_url"], plan["target"], plan["scratch"]))
    get_run_logger().info("batch %d: wrote %d files (%d bytes), %d identical, %d kept, %d errors",
                          batch_no, result.written, result.bytes_written, result.identical, result.kept,
                          len(result.errors))
    return result


@task(name="finish-restore", cache_policy=NO_CACHE)
def finish_restore(plan: dict, target_options: dict | None) -> list:
    return core.finish(plan, target_options)   # the flow removes the run folder, however the run ends
