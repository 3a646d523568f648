"""The prune flow: forget snapshots by policy, then collect garbage in two phases.

1. forget: per source+host, keep what the policy keeps (restic's ``forget``
   semantics, see tasks/core/retention.py), delete the other manifests;
2. mark: record unreferenced data (and repack mostly-garbage packs);
3. sweep: delete what was marked at least ``grace_hours`` ago and is still
   unreferenced, compacting the index (under a prune lease; postponed while a
   backup runs). With the default 24 h, a prune deletes what the previous
   day's prune marked.

Runnable as ``python -m keepflow prune REPO --keep-daily 7 ...``.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from keepflow.flows._credentials import resolve, resolve_map
from keepflow.flows._flow import flow
from keepflow.flows._naming import run_name
from keepflow.flows._password import resolve_password_param
from keepflow.flows._runs import HOOKS
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_OK
from keepflow.tasks.core.format import human_bytes
from keepflow.tasks.prune import forget_snapshots, mark_garbage, sweep_garbage


@flow(name="prune", flow_run_name=lambda: run_name("prune", "repo"),
      task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=False, **HOOKS)
def prune(repo: str, keep_last: int | None = None, keep_hourly: int | None = None,
          keep_daily: int | None = None, keep_weekly: int | None = None, keep_monthly: int | None = None,
          keep_yearly: int | None = None, keep_tags: list[str] | None = None, grace_hours: float = 24.0,
          dry_run: bool = False, storage_options: dict | str | None = None,
          replicas: list[str] | None = None, replica_options: dict | None = None,
          password: str | None = None) -> dict:
    """Forget snapshots outside the policy and collect unreferenced data.

    With ``replicas``, the same policy is then applied to each replica: their
    manifests are copies of the primary's, so the decisions are the same, and
    each replica collects its own garbage. A failing replica does not stop
    the others; the run then ends Failed, naming it.

    ``password`` names a Prefect Secret block (``"secret/NAME"``) holding the
    repository password; left out, the password comes from the environment
    (``KEEPFLOW_PASSWORD``...), never from a flow parameter's value.
    """
    resolve_password_param(password)
    policy = dict(keep_last=keep_last, keep_hourly=keep_hourly, keep_daily=keep_daily, keep_weekly=keep_weekly,
                  keep_monthly=keep_monthly, keep_yearly=keep_yearly, keep_tags=list(keep_tags or []))
    summary = _prune_one(repo, policy, grace_hours, dry_run, resolve(storage_options))
    if replicas:
        replica_options = resolve_map(replica_options)
        summary["replicas"], failed = [], []
        for url in replicas:
            try:
                one = _prune_one(url, policy, grace_hours, dry_run, replica_options.get(url))
                summary["replicas"].append({"repository": url, "ok": True, "forgotten": len(one["forgotten"]),
                                            "bytes_freed": one["bytes_freed"]})
            except Exception as exc:  # one replica down must not stop the others
                summary["replicas"].append({"repository": url, "ok": False, "error": str(exc)})
                failed.append(url)
            summary["task_runs"] += 3
        if failed:
            summary["exit_code"] = EXIT_FAILED
            return Failed(message=f"prune failed on {', '.join(failed)}", data=summary)
    return summary


def _prune_one(repo: str, policy: dict, grace_hours: float, dry_run: bool, storage_options) -> dict:
    decision = forget_snapshots(repo, policy, dry_run, storage_options)
    marked = mark_garbage(repo, [s["id"] for s in decision["forget"]], dry_run, storage_options)
    swept = sweep_garbage(repo, grace_hours, dry_run, storage_options)
    summary = {
        "repository": repo, "dry_run": dry_run, "policy": policy, "grace_hours": grace_hours,
        "forgotten": decision["forget"], "kept": decision["keep"], "marked": marked, "swept": swept,
        "bytes_freed": swept.get("bytes_freed", 0), "task_runs": 3, "exit_code": EXIT_OK,
    }
    verb = "would forget" if dry_run else "forgot"
    md = (f"# Prune {repo}\n\n{verb} {len(decision['forget'])} snapshots, kept {len(decision['keep'])}.\n\n"
          f"Marked {marked['keys']} keys ({human_bytes(marked['bytes'])}) as garbage"
          f"{', repacked ' + str(marked['repacked_packs']) + ' packs' if marked['repacked_packs'] else ''}.\n\n"
          + (f"Deletion postponed: {swept['postponed']}" if "postponed" in swept else
             f"Deleted {swept['keys_deleted']} keys, freed {human_bytes(swept['bytes_freed'])}; "
             f"{swept['marks_waiting']} marks wait for their {grace_hours:g} h grace period."))
    create_markdown_artifact(md, key="prune-summary", description=f"prune of {repo}")
    if decision["forget"]:
        create_table_artifact([{"snapshot": s["id"][:8], "time": s["time"][:19], "source": s["source"]}
                               for s in decision["forget"]], key="prune-forgotten")
    return summary
