"""The replicate flow: keep several providers in step with the primary repository.

One task run per replica, all submitted at once; each has its own retries and
one failing does not stop the others. No password is needed, whatever the
format: replicas are byte copies, checked against the hashes in their names
(tasks/core/replicate.py). The run ends Failed when any replica
failed, naming which and why, and still returns the per-replica summary.

Runnable as ``python -m keepflow replicate REPO REPLICA... [--dry-run] [--json]``.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from keepflow.flows._credentials import resolve, resolve_map
from keepflow.flows._flow import flow
from keepflow.flows._naming import run_name
from keepflow.flows._progress_artifact import track
from keepflow.flows._runs import HOOKS
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_OK
from keepflow.tasks.core.format import human_bytes
from keepflow.tasks.replicate import replicate_to
from keepflow.tasks.retry import is_transient


def replicate_all(repo: str, replicas: list[str], storage_options: dict | None,
                  replica_options: dict | None, dry_run: bool) -> dict:
    """Submit one task per replica and collect outcomes (used by backup too)."""
    futures = [(r, replicate_to.submit(repo, r, storage_options, (replica_options or {}).get(r), dry_run))
               for r in replicas]
    outcomes, failed = [], []
    track([f for _, f in futures], "replicate-progress", f"{len(futures)} replicas")
    for replica, future in futures:
        future.wait()
        state = future.state
        if state.is_completed():
            outcomes.append({"replica": replica, "ok": True, **future.result()})
        else:
            transient = False
            try:
                future.result()
                reason = state.message or "failed"
            except Exception as exc:  # the task's own error: one line for the summary
                reason = str(exc) or type(exc).__name__
                transient = is_transient(exc)
            # "transient": a later run may succeed as is (server down); otherwise the cause must be fixed.
            outcomes.append({"replica": replica, "ok": False, "error": reason, "transient": transient})
            failed.append(replica)
    return {"repository": repo, "dry_run": dry_run, "replicas": outcomes, "failed": failed,
            "task_runs": len(replicas), "exit_code": EXIT_FAILED if failed else EXIT_OK}


def write_artifacts(summary: dict) -> None:
    rows = []
    for o in summary["replicas"]:
        if not o["ok"]:
            rows.append({"replica": o["replica"], "status": "FAILED", "detail": o["error"]})
        elif summary["dry_run"]:
            rows.append({"replica": o["replica"], "status": "lacks",
                         "detail": f"{len(o['snapshots_missing'])} snapshots, "
                                   f"{human_bytes(o['data_bytes_missing'])} of data"})
        else:
            keys = (f", key files {o['keys_copied']} copied / {o['keys_removed']} removed"
                    if o.get("keys_copied") or o.get("keys_removed") else "")
            rows.append({"replica": o["replica"], "status": "in step",
                         "detail": f"copied {o['data_copied']} objects ({human_bytes(o['bytes_copied'])}), "
                                   f"{o['snapshots_copied']} snapshots{keys}"})
    create_table_artifact(rows, key="replicate-summary", description=f"replicas of {summary['repository']}")
    md = "# Replication\n\n" + "\n".join(f"- **{r['replica']}**: {r['status']} — {r['detail']}" for r in rows)
    create_markdown_artifact(md, key="replicate-report")


@flow(name="replicate", flow_run_name=lambda: run_name("replicate", "repo"),
      task_runner=ThreadPoolTaskRunner(max_workers=8), validate_parameters=False, **HOOKS)
def replicate(repo: str, replicas: list[str], dry_run: bool = False, storage_options: dict | str | None = None,
              replica_options: dict | None = None) -> dict:
    """Copy to each replica what it lacks (format 2: key files first, mirrored; then packs/objects,
    then index, then manifests).

    ``replica_options`` maps a replica URL to its fsspec storage options.
    """
    storage_options, replica_options = resolve(storage_options), resolve_map(replica_options)
    summary = replicate_all(repo, list(replicas), storage_options, replica_options, dry_run)
    write_artifacts(summary)
    if summary["failed"]:
        ok = [o["replica"] for o in summary["replicas"] if o["ok"]]
        reasons = "; ".join(f"{o['replica']}: {o['error']}" for o in summary["replicas"] if not o["ok"])
        return Failed(message=f"replicas failed: {reasons}. In step: {', '.join(ok) or 'none'}", data=summary)
    return summary
