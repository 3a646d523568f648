"""Prefect task: bring one replica up to date (one task run per replica). Needs no password:
replicas are byte copies (tasks/core/replicate.py)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keepflow.tasks.core import replicate as core
from keepflow.tasks.retry import retry_transient


@task(name="replicate-to", cache_policy=NO_CACHE, task_run_name="replicate-to-{replica}",
      retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_transient)
def replicate_to(repo: str, replica: str, storage_options: dict | None, replica_options: dict | None,
                 dry_run: bool = False) -> dict:
    result = core.replicate(repo, replica, storage_options, replica_options, dry_run=dry_run)
    logger = get_run_logger()
    if dry_run:
        logger.info("%s lacks %d snapshots, %d data objects (%d bytes), %d index files", replica,
                    len(result.snapshots_missing), result.data_missing, result.data_bytes_missing,
                    result.index_missing)
    else:
        logger.info("%s: copied %d data objects (%d bytes), %d index files, %d snapshots%s%s", replica,
                    result.data_copied, result.bytes_copied, result.index_copied, result.snapshots_copied,
                    f"; key files: {result.keys_copied} copied, {result.keys_removed} removed"
                    if result.keys_copied or result.keys_removed else "",
                    " (created)" if result.created else "")
        for skipped in result.not_copied:
            logger.warning("%s: not copied %s: %s", replica, skipped["key"], skipped["detail"])
    return result.to_dict()
