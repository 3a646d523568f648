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

Format 2 (ARCHITECTURE.md, "Repository format 2", "Reading, writing, and who
needs the key") changes what is live and how blobs move, not the phases:

* **live** = every manifest's content ids plus, for content ids the index
  types as list blobs, the chunk ids in those lists (chunk_lists.read_lists,
  each list read once). A live list that cannot be read or does not
  authenticate stops prune before it changes anything: without it nobody can
  tell which chunks are live. There is no ``objects/``: only ``packs/`` hold data.
* **repack** opens each live blob of a sparse pack (``pack.open_blob2``:
  authenticated, decompressed, its id recomputed) and writes the plaintext
  into new packs with ``store.PackWriter`` (data blobs into data packs, lists
  into a list pack; new salt, key and nonces), never moving ciphertext. A
  blob that does not open keeps its pack out of the mark.
* **marks** are ``trash/<time>-<8 hex>-<B3 hex of the file>``, the mark JSON
  sealed with ``K_trash`` (deterministic salt; plain JSON with ``encryption:
  none``). A mark whose name is not the B3 of its bytes, or that does not
  authenticate, is never acted on (counted in ``marks_unreadable``).
* **the sweep's guard** reads the compacted index back from storage and
  requires every live id the old index held (content ids and the chunks of
  every live list) to be in it before any index file or pack is removed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from . import crypto, manifest, pack, snapshots, storage
from . import index as indexmod
from .errors import KeepflowError, UnindexedBlobsError
from .store import BatchResult, PackWriter

if TYPE_CHECKING:
    from .manifest import SnapshotInfo
    from .repository import Repository

REPACK_BELOW = 0.5
DATA_FOLDERS = ("packs", "objects")
DATA_FOLDERS2 = ("packs",)             # format 2 has no objects/
# Format 2 mark names: <UTC time>-<8 hex>-<B3 hex of the file> (ARCHITECTURE.md, "### Layout").
_MARK2_NAME = re.compile(r"(\d{8}T\d{6}Z)-([0-9a-f]{8})-([0-9a-f]{64})")


class UnreadableListsError(KeepflowError):
    template = ("prune of {url} stopped before changing anything: {count} chunk list(s) that snapshots "
                "reference cannot be read or do not authenticate (first {first}), so prune cannot tell which "
                "chunks are still needed; find the damage with `keepflow verify {url} --read-data 100%` and "
                "restore the affected packs from a replica")


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
    marks_unreadable: int = 0          # marks that do not parse (format 2: or do not authenticate): never used


def referenced_hashes(repo: Repository, exclude: AbstractSet[str] = frozenset()) -> pa.Array:
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


def live_ids(repo: Repository, idx: pa.Table, exclude: AbstractSet[str] = frozenset(),
             content: pa.Array | None = None) -> pa.Array:
    """Every blob id that must be kept (unique).

    Format 1: the manifests' hashes (``referenced_hashes``). Format 2: the
    manifests' content ids plus every chunk of every content id that ``idx``
    types as a list blob. ``content`` saves reading the manifests again.
    """
    content = referenced_hashes(repo, exclude) if content is None else content
    if repo.version < 2 or idx.num_rows == 0 or len(content) == 0:
        return content
    chunks = live_chunks(repo, idx, content)
    if len(chunks) == 0:
        return content
    return pc.unique(pa.concat_arrays([content, chunks]))


def live_chunks(repo: Repository, idx: pa.Table, content: pa.Array) -> pa.Array:
    """Format 2: the chunk ids of the list blobs among ``content`` (each list read once).

    A list is read from its first indexed location, then from any other the
    index knows; one that no location gives raises UnreadableListsError.
    """
    from .chunk_lists import read_lists

    lists = idx.filter(pc.and_(pc.equal(idx["type"], pack.KIND_LIST), pc.is_in(idx["hash"], value_set=content)))
    if lists.num_rows == 0:
        return pa.array([], pa.string())
    first = indexmod.unique_hashes(lists)
    chunk_ids: list[str] = []
    failed: list[str] = []
    for list_id, chunks in zip(first["hash"].to_pylist(), read_lists(repo, first), strict=True):
        if chunks is None:
            failed.append(list_id)
        else:
            chunk_ids.extend(c for c, _ in chunks)
    if failed and lists.num_rows > first.num_rows:
        others = lists.filter(pc.is_in(lists["hash"], value_set=pa.array(failed, pa.string())))
        missing = set(failed)
        for list_id, chunks in zip(others["hash"].to_pylist(), read_lists(repo, others), strict=True):
            if chunks is not None and list_id in missing:
                missing.discard(list_id)
                chunk_ids.extend(c for c, _ in chunks)
        failed = [f for f in failed if f in missing]
    if failed:
        raise UnreadableListsError(url=repo.url, count=len(failed), first=failed[0])
    return pc.unique(pa.array(chunk_ids, pa.string())) if chunk_ids else pa.array([], pa.string())


def _stored_keys(repo: Repository) -> dict[str, int]:
    out: dict[str, int] = {}
    for folder in (DATA_FOLDERS if repo.version < 2 else DATA_FOLDERS2):
        out.update(storage.list_keys(repo.fs, repo.root, folder))
    return out


def _marked_keys(repo: Repository) -> set[str]:
    keys = set()
    for mark in _list_marks(repo):
        keys.update(mark["keys"])
    return keys


def _list_marks(repo: Repository, unreadable: list[str] | None = None) -> list[dict]:
    """The marks under ``trash/``, oldest first; names of those that cannot be used go to ``unreadable``."""
    if repo.version >= 2:
        return _list_marks2(repo, unreadable)
    marks = []
    for info in storage.list_files(repo.fs, repo.path("trash")):
        if info["name"].endswith(".json"):
            try:
                data = json.loads(repo.fs.cat_file(info["name"]))
                data["_path"] = info["name"]
                marks.append(data)
            except FileNotFoundError:
                continue
            except ValueError:
                if unreadable is not None:
                    unreadable.append(info["name"])
                continue
    return sorted(marks, key=lambda m: m["marked_at"])


def _list_marks2(repo: Repository, unreadable: list[str] | None) -> list[dict]:
    marks = []
    for info in storage.list_files(repo.fs, repo.path("trash")):
        path = info["name"]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if ".tmp-" in name:
            continue
        try:
            data = repo.fs.cat_file(path)
        except FileNotFoundError:
            continue                       # swept meanwhile
        body = _open_mark2(repo, name, data)
        if body is None:
            if unreadable is not None:
                unreadable.append(path)
            continue
        body["_path"] = path
        marks.append(body)
    return sorted(marks, key=lambda m: m["marked_at"])


def _open_mark2(repo: Repository, name: str, data: bytes) -> dict | None:
    """A format 2 mark's JSON, or None when its name, bytes, tag or content are not a mark's (fail closed)."""
    m = _MARK2_NAME.fullmatch(name)
    if not m or blake3.blake3(data).hexdigest() != m.group(3):
        return None
    if repo.encrypted:
        try:
            data = crypto.unseal(repo.keys, crypto.TRASH, data)
        except crypto.AuthenticationFailed:
            return None
    try:
        body = json.loads(data)
        when = dt.datetime.fromisoformat(body["marked_at"])
    except (ValueError, TypeError, KeyError):
        return None
    if when.tzinfo is None or not isinstance(body.get("keys"), list) \
            or not all(isinstance(k, str) for k in body["keys"]):
        return None
    return body


def _write_mark(repo: Repository, now: dt.datetime, body: dict) -> str:
    """Store one mark write-once; returns its name under ``trash/``."""
    stamp, tag = now.strftime("%Y%m%dT%H%M%SZ"), uuid.uuid4().hex[:8]
    if repo.version < 2:
        name, data = f"{stamp}-{tag}.json", json.dumps(body).encode()
    else:
        plain = crypto.canon(body)
        data = crypto.seal(repo.keys, crypto.TRASH, plain) if repo.encrypted else plain
        name = f"{stamp}-{tag}-{blake3.blake3(data).hexdigest()}"
    storage.write_once(repo.fs, repo.path("trash", name), data)
    return name


def plan_garbage(repo: Repository, exclude: AbstractSet[str] = frozenset()) -> dict:
    """Which keys are garbage, which packs deserve a repack (read-only).

    ``exclude``: snapshot ids to treat as already forgotten (for dry runs).
    """
    idx = indexmod.load_index(repo, unique=False)
    live = live_ids(repo, idx, exclude)
    stored = _stored_keys(repo)
    already = _marked_keys(repo)
    is_live = pc.is_in(idx["hash"], value_set=live) if idx.num_rows else pa.array([], pa.bool_())
    per_key: dict[str, list[int]] = {}
    for key, length, alive in zip(idx["key"].to_pylist(), idx["length"].to_pylist(), is_live.to_pylist(), strict=True):
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


def mark(repo: Repository, plan: dict | None = None, dry_run: bool = False,
         exclude: AbstractSet[str] = frozenset()) -> MarkResult:
    plan = plan or plan_garbage(repo, exclude)
    result = MarkResult()
    candidates = dict(plan["garbage"])
    if plan["repack"]:
        if repo.version < 2:
            moved = _repack(repo, plan, dry_run)
            repacked = plan["repack"]
        else:
            blobs, nbytes, kept = _repack2(repo, plan, dry_run)
            moved = (blobs, nbytes)
            repacked = [k for k in plan["repack"] if k not in kept]
        result.repacked_packs = len(repacked)
        result.repacked_blobs, result.repacked_bytes = moved
        for key in repacked:
            candidates[key] = plan["stored"][key]
    result.keys, result.bytes = len(candidates), sum(candidates.values())
    if candidates and not dry_run:
        now = dt.datetime.now(dt.UTC)
        body = {"marked_at": now.isoformat(), "keys": sorted(candidates), "bytes": result.bytes}
        result.mark = _write_mark(repo, now, body)
    return result


def _repack(repo: Repository, plan: dict, dry_run: bool) -> tuple[int, int]:
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
                          rows["length"].to_pylist(), strict=True):
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
        indexmod.write_index(repo, result.index_table(), _label("repack"))
    return moved, moved_bytes


