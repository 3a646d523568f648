"""Run a backup or restore through the core functions only (no Prefect).

The one place the tests call the core's steps (``prepare``, ``store_range``, ``commit``;
``prepare``, ``restore_range``, ``finish``, ``cleanup``; ``store.store_batch`` for the
tests of that step) in the order the flows' tasks do:
a test that needs a step on its own (a run that dies before its commit, a fault between
store and commit) calls ``plan_backup``/``store_all`` or ``plan_restore``/``restore_all``
and then does its own thing. These are type-checked against the core by ``make lint``
(mypy), so a changed signature fails here, once, not as stale arguments in many tests.
"""

from __future__ import annotations

import os
from typing import Any

from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core import restore as core_restore
from keepflow.tasks.core import storage, store
from keepflow.tasks.core.backup import BatchSummary, CommitResult
from keepflow.tasks.core.known_blobs import KnownBlobs
from keepflow.tasks.core.repository import Repository
from keepflow.tasks.core.restore import RestoreBatchResult

Place = str | os.PathLike[str]


def plan_backup(source: Place, repo: Place, **options: Any) -> dict[str, Any]:
    """``backup.prepare`` as the flow calls it; ``options`` are prepare's keywords."""
    return core_backup.prepare(str(source), str(repo), **options).to_dict()


def store_all(plan: dict[str, Any], storage_options: dict[str, Any] | None = None,
              source_options: dict[str, Any] | None = None) -> list[BatchSummary]:
    """Every batch of the plan stored, in order (the flow's ``store_batch`` tasks)."""
    return [core_backup.store_range(plan, i, storage_options, source_options) for i in range(len(plan["batches"]))]


def backup(source: Place, repo: Place, **options: Any) -> tuple[CommitResult, dict[str, Any], list[BatchSummary]]:
    """One whole backup: (the commit's result, the plan, the batches' summaries)."""
    plan = plan_backup(source, repo, **options)
    so = options.get("storage_options")
    summaries = store_all(plan, so, options.get("source_options"))
    return core_backup.commit(plan, summaries, so), plan, summaries


def store_files(repo: Repository, source: Place, paths: list[str], known: KnownBlobs,
                **options: Any) -> store.BatchResult:
    """One ``store.store_batch`` of ``paths`` (relative to ``source``) against the known-blob
    set ``known``, rows numbered from 0: for tests of the batch step itself."""
    fs, root = storage.open_url(str(source))
    return store.store_batch(repo, fs, root, paths, list(range(len(paths))), known, **options)


def plan_restore(repo: Place, target: Place, **options: Any) -> dict[str, Any]:
    """``restore.prepare`` as the flow calls it; ``options`` are prepare's keywords."""
    return core_restore.prepare(str(repo), str(target), **options).to_dict()


def restore_all(plan: dict[str, Any], storage_options: dict[str, Any] | None = None,
                target_options: dict[str, Any] | None = None,
                ) -> tuple[list[RestoreBatchResult], list[tuple[str, str]]]:
    """Every batch restored, then links and folder metadata (``finish``), then the run
    folder removed: (the batches' results, every error: batches, missing blobs, finish)."""
    try:
        results = [core_restore.restore_range(plan, i, storage_options, target_options)
                   for i in range(len(plan["batches"]))]
        errors = [e for r in results for e in r.errors] + list(plan["missing"])
        errors += core_restore.finish(plan, target_options)
    finally:
        core_restore.cleanup(plan)
    return results, errors


def restore(repo: Place, target: Place, **options: Any,
            ) -> tuple[dict[str, Any], list[RestoreBatchResult], list[tuple[str, str]]]:
    """One whole restore: (the plan, the batches' results, every error)."""
    plan = plan_restore(repo, target, **options)
    results, errors = restore_all(plan, options.get("storage_options"), options.get("target_options"))
    return plan, results, errors
