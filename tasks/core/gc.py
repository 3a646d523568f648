"""Garbage collection in two phases with a grace period.

A blob is garbage when no manifest references it. Deleting garbage at once
would race with a backup running at the same moment: that backup may have
found the blob in the index at its start and will reference it in the
manifest it writes at its end. So deletion is split:

1. **mark** (any time, concurrent backups allowed): find keys (packs,
   objects) whose blobs are all unreferenced, and keys present in storage but
   in no index (left by a crashed run, or a run still writing). Packs that are
   mostly garbage (live bytes under ``REPACK_BELOW`` of the blob bytes the
   index places in them) are repacked
   first: their live blobs are copied into new packs with a new index file,
   which makes the old pack entirely garbage. The candidates are recorded in
   ``trash/<UTC time>-<id>.json`` with the time they were marked.
2. **sweep** (only marks older than the grace period, default 24 h, and only
   under a ``prune`` lease, which excludes backups): each candidate is checked
   again against the manifests and index *as they are now*; a key is deleted
   only if every blob in it is still unreferenced or also stored elsewhere.
   A blob that a concurrent backup started to rely on is thereby rescued.
   The index is compacted in the same step: one new index file with every
   surviving entry is written, then the index files it replaces are deleted,
   then the keys. A crash at any point leaves extra data, never missing data.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from . import index as indexmod
from . import manifest, snapshots, storage
from .errors import UnindexedBlobsError
from .store import INDEX_SCHEMA, BatchResult, PackWriter

REPACK_BELOW = 0.5
DATA_FOLDERS = ("packs", "objects")


@dataclass
class MarkResult:
    mark: str | None = None
    keys: int = 0
    bytes: int = 0
    repacked_packs: int = 0
    repacked_blobs: int = 0
    repacked_bytes: int = 0


@dataclass
class SweepResult:
    marks_done: list[str] = field(default_factory=list)
    marks_waiting: int = 0
    keys_deleted: int = 0
    bytes_freed: int = 0
    keys_rescued: int = 0
    index_files_before: int = 0
    index_files_after: int = 0
    temporaries_removed: int = 0


def referenced_hashes(repo, exclude: set[str] = frozenset()) -> pa.Array:
    """Every blob hash referenced by any manifest (unique), ignoring snapshots in ``exclude``."""
    arrays = []
    for info in snapshots.list_snapshots(repo):
        if info.id in exclude:
            continue
        table = manifest.read_manifest(repo, info, columns=["hash"])
        arrays.append(pc.drop_null(pc.unique(table["hash"].combine_chunks())))
    if not arrays:
        return pa.array([], pa.string())
    return pc.unique(pa.concat_arrays(arrays))


def _stored_keys(repo) -> dict[str, int]:
    out: dict[str, int] = {}
    for folder in DATA_FOLDERS:
        out.update(storage.list_keys(repo.fs, repo.root, folder))
    return out


def _marked_keys(repo) -> set[str]:
    keys = set()
    for mark in _list_marks(repo):
        keys.update(mark["keys"])
    return keys


def _list_marks(repo) -> list[dict]:
    marks = []
    for info in storage.list_files(repo.fs, repo.path("trash")):
        if info["name"].endswith(".json"):
            try:
                data = json.loads(repo.fs.cat_file(info["name"]))
                data["_path"] = info["name"]
                marks.append(data)
            except (FileNotFoundError, ValueError):
                continue
    return sorted(marks, key=lambda m: m["marked_at"])


def plan_garbage(repo, exclude: set[str] = frozenset()) -> dict:
    """Which keys are garbage, which packs deserve a repack (read-only).

    ``exclude``: snapshot ids to treat as already forgotten (for dry runs).
    """
    idx = indexmod.load_index(repo, unique=False)
    live = referenced_hashes(repo, exclude)
    stored = _stored_keys(repo)
    already = _marked_keys(repo)
    is_live = pc.is_in(idx["hash"], value_set=live) if idx.num_rows else pa.array([], pa.bool_())
    per_key: dict[str, list[int]] = {}
    for key, length, alive in zip(idx["key"].to_pylist(), idx["length"].to_pylist(), is_live.to_pylist()):
        acc = per_key.setdefault(key, [0, 0])
        acc[0] += length
        if alive:
            acc[1] += length
    garbage, repack = {}, []
    for key, size in stored.items():
        if key in already:
            continue
        total, alive = per_key.get(key, (0, 0))
        if alive == 0:
            garbage[key] = size                       # unreferenced, or in no index at all
        elif key.startswith("packs/") and alive < REPACK_BELOW * total:
            repack.append(key)
    return {"index": idx, "live": live, "garbage": garbage, "repack": repack, "stored": stored}


def mark(repo, plan: dict | None = None, dry_run: bool = False, exclude: set[str] = frozenset()) -> MarkResult:
    plan = plan or plan_garbage(repo, exclude)
    result = MarkResult()
    candidates = dict(plan["garbage"])
    if plan["repack"]:
        moved = _repack(repo, plan, dry_run)
        result.repacked_packs = len(plan["repack"])
        result.repacked_blobs, result.repacked_bytes = moved
        for key in plan["repack"]:
            candidates[key] = plan["stored"][key]
    result.keys, result.bytes = len(candidates), sum(candidates.values())
    if candidates and not dry_run:
        now = dt.datetime.now(dt.timezone.utc)
        name = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}.json"
        body = {"marked_at": now.isoformat(), "keys": sorted(candidates), "bytes": result.bytes}
        storage.write_once(repo.fs, repo.path("trash", name), json.dumps(body).encode())
        result.mark = name
    return result


def _repack(repo, plan: dict, dry_run: bool) -> tuple[int, int]:
    """Copy the live blobs of mostly-garbage packs into new packs."""
    idx = plan["index"]
    wanted = set(plan["repack"])
    live = plan["live"]
    rows = idx.filter(pc.and_(pc.is_in(idx["key"], value_set=pa.array(sorted(wanted), pa.string())),
                              pc.is_in(idx["hash"], value_set=live)))
    result = BatchResult()
    packer = PackWriter(repo, result, dry_run)
    by_key: dict[str, list[tuple[str, int, int]]] = {}
    for h, k, o, n in zip(rows["hash"].to_pylist(), rows["key"].to_pylist(), rows["offset"].to_pylist(),
                          rows["length"].to_pylist()):
        by_key.setdefault(k, []).append((h, o, n))
    moved = moved_bytes = 0
    import blake3

    for key, blobs in sorted(by_key.items()):
        data = repo.fs.cat_file(repo.path(key))
        for h, o, n in blobs:
            blob = data[o: o + n]
            if blake3.blake3(blob).hexdigest() != h:
                continue   # corrupt: leave the old pack alone (verify reports it)
            packer.add(h, blob)
            moved += 1
            moved_bytes += n
    packer.flush()
    if not dry_run and result.index_rows["hash"]:
        indexmod.write_index(repo, result.index_table(),
                             f"repack-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}")
    return moved, moved_bytes


def sweep(repo, grace_hours: float, dry_run: bool = False) -> SweepResult:
    """Delete marked keys whose mark is older than the grace period (caller holds a prune lease)."""
    result = SweepResult()
    result.temporaries_removed = remove_stale_temporaries(repo, max(grace_hours, 1.0), dry_run)
    marks = _list_marks(repo)
    limit = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=grace_hours)
    due = [m for m in marks if dt.datetime.fromisoformat(m["marked_at"]) <= limit]
    result.marks_waiting = len(marks) - len(due)
    index_names = indexmod.list_index_names(repo)
    result.index_files_before = len(index_names)
    if not due:
        result.index_files_after = len(index_names)
        return result

    idx = indexmod.load_index(repo, unique=False)
    live = referenced_hashes(repo)
    candidates = set().union(*(set(m["keys"]) for m in due))
    stored = _stored_keys(repo)
    deleting = set()
    keys = idx["key"].to_pylist()
    hashes = idx["hash"].to_pylist()
    alive = pc.is_in(idx["hash"], value_set=live).to_pylist() if idx.num_rows else []
    # Blobs that live somewhere outside the candidate set.
    elsewhere = {h for h, k in zip(hashes, keys) if k not in candidates}
    blocked = set()
    for h, k, a in zip(hashes, keys, alive):
        if k in candidates and a and h not in elsewhere:
            blocked.add(k)                     # rescued: a manifest needs a blob only found here
    for key in candidates:
        if key in blocked:
            result.keys_rescued += 1
        elif key in stored:
            deleting.add(key)
    result.keys_deleted = len(deleting)
    result.bytes_freed = sum(stored[k] for k in deleting)
    result.marks_done = [m["_path"].rsplit("/", 1)[-1] for m in due]
    if dry_run:
        result.index_files_after = result.index_files_before
        return result

    # 1. compacted index without the deleted keys, 2. drop the index files it replaces,
    # 3. delete the keys, 4. drop the marks.
    survivors = idx.filter(pc.invert(pc.is_in(idx["key"], value_set=pa.array(sorted(deleting), pa.string())))) \
        if deleting else idx
    name = f"compact-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    if survivors.num_rows:
        survivors = indexmod.unique_hashes(survivors)
    written = indexmod.write_index(repo, survivors.cast(INDEX_SCHEMA), name)
    # The compaction guard: every live blob the old index knew is still
    # indexed (the rescue rule above keeps its key), or nothing is removed.
    was_indexed = live.filter(pc.is_in(live, value_set=idx["hash"])) if idx.num_rows else live
    lost = indexmod.not_indexed(was_indexed, survivors["hash"] if survivors.num_rows else pa.array([], pa.string()))
    if len(lost):
        raise UnindexedBlobsError(what=f"prune of {repo.url}", count=len(lost), files="the live",
                                  paths=", ".join(lost[:indexmod.NAMED_FILES].to_pylist()), url=repo.url)
    for old in index_names:
        if written is None or old != f"{name}.parquet":
            try:
                repo.fs.rm_file(repo.path("index", old))
            except FileNotFoundError:
                pass
    for key in sorted(deleting):
        try:
            repo.fs.rm_file(repo.path(key))
        except FileNotFoundError:
            pass
    for m in due:
        try:
            repo.fs.rm_file(m["_path"])
        except FileNotFoundError:
            pass
    result.index_files_after = len(indexmod.list_index_names(repo))
    return result


TEMP_FOLDERS = ("packs", "objects", "index", "snapshots", "tmp", "trash", "locks")   # locks: a refresh cut short


def remove_stale_temporaries(repo, older_than_hours: float, dry_run: bool = False) -> int:
    """Delete temporary files that interrupted writes left behind (never data).

    Never younger than an hour: a write in progress elsewhere keeps its
    temporary name only for as long as the copy takes.
    """
    stale = storage.stale_temporaries(repo.fs, repo.root, TEMP_FOLDERS, older_than_hours * 3600)
    if not dry_run:
        for path in stale:
            try:
                repo.fs.rm_file(path)
            except FileNotFoundError:
                pass
    return len(stale)


def forget(repo, snaps, dry_run: bool = False) -> list[str]:
    """Delete the manifests of ``snaps``; returns their ids."""
    ids = []
    for s in snaps:
        if not dry_run:
            try:
                repo.fs.rm_file(repo.path("snapshots", s.key))
            except FileNotFoundError:
                pass
        ids.append(s.id)
    return ids


def to_dict(obj) -> dict:
    return asdict(obj)
