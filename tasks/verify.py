"""Prefect tasks for verify: structure once, data re-hashing in parts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from keepflow.tasks.core import verify as core
from keepflow.tasks.retry import retry_transient


@task(name="check-structure", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def check_structure(repo: str, storage_options: dict | None) -> dict:
    result = core.check_structure(repo, storage_options)
    get_run_logger().info("%d snapshots, %d blobs, %d keys: %d structural problems", result.snapshots,
                          result.blobs, result.keys, len(result.problems))
    return result.to_dict()


@task(name="check-data", cache_policy=NO_CACHE, task_run_name="check-data-{part}",
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def check_data(repo: str, percent: float, seed: int, part: int, parts: int,
               storage_options: dict | None) -> dict:
    problems, keys, nbytes = core.check_data(repo, percent, storage_options, seed, part, parts)
    get_run_logger().info("part %d/%d: re-hashed %d keys (%d bytes), %d problems", part + 1, parts, keys,
                          nbytes, len(problems))
    return {"problems": problems, "keys_read": keys, "bytes_read": nbytes}


@task(name="attribute-problems", cache_policy=NO_CACHE)
def attribute_problems(repo: str, problems: list, storage_options: dict | None) -> list:
    core.attribute(repo, problems, storage_options)
    return problems


@task(name="check-ciphertext", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def check_ciphertext(repo: str, percent: float, storage_options: dict | None) -> dict:
    """Format 2 without the key: names against contents, pack footers (a replication host)."""
    result = core.check_ciphertext(repo, percent, storage_options)
    get_run_logger().info("%d files checked against their names (%d packs read whole): %d problems",
                          result.keys, result.keys_read, len(result.problems))
    return result.to_dict()