def _label(what: str) -> str:
    return f"{what}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def _repack2(repo: Repository, plan: dict, dry_run: bool) -> tuple[int, int, set[str]]:
    """Format 2: open the live blobs of mostly-garbage packs and write their plaintext into new packs.

    Returns (blobs moved, their stored bytes in the old packs, the packs that
    must stay: one of their live blobs could not be read or opened). Each blob
    keeps its kind (data packs and list packs never mix) and its choice of
    compression (raw stays raw; compressed is compressed again at the
    repository's level, ``auto`` when its default is ``off``).
    """
    from . import compress

    idx = plan["index"]
    wanted = pa.array(sorted(plan["repack"]), pa.string())
    rows = idx.filter(pc.and_(pc.is_in(idx["key"], value_set=wanted), pc.is_in(idx["hash"], value_set=plan["live"])))
    result = BatchResult()
    writers = {pack.KIND_DATA: PackWriter(repo, result, dry_run),
               pack.KIND_LIST: PackWriter(repo, result, dry_run, kind=pack.KIND_LIST)}
    mode = repo.config.compression if repo.config.compression not in (None, "off") else "auto"
    by_key: dict[str, list[dict]] = {}
    for row in rows.to_pylist():
        by_key.setdefault(row["key"], []).append(row)
    moved = moved_bytes = 0
    kept: set[str] = set()
    done: set[str] = set()              # a blob two of these packs hold is moved once
    for key, blobs in sorted(by_key.items()):
        try:
            data = memoryview(repo.fs.cat_file(repo.path(key)))
        except FileNotFoundError:
            kept.add(key)
            continue
        opened, here = [], set()
        for row in sorted(blobs, key=lambda r: r["offset"]):
            if row["hash"] in done or row["hash"] in here:
                continue
            here.add(row["hash"])
            entry = pack.Entry2(row["hash"], row["type"], row["compressed"], row["seq"], row["offset"],
                                row["length"], row["raw_length"])
            try:
                opened.append((entry, pack.open_blob2(repo.keys, row["salt"], entry,
                                                      data[entry.offset: entry.offset + entry.length])))
            except KeepflowError:
                kept.add(key)           # damaged: leave the old pack alone, move none of it (verify reports it)
                break
        if key in kept:
            continue
        for entry, plain in opened:
            if entry.compressed:
                payload, compressed = compress.compress(plain, mode, repo.config.zstd_levels)
            else:
                payload, compressed = plain, False
            writers[entry.kind].add(entry.id, payload, compressed, len(plain))
            done.add(entry.id)
            moved += 1
            moved_bytes += entry.length
    for w in writers.values():
        w.flush()
    if not dry_run and result.index_rows["hash"]:
        indexmod.write_index(repo, result.index_table(repo.version), _label("repack"))
    return moved, moved_bytes, kept


