"""Finding snapshots: listing, resolving an id prefix or a time, choosing a parent.

Listing reads the ``snapshots/`` folder and then only each manifest's footer
(key-value metadata), in a small thread pool because on object stores each
footer is a round trip.

A manifest whose footer cannot be read (truncated, overwritten, foreign) is
never skipped silently. ``list_snapshots`` raises ``DamagedManifestError``
naming it, unless the caller passes a ``damaged`` list to collect such files
in (``keepflow snapshots`` lists the others and warns, a backup picks its
parent among the readable ones). Resolving refuses to skip over one: the name
``<UTC-ts>-<id>.parquet`` still tells when a damaged snapshot was taken and
its id, so ``latest`` fails when the newest manifest is damaged (it never
means "latest readable"), ``--as-of`` fails when a damaged one falls between
the answer and the time asked for, and an id prefix fails when it matches a
damaged manifest. A damaged file whose name tells nothing blocks ``latest``
and ``--as-of``: it could be the newest.
"""

from __future__ import annotations

import datetime as dt
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import storage
from .errors import (
    AmbiguousSnapshotError,
    DamagedManifestError,
    KeepflowError,
    NoSnapshotsError,
    SnapshotNotFoundError,
    UsageError,
)
from .manifest import SnapshotInfo, read_info

if TYPE_CHECKING:
    from .repository import Repository


def list_snapshot_names(repo: Repository) -> list[str]:
    files = storage.list_files(repo.fs, repo.path("snapshots"))
    names = [f["name"].rsplit("/", 1)[-1] for f in files]
    if repo.version >= 2 and repo.encrypted:
        return sorted(n for n in names if ".tmp-" not in n)   # everything else: a manifest, or reported damaged
    return sorted(n for n in names if n.endswith(".parquet"))


# Format 1: <time>-<id>.parquet; format 2: <time>-<id>-<B3 of the file>[.parquet].
_NAME = re.compile(r"(\d{8}T\d{6}\d{6}Z)-([0-9a-f]+)(?:-[0-9a-f]{64})?(?:\.parquet)?")


@dataclass
class DamagedManifest:
    """A file under ``snapshots/`` whose manifest footer cannot be read."""

    name: str
    reason: str
    id: str | None = None                 # from the file name, when it follows the pattern
    time: dt.datetime | None = None

    @classmethod
    def from_name(cls, name: str, reason: str) -> DamagedManifest:
        m = _NAME.fullmatch(name)
        if not m:
            return cls(name, reason)
        when = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.UTC)
        return cls(name, reason, m.group(2), when)

    def error(self, repo_url: str, what: str = "") -> DamagedManifestError:
        label = f"snapshot {self.id[:8]}" if self.id else "a snapshot"
        return DamagedManifestError(what=what or label, name=self.name, reason=self.reason, url=repo_url)


def list_snapshots(repo: Repository, damaged: list[DamagedManifest] | None = None) -> list[SnapshotInfo]:
    """Readable snapshots, oldest first.

    A manifest that cannot be read raises DamagedManifestError, or, when
    ``damaged`` is a list, is appended to it (the caller reports it).
    """
    names = list_snapshot_names(repo)
    if not names:
        return []

    def load(name):
        try:
            return read_info(repo, name)
        except (KeyError, ValueError, OSError, TypeError, KeepflowError) as exc:
            return DamagedManifest.from_name(name, _reason(exc))

    if repo.is_local or len(names) < 4:
        infos = [load(n) for n in names]
    else:
        with ThreadPoolExecutor(max_workers=8) as pool:
            infos = list(pool.map(load, names))
    bad = [i for i in infos if isinstance(i, DamagedManifest)]
    if bad:
        if damaged is None:
            raise bad[0].error(repo.url)
        damaged.extend(bad)
    return sorted((i for i in infos if isinstance(i, SnapshotInfo)), key=lambda i: (i.time, i.id))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return "it carries no keepflow snapshot metadata"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def resolve(repo: Repository, ref: str | None = "latest", as_of: str | None = None,
            snapshots: list[SnapshotInfo] | None = None,
            damaged: list[DamagedManifest] | None = None) -> SnapshotInfo:
    """Find one snapshot by ``latest``, an id prefix, or the last one at ``as_of``.

    Never answers past a damaged manifest that could be the snapshot asked for
    (see the module docstring). ``damaged`` goes with ``snapshots`` when the
    caller listed them itself.
    """
    if snapshots is None:
        damaged = []
        snaps = list_snapshots(repo, damaged)
    else:
        snaps, damaged = snapshots, damaged or []
    if not snaps and not damaged:
        raise NoSnapshotsError(url=repo.url)
    if as_of:
        limit = parse_time(as_of)
        older = [s for s in snaps if s.datetime <= limit]
        chosen = older[-1] if older else None
        for d in damaged:
            if d.time is None or (d.time <= limit and (chosen is None or d.time > chosen.datetime)):
                raise d.error(repo.url, f"the last snapshot at or before {as_of}")
        if chosen is None:
            raise SnapshotNotFoundError(
                f"no snapshot at or before {as_of} in {repo.url}; the oldest is from {snaps[0].time}"
            )
        return chosen
    if not ref or ref == "latest":
        newest = snaps[-1] if snaps else None
        for d in damaged:
            if d.time is None or newest is None or d.time > newest.datetime:
                raise d.error(repo.url, "the latest snapshot")
        assert newest is not None       # no snapshots but damaged ones: raised above
        return newest
    for d in damaged:
        if d.id and d.id.startswith(ref):
            raise d.error(repo.url)
    matches = [s for s in snaps if s.id.startswith(ref)]
    if not matches:
        raise SnapshotNotFoundError(ref=ref, url=repo.url)
    if len(matches) > 1:
        raise AmbiguousSnapshotError(ref=ref, count=len(matches))
    return matches[0]


def find_parent(snaps: list[SnapshotInfo], source: str, host: str) -> SnapshotInfo | None:
    """Latest snapshot of the same source and host."""
    same = [s for s in snaps if s.source == source and s.host == host]
    return same[-1] if same else None


def parse_time(text: str) -> dt.datetime:
    """Parse '2026-11-20 14:00' (local time unless it carries an offset)."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"cannot read time {text!r}; use a form like '2026-11-20 14:00' or '2026-11-20T14:00:00Z'"
        ) from None
    if value.tzinfo is None:
        value = value.astimezone()  # the user's local zone
    return value
