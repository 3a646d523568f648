"""A Prefect progress artifact that follows a list of task futures."""

from __future__ import annotations

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed


def track(futures: list, key: str, description: str) -> None:
    """Wait for ``futures``, updating the artifact as each one ends (failed ones count too)."""
    if not futures:
        return
    artifact = create_progress_artifact(0.0, key=key, description=description)
    for done, _ in enumerate(as_completed(futures), start=1):
        update_progress_artifact(artifact, progress=100.0 * done / len(futures))
