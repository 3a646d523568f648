"""Prefect tasks for repair: rebuild the index from the data, replace snapshots that lost data.

Each is one task run: the core holds the prune lease for the whole repair, so
it cannot be split over task runs that might run apart. Both are idempotent,
so a transient storage failure is retried (never a lease conflict or a
keepflow error).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keepflow.tasks.core import repair as core
from keepflow.tasks.retry import retry_transient


@task(name="rebuild-index", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def rebuild_index(repo: str, read_data: bool, dry_run: bool, storage_options: dict | None) -> dict:
    result = core.repair_index(repo, storage_options, read_data=read_data, dry_run=dry_run)
    get_run_logger().info(
        "%d blobs in %d packs and %d objects (%d newly found, %d old rows dropped); %d unreadable, %d foreign, "
        "%d corrupt, %d lost; %s", result.blobs_indexed, result.packs, result.objects, result.blobs_found,
        result.rows_dropped, len(result.unreadable), len(result.foreign), len(result.corrupt), len(result.lost),
        f"wrote index/{result.index_written}, removed {result.index_files_removed} index files"
        if result.index_written else "no index written")
    return result.to_dict()


@task(name="replace-snapshots", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def replace_damaged_snapshots(repo: str, forget: bool, dry_run: bool, storage_options: dict | None) -> dict:
    result = core.repair_snapshots(repo, storage_options, forget=forget, dry_run=dry_run)
    get_run_logger().info("%d of %d snapshots reference %d lost blobs: %s %d replacements dropping %d files, "
                          "%d already replaced, %d forgotten", result.snapshots_damaged, result.snapshots,
                          result.blobs_lost, "would write" if dry_run else "wrote", len(result.replaced),
                          len(result.files_dropped), len(result.already_replaced), len(result.forgotten))
    return result.to_dict()
