"""Finding snapshots: listing, resolving an id prefix or a time, choosing a parent.

Listing reads the ``snapshots/`` folder and then only each manifest's footer
(key-value metadata), in a small thread pool because on object stores each
footer is a round trip. Files that end in ``.parquet`` but whose footer is not
a keepflow manifest are ignored rather than fatal, so one damaged manifest
does not hide the others (verify reports it).
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

from . import storage
from .errors import (
    AmbiguousSnapshotError,
    NoSnapshotsError,
    SnapshotNotFoundError,
    UsageError,
)
from .manifest import SnapshotInfo, read_info


def list_snapshot_names(repo) -> list[str]:
    files = storage.list_files(repo.fs, repo.path("snapshots"))
    names = [f["name"].rsplit("/", 1)[-1] for f in files]
    return sorted(n for n in names if n.endswith(".parquet"))


def list_snapshots(repo) -> list[SnapshotInfo]:
    names = list_snapshot_names(repo)
    if not names:
        return []

    def load(name):
        try:
            return read_info(repo, name)
        except (KeyError, ValueError, OSError):
            return None

    if repo.is_local or len(names) < 4:
        infos = [load(n) for n in names]
    else:
        with ThreadPoolExecutor(max_workers=8) as pool:
            infos = list(pool.map(load, names))
    return sorted((i for i in infos if i is not None), key=lambda i: (i.time, i.id))


def resolve(repo, ref: str | None = "latest", as_of: str | None = None,
            snapshots: list[SnapshotInfo] | None = None) -> SnapshotInfo:
    """Find one snapshot by ``latest``, an id prefix, or the last one at ``as_of``."""
    snaps = list_snapshots(repo) if snapshots is None else snapshots
    if not snaps:
        raise NoSnapshotsError(url=repo.url)
    if as_of:
        limit = parse_time(as_of)
        older = [s for s in snaps if s.datetime <= limit]
        if not older:
            raise SnapshotNotFoundError(
                f"no snapshot at or before {as_of} in {repo.url}; the oldest is from {snaps[0].time}"
            )
        return older[-1]
    if not ref or ref == "latest":
        return snaps[-1]
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
