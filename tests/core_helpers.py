"""Run a backup or restore through the core functions only (no Prefect)."""

from __future__ import annotations

from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core import restore as core_restore


def backup(source, repo, **options):
    plan = core_backup.prepare(str(source), str(repo), **options).to_dict()
    so = options.get("storage_options")
    summaries = [core_backup.store_range(plan, i, so, options.get("source_options"))
                 for i in range(len(plan["batches"]))]
    return core_backup.commit(plan, summaries, so), plan, summaries


def restore(repo, target, **options):
    plan = core_restore.prepare(str(repo), str(target), **options).to_dict()
    so, to = options.get("storage_options"), options.get("target_options")
    results = [core_restore.restore_range(plan, i, so, to) for i in range(len(plan["batches"]))]
    errors = [e for r in results for e in r.errors] + list(plan["missing"])
    errors += core_restore.finish(plan, to)
    core_restore.cleanup(plan)
    return plan, results, errors
