"""``keepflow serve CONFIG``: every scheduled keepflow job from one process.

Reads the TOML file (flows/serve_config.py), builds one Prefect deployment per
job with ``flow.to_deployment(...)`` and runs them all with ``prefect.serve``:
no work pool, no worker. The process polls the Prefect API for due runs and
runs each in a subprocess; stop it with Ctrl-C (its schedules are paused until
it is started again).

Every deployment has ``concurrency_limit=1``: a run of the same job never
overlaps the previous one (a late one waits for it). A repository's
``replicate`` deployment also has an event trigger: it runs after every
``keepflow.backup.completed`` event for that repository (emitted by the
backup flow once its snapshot is committed), as well as on its own schedule.
"""

from __future__ import annotations

import datetime as dt

from keepflow.flows.serve_config import Job, load

# The flows by name, imported lazily (Prefect and the flow modules load in ~1.5 s).
FLOW_MODULES = {"backup": "keepflow.flows.backup", "replicate": "keepflow.flows.replicate",
                "prune": "keepflow.flows.prune", "verify": "keepflow.flows.verify"}
COMPLETED_EVENT = "keepflow.backup.completed"   # keepflow.flows.backup.COMPLETED_EVENT, without importing it


def backup_completed_trigger(repo_url: str, name: str | None = None):
    """A deployment trigger firing once per backup committed into ``repo_url``."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=name or f"replicate {repo_url} after each backup",
        expect={COMPLETED_EVENT},
        match={"prefect.resource.id": "keepflow.repository.*", "prefect.resource.name": repo_url},
        posture="Reactive", threshold=1, within=dt.timedelta(0),
    )


def _flow(name: str):
    import importlib

    from keepflow.tasks.core.errors import UsageError

    try:
        module = importlib.import_module(FLOW_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == FLOW_MODULES[name]:
            raise UsageError(f"this keepflow has no {name} flow yet; "
                             f"remove the {name} job from the configuration") from None
        raise
    return getattr(module, name)


def build_deployments(jobs: list[Job]) -> list:
    """One RunnerDeployment per job (not yet sent to the API)."""
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for job in jobs:
        schedules = []
        if job.schedule is not None:
            s = job.schedule
            schedules.append(Cron(s.cron, timezone=s.timezone) if s.cron
                             else Interval(dt.timedelta(seconds=s.interval), timezone=s.timezone))
        triggers = [backup_completed_trigger(job.after_backup_of)] if job.after_backup_of else []
        deployments.append(_flow(job.flow).to_deployment(
            job.name,
            schedules=schedules,
            parameters={k: v for k, v in job.parameters.items() if v is not None},
            concurrency_limit=1,
            triggers=triggers,
            description=job.description,
            tags=job.tags,
            # "keepflow.flows.backup.backup": importable wherever keepflow is installed,
            # whatever folder `keepflow serve` was started from.
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


def serve_config(path: str, limit: int | None = None) -> None:
    """Load ``path`` and serve its deployments until interrupted."""
    from prefect import serve

    jobs = load(path)
    deployments = build_deployments(jobs)
    serve(*deployments, limit=limit)
