"""Flow run names that say what ran: ``backup-<source>-<UTC time>``."""

from __future__ import annotations

import datetime as dt
import re


def short_name(location: str) -> str:
    """Last path component of a path or URL, safe for a run name."""
    tail = location.rstrip("/").rsplit("/", 1)[-1] or location
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:40]
    return tail or "root"


def run_name(operation: str, parameter: str) -> str:
    from prefect.runtime import flow_run

    value = flow_run.parameters.get(parameter, "") or ""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{operation}-{short_name(str(value))}-{stamp}"
