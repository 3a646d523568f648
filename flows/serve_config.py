"""The ``keepflow serve`` configuration file: read, check, describe the jobs.

Plain Python (tomllib), no Prefect import, so a bad file is reported in a
fraction of a second as one line naming the key::

    keepflow: error: keepflow.toml: sources.home.incremental.cron: not a valid cron expression ...

The format (documented in README.md, "Scheduling"; example in
deployments/keepflow.example.toml)::

    timezone = "Europe/Berlin"            # default for every schedule (IANA name), default UTC

    [repositories.main]
    url = "/backups/repo"
    storage_options = {}                  # optional fsspec options
    replicas = ["/mnt/offsite/repo"]      # optional; replicated after every backup
    replica_options = {}                  # optional {replica URL = {fsspec options}}
    [repositories.main.replicate]         # optional fallback schedule (+ after_backup = true)
    cron = "45 * * * *"
    [repositories.main.prune]             # optional
    cron = "15 3 * * *"
    keep_daily = 7
    [repositories.main.verify]            # optional
    cron = "0 4 * * 0"
    read_data = 10

    [sources.home]
    path = "/data"
    repository = "main"
    [sources.home.incremental]            # at least one of incremental / full
    cron = "0 * * * *"
    [sources.home.full]
    cron = "30 2 * * *"

Every schedule table takes ``cron`` (five fields) or ``interval`` (seconds),
and an optional ``timezone``. :func:`load` returns a list of :class:`Job`:
one per deployment to serve, with the flow's parameters.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keepflow.tasks.core.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PRUNE_KEEP = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
SCHEDULE_KEYS = {"cron", "interval", "timezone"}


@dataclass
class Schedule:
    cron: str | None = None
    interval: float | None = None        # seconds
    timezone: str = "UTC"

    def describe(self) -> str:
        when = f"cron {self.cron!r}" if self.cron else f"every {self.interval:g} s"
        return f"{when} ({self.timezone})"


@dataclass
class Job:
    """One deployment: ``flow`` ("backup", "replicate", "prune", "verify") run with ``parameters``."""

    flow: str
    name: str                             # deployment name, e.g. "home-incremental"
    parameters: dict[str, Any]
    schedule: Schedule | None = None
    after_backup_of: str | None = None    # replicate: repository URL whose backups trigger it
    description: str = ""
    tags: list[str] = field(default_factory=list)


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, what: str):
        raise UsageError(f"{self.path}: {key}: {what}")

    def table(self, value, key: str) -> dict:
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ([{key}]), not {type(value).__name__}")
        return value

    def known(self, table: dict, key: str, allowed: set[str]) -> None:
        for k in table:
            if k not in allowed:
                where = f"{key}.{k}" if key else k
                self.fail(where, f"unknown key; expected one of: {', '.join(sorted(allowed))}")

    def string(self, table: dict, key: str, prefix: str, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                self.fail(f"{prefix}.{key}" if prefix else key, "missing (a string is required)")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{prefix}.{key}" if prefix else key, f"must be a non-empty string, not {value!r}")
        return value

    def strings(self, table: dict, key: str, prefix: str) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(f"{prefix}.{key}", f"must be a list of strings, not {value!r}")
        return list(value)

    def options(self, table: dict, key: str, prefix: str) -> dict | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(f"{prefix}.{key}", f"must be a table of fsspec options, not {value!r}")
        return dict(value)

    def number(self, table: dict, key: str, prefix: str, *, integer: bool = False, low: float = 0,
               high: float | None = None, positive: bool = False):
        value = table.get(key)
        if value is None:
            return None
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < low \
                or (high is not None and value > high) or (positive and value <= 0):
            bound = "a positive" if positive else f"a non-negative{'' if high is None else f' (<= {high:g})'}"
            self.fail(f"{prefix}.{key}", f"must be {bound} {'integer' if integer else 'number'}, not {value!r}")
        return value

    def boolean(self, table: dict, key: str, prefix: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{prefix}.{key}", f"must be true or false, not {value!r}")
        return value

    def name(self, value: str, key: str) -> str:
        if not NAME_RE.match(value):
            self.fail(key, "names may contain only letters, digits, '-' and '_'")
        return value

    def timezone(self, value, key: str) -> str:
        import zoneinfo

        if not isinstance(value, str) or not value:
            self.fail(key, f"must be an IANA time zone name like 'Europe/Berlin' or 'UTC', not {value!r}")
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            self.fail(key, f"unknown time zone {value!r}; use an IANA name like 'Europe/Berlin' or 'UTC'")
        return value

    def schedule(self, table: dict, prefix: str, default_tz: str, required: bool = True) -> Schedule | None:
        cron, interval = table.get("cron"), table.get("interval")
        if cron is not None and interval is not None:
            self.fail(prefix, "give either cron or interval, not both")
        if cron is None and interval is None:
            if required:
                self.fail(prefix, "needs a schedule: cron = \"0 * * * *\" or interval = SECONDS")
            return None
        tz = self.timezone(table["timezone"], f"{prefix}.timezone") if "timezone" in table else default_tz
        if cron is not None:
            if not isinstance(cron, str):
                self.fail(f"{prefix}.cron", f"must be a string like \"0 * * * *\", not {cron!r}")
            problem = _cron_problem(cron)
            if problem:
                self.fail(f"{prefix}.cron", f"not a valid cron expression {cron!r} ({problem}); "
                                            "five fields: minute hour day month weekday")
            return Schedule(cron=cron, timezone=tz)
        return Schedule(interval=float(self.number(table, "interval", prefix, positive=True)), timezone=tz)


def _cron_problem(expr: str) -> str | None:
    fields = expr.split()
    if len(fields) != 5:
        return f"{len(fields)} fields"
    if any(c in "RrHh" for c in expr):      # Prefect refuses random/hashed expressions
        return "random and hashed fields are not supported"
    try:
        import datetime as dt

        from cronsim import (  # small, pure Python; installed with Prefect
            CronSim,
            CronSimError,
        )
    except ImportError:  # pragma: no cover - Prefect validates again when the deployment is built
        return None
    try:
        CronSim(expr, dt.datetime(2026, 1, 1))
    except CronSimError as exc:
        return str(exc).lower()
    return None


def load(path: str | Path) -> list[Job]:
    """Read and check the TOML file at ``path``; return the jobs (deployments) it describes."""
    shown = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{shown}: no such configuration file") from None
    except IsADirectoryError:
        raise UsageError(f"{shown}: is a folder, not a configuration file") from None
    except PermissionError:
        raise UsageError(f"{shown}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{shown}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{shown}: not valid TOML: not UTF-8 text") from None
    return parse(raw, shown)


def parse(raw: dict, path: str = "config") -> list[Job]:
    c = _Checker(path)
    c.known(raw, "", {"timezone", "repositories", "sources"})
    default_tz = c.timezone(raw["timezone"], "timezone") if "timezone" in raw else "UTC"
    repos_raw = c.table(raw.get("repositories", {}), "repositories")
    sources_raw = c.table(raw.get("sources", {}), "sources")
    if not sources_raw:
        c.fail("sources", "no sources: add at least one [sources.NAME] table with path, repository and a schedule")
    if not repos_raw:
        c.fail("repositories", "no repositories: add at least one [repositories.NAME] table with url")

    jobs: list[Job] = []
    repos: dict[str, dict] = {}
    for rname, rtable in repos_raw.items():
        key = f"repositories.{rname}"
        c.name(rname, key)
        rtable = c.table(rtable, key)
        c.known(rtable, key, {"url", "storage_options", "replicas", "replica_options", "replicate", "prune",
                              "verify"})
        url = c.string(rtable, "url", key, required=True)
        storage_options = c.options(rtable, "storage_options", key)
        replicas = c.strings(rtable, "replicas", key)
        replica_options = c.options(rtable, "replica_options", key)
        for r, opts in (replica_options or {}).items():
            if r not in replicas:
                c.fail(f"{key}.replica_options", f"{r!r} is not one of this repository's replicas")
            if not isinstance(opts, dict):
                c.fail(f"{key}.replica_options", f"options for {r!r} must be a table, not {opts!r}")
        if url in replicas:
            c.fail(f"{key}.replicas", "a repository cannot be its own replica")
        repos[rname] = {"url": url, "storage_options": storage_options}

        if "replicate" in rtable and not replicas:
            c.fail(f"{key}.replicate", "there are no replicas to replicate to; add replicas = [\"URL\", ...]")
        if replicas:
            sub = c.table(rtable.get("replicate", {}), f"{key}.replicate")
            c.known(sub, f"{key}.replicate", SCHEDULE_KEYS | {"after_backup"})
            after = c.boolean(sub, "after_backup", f"{key}.replicate", True)
            schedule = c.schedule(sub, f"{key}.replicate", default_tz, required=not after)
            jobs.append(Job("replicate", rname, {
                "repo": url, "replicas": replicas, "storage_options": storage_options,
                "replica_options": replica_options}, schedule, url if after else None,
                f"bring the replicas of {url} up to date", ["keepflow", "replicate"]))

        if "prune" in rtable:
            sub = c.table(rtable["prune"], f"{key}.prune")
            c.known(sub, f"{key}.prune", SCHEDULE_KEYS | set(PRUNE_KEEP) | {"keep_tags", "grace_hours"})
            schedule = c.schedule(sub, f"{key}.prune", default_tz)
            params: dict[str, Any] = {"repo": url}
            for k in PRUNE_KEEP:
                value = c.number(sub, k, f"{key}.prune", integer=True)
                if value is not None:
                    params[k] = value
            if "keep_tags" in sub:
                params["keep_tags"] = c.strings(sub, "keep_tags", f"{key}.prune")
            if not any(k in params for k in (*PRUNE_KEEP, "keep_tags")):
                c.fail(f"{key}.prune", "no retention policy: set at least one of "
                                       f"{', '.join(PRUNE_KEEP)}, keep_tags")
            grace = c.number(sub, "grace_hours", f"{key}.prune")
            if grace is not None:
                params["grace_hours"] = float(grace)
            params["storage_options"] = storage_options
            jobs.append(Job("prune", rname, params, schedule, None,
                            f"forget old snapshots of {url} and collect garbage", ["keepflow", "prune"]))

        if "verify" in rtable:
            sub = c.table(rtable["verify"], f"{key}.verify")
            c.known(sub, f"{key}.verify", SCHEDULE_KEYS | {"read_data"})
            schedule = c.schedule(sub, f"{key}.verify", default_tz)
            read_data = c.number(sub, "read_data", f"{key}.verify", high=100)
            jobs.append(Job("verify", rname, {"repo": url, "read_data": float(read_data or 0),
                                              "storage_options": storage_options}, schedule, None,
                            f"check {url} and re-hash {read_data or 0:g}% of its data", ["keepflow", "verify"]))

    for sname, stable in sources_raw.items():
        key = f"sources.{sname}"
        c.name(sname, key)
        stable = c.table(stable, key)
        c.known(stable, key, {"path", "repository", "excludes", "tags", "source_options", "incremental", "full"})
        src = c.string(stable, "path", key, required=True)
        rname = c.string(stable, "repository", key, required=True)
        if rname not in repos:
            c.fail(f"{key}.repository", f"no repository named {rname!r}; defined: "
                                        f"{', '.join(sorted(repos)) or 'none'}")
        base = {"source": src, "repo": repos[rname]["url"], "tags": c.strings(stable, "tags", key) or None,
                "excludes": c.strings(stable, "excludes", key) or None,
                "storage_options": repos[rname]["storage_options"],
                "source_options": c.options(stable, "source_options", key),
                # The incremental and full jobs of one source share its lease: the later one waits.
                "wait_for_lease": 3600.0}
        if "incremental" not in stable and "full" not in stable:
            c.fail(key, "no schedule: add [sources.NAME.incremental] and/or [sources.NAME.full] with cron or interval")
        for kind, rehash in (("incremental", False), ("full", True)):
            if kind not in stable:
                continue
            sub = c.table(stable[kind], f"{key}.{kind}")
            c.known(sub, f"{key}.{kind}", SCHEDULE_KEYS)
            schedule = c.schedule(sub, f"{key}.{kind}", default_tz)
            jobs.append(Job("backup", f"{sname}-{kind}", {**base, "rehash": rehash}, schedule, None,
                            f"{kind} backup of {src} into {repos[rname]['url']}", ["keepflow", "backup"]))
    order = ["backup", "replicate", "prune", "verify"]
    return sorted(jobs, key=lambda j: order.index(j.flow))   # stable: file order within a kind
