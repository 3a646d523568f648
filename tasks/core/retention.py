"""Choosing which snapshots to keep: restic's ``forget`` policy.

Snapshots are grouped by (source, host); each group is judged on its own,
newest first. A snapshot is kept when any rule keeps it:

* ``keep_last n``: the n newest snapshots;
* ``keep_hourly/daily/weekly/monthly/yearly n``: for the n most recent
  hours/days/ISO weeks/months/years that have snapshots, the newest snapshot
  in each (periods are in the machine's local time, as in restic);
* ``keep_tags``: every snapshot carrying any of these tags.

A negative count means "unlimited" (every period). With no rule at all,
nothing is forgotten: ``choose`` refuses, so a typo cannot empty a repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .manifest import SnapshotInfo

PERIODS = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


@dataclass
class Policy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_tags: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        counts = [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly,
                  self.keep_yearly]
        return all(c is None or c == 0 for c in counts) and not self.keep_tags


@dataclass
class Decision:
    keep: list[SnapshotInfo]
    forget: list[SnapshotInfo]
    reasons: dict[str, list[str]]          # snapshot id -> why kept


def choose(snaps: list[SnapshotInfo], policy: Policy) -> Decision:
    if policy.empty():
        raise UsageError("no retention rule given; pass at least one --keep-* option (nothing was forgotten)")
    groups: dict[tuple[str, str], list[SnapshotInfo]] = {}
    for s in snaps:
        groups.setdefault((s.source, s.host), []).append(s)
    keep: list[Any] = []
    forget: list[Any] = []
    reasons: dict[Any, Any] = {}
    for group in groups.values():
        group = sorted(group, key=lambda s: (s.time, s.id), reverse=True)
        why: dict[str, list[str]] = {s.id: [] for s in group}
        if policy.keep_last:
            n = len(group) if policy.keep_last < 0 else policy.keep_last
            for s in group[:n]:
                why[s.id].append("last")
        for name, bucket in PERIODS.items():
            n = getattr(policy, f"keep_{name}")
            if not n:
                continue
            seen: list[Any] = []
            for s in group:
                b = bucket(s.datetime.astimezone())
                if b in seen:
                    continue
                if n > 0 and len(seen) >= n:
                    break
                seen.append(b)
                why[s.id].append(name)
        if policy.keep_tags:
            for s in group:
                if set(s.tags) & set(policy.keep_tags):
                    why[s.id].append("tag")
        for s in group:
            (keep if why[s.id] else forget).append(s)
            if why[s.id]:
                reasons[s.id] = why[s.id]
    return Decision(sorted(keep, key=lambda s: s.time), sorted(forget, key=lambda s: s.time), reasons)