def sweep(repo: Repository, grace_hours: float, dry_run: bool = False) -> SweepResult:
    """Delete marked keys whose mark is older than the grace period (caller holds a prune lease)."""
    result = SweepResult()
    result.temporaries_removed = remove_stale_temporaries(repo, max(grace_hours, 1.0), dry_run)
    unreadable: list[str] = []
    marks = _list_marks(repo, unreadable)
    result.marks_unreadable = len(unreadable)
    limit = dt.datetime.now(dt.UTC) - dt.timedelta(hours=grace_hours)
    due = [m for m in marks if dt.datetime.fromisoformat(m["marked_at"]) <= limit]
    result.marks_waiting = len(marks) - len(due)
    index_names = indexmod.list_index_names(repo)
    result.index_files_before = len(index_names)
    if not due:
        result.index_files_after = len(index_names)
        return result

    idx = indexmod.load_index(repo, unique=False)
    live = live_ids(repo, idx)
    candidates = set().union(*(set(m["keys"]) for m in due))
    stored = _stored_keys(repo)
    deleting = set()
    keys = idx["key"].to_pylist()
    hashes = idx["hash"].to_pylist()
    alive = pc.is_in(idx["hash"], value_set=live).to_pylist() if idx.num_rows else []
    # Blobs that live somewhere outside the candidate set.
    elsewhere = {h for h, k in zip(hashes, keys, strict=True) if k not in candidates}
    blocked = set()
    for h, k, a in zip(hashes, keys, alive, strict=True):
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
    name = _label("compact")
    if survivors.num_rows:
        survivors = indexmod.unique_hashes(survivors)
    written = indexmod.write_index(repo, survivors.cast(indexmod.schema(repo)), name)
    written_name = written.rsplit("/", 1)[-1] if written else None
    # The compaction guard: every live blob the old index knew is still
    # indexed (the rescue rule above keeps its key), or nothing is removed.
    # Format 2 checks the compacted file as a reader will find it once the
    # old ones are gone (read back from storage), and live includes every
    # chunk of every live list.
    was_indexed = live.filter(pc.is_in(live, value_set=idx["hash"])) if idx.num_rows else live
    if repo.version < 2:
        now_indexed = survivors["hash"] if survivors.num_rows else pa.array([], pa.string())
    else:
        now_indexed = indexmod.read_index_files(repo, [written_name] if written_name else [])["hash"]
    lost = indexmod.not_indexed(was_indexed, now_indexed)
    if len(lost):
        raise UnindexedBlobsError(what=f"prune of {repo.url}", count=len(lost), files="the live",
                                  paths=", ".join(lost[:indexmod.NAMED_FILES].to_pylist()), url=repo.url)
    for old in index_names:
        if written is None or old != written_name:
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


# locks: a refresh cut short; keys: format 2's key files (written write-once like the rest)
TEMP_FOLDERS = ("packs", "objects", "index", "snapshots", "tmp", "trash", "locks", "keys")


def remove_stale_temporaries(repo: Repository, older_than_hours: float, dry_run: bool = False) -> int:
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


def forget(repo: Repository, snaps: Iterable[SnapshotInfo], dry_run: bool = False) -> list[str]:
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


def to_dict(obj: Any) -> dict:
    return asdict(obj)
