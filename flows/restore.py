"""The restore flow: plan -> restore batches (range reads, hash-verified) -> links and folders.

Runnable as ``python -m keepflow restore REPO TARGET [options]`` and importable.
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
from keepflow.flows._runs import HOOKS
from keepflow.tasks.core import batch_processes
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_OK
from keepflow.tasks.core.format import human_bytes
from keepflow.tasks.core.restore import cleanup
from keepflow.tasks.restore import finish_restore, plan_restore, restore_batch

DEFAULT_WORKERS = batch_processes.threads_for_batches()     # as flows/backup.py


@flow(name="restore", flow_run_name=lambda: run_name("restore", "target"),
      task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_WORKERS), validate_parameters=False, **HOOKS)
def restore(repo: str, target: str, snapshot: str = "latest", as_of: str | None = None,
            includes: list[str] | None = None, overwrite: str = "if-changed", dry_run: bool = False,
            storage_options: dict | str | None = None, target_options: dict | str | None = None,
            fallbacks: list[str] | None = None, fallback_options: dict | None = None,
            work_dir: str | None = None, dask_address: str | None = None, workers: int | None = None,
            sparse: bool = True, xattrs: bool = True, password: str | None = None) -> dict:
    """Restore a snapshot of ``repo`` (all of it, or the ``includes``) into ``target``.

    ``fallbacks`` are replica URLs read when the primary is unreachable or a
    blob is missing or corrupt there (``fallback_options`` maps URL -> options).
    ``work_dir``, ``dask_address`` and ``workers`` as for the backup flow.

    ``password`` names a Prefect Secret block (``"secret/NAME"``) holding the
    repository password; left out, the password comes from the environment
    (``KEEPFLOW_PASSWORD``...), never from a flow parameter's value.
    """
    resolve_password_param(password)
    storage_options, target_options = resolve(storage_options), resolve(target_options)
    fallback_options = resolve_map(fallback_options)
    with _dask.batches(dask_address, workers, work_dir=work_dir, uses_work_dir=True) as batches:
        plan = plan_restore(repo, target, snapshot, as_of, list(includes or []), overwrite, dry_run,
                            storage_options, target_options, list(fallbacks or []), fallback_options, work_dir,
                            sparse, xattrs)
        try:
            futures = [batches.submit(restore_batch, plan=plan, batch_no=i, storage_options=storage_options,
                                      target_options=target_options)
                       for i in range(len(plan["batches"]))]
            results = [f.result() for f in futures]
            batches.done()          # the batch processes go before the finish (folders, links, times)
            errors = [e for r in results for e in r.errors] + list(plan["missing"])
            errors += finish_restore(plan, target_options)
        finally:
            if not cleanup(plan):       # the run folder goes however the run ends
                get_run_logger().warning("could not remove the run folder %s; remove it by hand",
                                         plan["scratch"])
    summary = {
        "snapshot": plan["snapshot"],
        "snapshot_time": plan["snapshot_time"],
        "repository": repo,
        "target": target,
        "dry_run": dry_run,
        "files": plan["files"],
        "dirs": plan["dirs"],
        "symlinks": plan["symlinks"],
        "bytes": plan["bytes"],
        "files_written": sum(r.written for r in results),
        "files_identical": sum(r.identical for r in results),
        "files_kept": sum(r.kept for r in results),
        "bytes_written": sum(r.bytes_written for r in results),
        "bytes_read": sum(r.bytes_read for r in results),
        "errors": [{"path": p, "reason": r} for p, r in errors],
        "read_from": plan["repo_url"],
        "blobs_from": _merge_counts(r.sources for r in results),
        "task_runs": len(results) + 2,
        "exit_code": EXIT_FAILED if errors else EXIT_OK,
    }
    md = (f"# Restore of {plan['snapshot'][:8]}\n\n| | |\n|---|---|\n"
          f"| target | {target} |\n| files | {summary['files']} |\n"
          f"| written | {summary['files_written']} ({human_bytes(summary['bytes_written'])}) |\n"
          f"| already identical | {summary['files_identical']} |\n| errors | {len(errors)} |\n"
          + "".join(f"| blobs from {url} | {n} |\n" for url, n in summary["blobs_from"].items()))
    create_markdown_artifact(md, key="restore-summary", description=f"restore into {target}")
    if errors:
        create_table_artifact(summary["errors"][:1000], key="restore-errors")
        # The run is Failed in the history, and still carries its summary.
        return Failed(message=f"{len(errors)} files could not be restored", data=summary)
    return summary


def _merge_counts(dicts) -> dict:
    total: dict[str, int] = {}
    for d in dicts:
        for url, n in d.items():
            total[url] = total.get(url, 0) + n
    return total
