"""Prefect tasks for prune: forget snapshots, mark garbage, sweep after the grace period."""

from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keepflow.tasks.core import gc, lease, retention, snapshots
from keepflow.tasks.core.repository import Repository
from keepflow.tasks.retry import retry_transient


@task(name="forget-snapshots", cache_policy=NO_CACHE)
def forget_snapshots(repo: str, policy: dict, dry_run: bool, storage_options: dict | None) -> dict:
    r = Repository.open(repo, storage_options)
    decision = retention.choose(snapshots.list_snapshots(r), retention.Policy(**policy))
    gc.forget(r, decision.forget, dry_run)
    get_run_logger().info("%s %d snapshots, keeping %d", "would forget" if dry_run else "forgot",
                          len(decision.forget), len(decision.keep))
    return {"forget": [_brief(s) for s in decision.forget],
            "keep": [dict(_brief(s), reasons=decision.reasons.get(s.id, [])) for s in decision.keep]}


def _brief(s) -> dict:
    return {"id": s.id, "time": s.time, "source": s.source, "host": s.host, "tags": s.tags}


@task(name="mark-garbage", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def mark_garbage(repo: str, forgotten: list[str], dry_run: bool, storage_options: dict | None) -> dict:
    r = Repository.open(repo, storage_options)
    result = gc.mark(r, dry_run=dry_run, exclude=set(forgotten) if dry_run else set())
    get_run_logger().info("marked %d keys (%d bytes) as garbage; repacked %d packs", result.keys, result.bytes,
                          result.repacked_packs)
    return asdict(result)


@task(name="sweep-garbage", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def sweep_garbage(repo: str, grace_hours: float, dry_run: bool, storage_options: dict | None) -> dict:
    r = Repository.open(repo, storage_options)
    logger = get_run_logger()
    holder = None
    if not dry_run:
        try:
            holder = lease.Holder(r, "prune").acquire()
        except lease.LeaseConflictError as exc:
            logger.warning("deletion postponed: %s", exc)
            return {"postponed": str(exc)}
    try:
        result = gc.sweep(r, grace_hours, dry_run)
    finally:
        if holder:
            holder.release()
    logger.info("deleted %d keys (%d bytes), rescued %d; %d marks still in their grace period; "
                "index files %d -> %d", result.keys_deleted, result.bytes_freed, result.keys_rescued,
                result.marks_waiting, result.index_files_before, result.index_files_after)
    if result.marks_unreadable:
        logger.warning("%d files under trash/ are not marks this repository wrote (damaged, or they do not "
                       "authenticate); they were not used and are left in place", result.marks_unreadable)
    return asdict(result)
