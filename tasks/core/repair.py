"""Repairing a repository: rebuild the index from the data, replace snapshots that lost data.

Both repairs run under a ``prune`` lease (lease.py) for their whole run, so no
backup and no prune's deletion runs beside them (a conflicting lease: exit 11).
Nothing they find damaged or foreign is ever deleted; it is reported. A
manifest that cannot be read is named and left alone (the blobs only it
references cannot be reported as lost, and its snapshot cannot be replaced).

**repair index** (``repair_index``). The index (``index/*.parquet``) is a
cache of facts the data itself records: every pack ends with a trailer listing
its blobs (pack.py), and an object's name is its blob's hash. An index that
lost rows (the old de-duplication bug, made permanent by a compaction) or
holds rows for data that is gone is rebuilt from those facts:

1. list the index files as they are now (these are the files the run
   replaces) and read them: the *old* index;
2. list ``packs/`` and ``objects/``. A name that is not ``<ab>/<64 hex>`` (or a
   ``.tmp-`` temporary of an interrupted write) is *foreign*: reported, left
   alone, not indexed;
3. read every pack's trailer with two range reads (8 threads: the reads are
   small and latency-bound); an object is one blob at offset 0 (one whose size
   is not the length the old index recorded has changed: its recorded row is
   kept, so a restore detects it and can fall back, and it is reported
   *corrupt*). With ``read_data`` every key is read whole instead (4 threads,
   bounded memory): a pack's name must be the BLAKE3 of its bytes and each
   blob must match its hash, an object's content its name; a blob that does
   not match is left out and reported *corrupt*. A pack whose trailer is
   damaged is *unreadable*;
4. old rows the data did not confirm are judged one by one: a row whose key
   is gone is dropped; a row in an unreadable key is kept as it was (nothing
   proves it wrong; the report says the key is unreadable); a row in a
   readable key that no trailer lists is re-read and re-hashed, kept when the
   bytes match, dropped otherwise;
5. one new table, unique by hash. Where a blob is stored twice, the location
   the old index already used wins, then the lowest (key, offset), so the
   result does not depend on listing order and a second run changes nothing;
6. the invariant: every blob a manifest references must be in the new table
   unless no pack or object holds it. Steps 3-4 make that true by
   construction (a referenced blob is only left out when its key is gone, its
   bytes no longer match, or it was found corrupt), and it is checked again
   before anything is written: an indexed, referenced blob dropped without
   such a reason stops the run (a bug). The blobs that are missing are
   reported *lost*, with the snapshots and paths they affect;
7. write the new table as ``index/repair-<UTC time>-<id>.parquet`` (write-once),
   and only after it is stored remove the old index files listed in step 1.
   A crash in between leaves both, which readers merge (duplicates are
   harmless). When the new table equals the old index exactly (no duplicate
   hashes either), nothing is written: a second run is a no-op.

**repair snapshots** (``repair_snapshots``). A blob no pack or object holds is
gone for good; the snapshots that reference it cannot be restored whole. The
repair first repairs the index (as above, without ``read_data``), so a blob
counts as lost only when the data really is gone, then for every snapshot that
references a lost blob writes a replacement manifest without the files whose
content is lost (folders, symlinks and every other file kept) and with the
original's facts (source, host, tags, counts adjusted), the tag ``repaired``,
``parent`` = the original's id and a new id. Its time is the original's plus
one microsecond: it sorts right after the original, so the next backup of the
same source picks the replacement as its parent (a backup reuses its parent's
hashes for unchanged files without reading them; the original would hand it
the lost ones). The original is kept unless ``forget``, then removed after its
replacement is written. A snapshot that already has a replacement (tagged
``repaired``, parent = its id) is not replaced again, so a second run writes
nothing; with ``forget`` it is forgotten then. Snapshots that are whole are
untouched. Every dropped file is named (snapshot, path).

**Format 2** (ARCHITECTURE.md, "Repository format 2"). The same steps, with
the key (the repository is unlocked when opened): a pack's 44-byte footer and
its encrypted header take the trailer's place (``pack.read_header2``, two
range reads per pack, 8 threads on object stores); the rows come from the
header (id, type, seq, offset, stored and raw length, compressed) and the
footer (the pack's salt). There is no ``objects/``. ``read_data`` reads each
pack whole and opens every blob (``pack.open_blob2``: tag, decompression,
keyed id); what does not open is left out and reported *corrupt*. A pack
whose footer is malformed or whose header does not authenticate is
*unreadable* and left alone. An old row the headers do not confirm is kept
only when its blob still opens at the recorded place. Index files are written
with ``index.write_index`` (named ``repair-<time>-<id>-<B3 of the file>``),
then the old ones are removed. A file whose content id is a list blob is
*lost* when the list is in no pack, cannot be read or opened, or names a
chunk no pack holds; ``repair snapshots`` drops such files like the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from . import gc, lease, manifest, pack, progress, snapshots, storage
from . import index as indexmod
from .errors import EXIT_FAILED, EXIT_OK, KeepflowError, PackFormatError
from .repository import Repository

TRAILER_THREADS = 8     # two small range reads per pack: latency-bound, so more threads than cores
DATA_THREADS = 4        # whole keys in memory: at most 4 packs (4 x 16 MiB) at a time
CHUNK = 8 * 1024 * 1024
REPAIRED_TAG = "repaired"
MAX_PATHS = 20          # paths named per lost blob in the report
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ROW_KEYS = ["hash", "key", "offset", "length"]


@dataclass
class RepairIndexResult:
    repository: str
    read_data: bool = False
    dry_run: bool = False
    packs: int = 0                     # readable packs
    objects: int = 0
    blobs_indexed: int = 0             # rows of the new index (one per blob)
    blobs_found: int = 0               # in the new index, not in the old one
    rows_dropped: int = 0              # distinct old rows left out because their key is gone
    rows_unconfirmed: int = 0          # old rows in a readable key that no trailer lists: re-read
    rows_kept_unverified: int = 0      # old rows in an unreadable key, kept as they were
    keys_read: int = 0
    bytes_read: int = 0
    index_files_before: int = 0
    index_written: str | None = None   # name under index/, None when nothing was written
    index_files_removed: int = 0
    unreadable: list[dict] = field(default_factory=list)    # {key, detail}
    foreign: list[dict] = field(default_factory=list)       # {key, detail}
    corrupt: list[dict] = field(default_factory=list)       # {key, hash, detail}
    index_files_unreadable: list[dict] = field(default_factory=list)   # {key, detail}: replaced
    damaged_manifests: list[dict] = field(default_factory=list)        # {key, detail}: left alone
    lost: list[dict] = field(default_factory=list)          # {hash, detail, snapshots, paths, files}
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepairSnapshotsResult:
    repository: str
    forget: bool = False
    dry_run: bool = False
    snapshots: int = 0                 # snapshots checked
    snapshots_damaged: int = 0         # snapshots referencing lost blobs (replaced now or before)
    blobs_lost: int = 0
    replaced: list[dict] = field(default_factory=list)          # {original, replacement, files_dropped, bytes_dropped}
    already_replaced: list[dict] = field(default_factory=list)  # {original, replacement}
    forgotten: list[str] = field(default_factory=list)
    files_dropped: list[dict] = field(default_factory=list)     # {snapshot, replacement, path, hash, size}
    damaged_manifests: list[dict] = field(default_factory=list)  # {key, detail}: cannot be repaired, left alone
    index: dict = field(default_factory=dict)                   # the index repair that ran first
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict:
        return asdict(self)


# -- entry points -----------------------------------------------------------------

def repair_index(repo_url: str, storage_options: dict[str, Any] | None = None, read_data: bool = False,
                 dry_run: bool = False,
                 wait: float = 0.0) -> RepairIndexResult:
    """Rebuild the index from the packs' trailers and the objects (see the module docstring).

    ``dry_run``: report what would change, write and remove nothing (no lease
    taken). ``wait``: seconds to wait for a conflicting lease before giving up.
    """
    repo = Repository.open(repo_url, storage_options)
    with _prune_lease(repo, dry_run, wait):
        result, _ = _rebuild_index(repo, read_data, dry_run)
    return result


def repair_snapshots(repo_url: str, storage_options: dict[str, Any] | None = None, forget: bool = False,
                     dry_run: bool = False,
                     wait: float = 0.0) -> RepairSnapshotsResult:
    """Replace every snapshot that references lost data by one without the lost files."""
    repo = Repository.open(repo_url, storage_options)
    result = RepairSnapshotsResult(repo_url, forget=forget, dry_run=dry_run)
    with _prune_lease(repo, dry_run, wait):
        index_result, table = _rebuild_index(repo, read_data=False, dry_run=dry_run)
        result.index = index_result.to_dict()
        usable = table["hash"]
        # Format 2: a list blob that is indexed but lost (its list or a chunk is gone) serves no file.
        lost_lists = pa.array([p["hash"] for p in index_result.lost], pa.string())
        if len(lost_lists) and table.num_rows:
            usable = pc.filter(usable, pc.invert(pc.is_in(usable, value_set=lost_lists)))
        _replace_snapshots(repo, usable, result)
    # Lost blobs are what this repair handles: it fails when it had to drop files, when replaced
    # originals still reference lost data, or when the index repair met unreadable or corrupt data.
    damaged = bool(result.files_dropped) or (bool(result.already_replaced) and not forget) \
        or bool(result.damaged_manifests)
    result.exit_code = EXIT_FAILED if damaged or index_result.unreadable or index_result.corrupt else EXIT_OK
    return result


@contextlib.contextmanager
def _prune_lease(repo: Repository, dry_run: bool, wait: float):
    if dry_run:
        yield None
        return
    holder = lease.wait_for(repo, "prune", timeout=wait, poll=min(10.0, max(0.5, wait / 20)))
    try:
        yield holder
    finally:
        holder.release()


# -- repair index -------------------------------------------------------------------

def _rebuild_index(repo: Repository, read_data: bool, dry_run: bool) -> tuple[RepairIndexResult, pa.Table]:
    result = RepairIndexResult(repo.url, read_data=read_data, dry_run=dry_run)
    schema = indexmod.schema(repo)

    # 1. the old index: the files this run replaces.
    old_names = indexmod.list_index_names(repo)
    result.index_files_before = len(old_names)
    old = _read_old_index(repo, old_names, result)
    old_rows = _distinct_rows(old)

    # 2. what is stored.
    packs, objects = _list_data(repo, result)

    # 3. what the data says it holds.
    found_rows = _read_data_keys(repo, packs, objects, read_data, result)
    unreadable_keys = {u["key"] for u in result.unreadable}
    result.packs = sum(1 for k in packs if k not in unreadable_keys)
    result.objects = sum(1 for k in objects if k not in unreadable_keys)
    if not read_data and repo.version < 2:
        found_rows = _check_object_sizes(found_rows, old_rows, result)
    found = _rows_table(found_rows, schema)

    # 4. old rows the data did not confirm.
    sizes = {**packs, **objects}
    corrupt = {(c["key"], c["hash"]) for c in result.corrupt if c.get("hash")}
    why_gone: dict[str, str] = {}
    extra = _judge_unconfirmed(repo, old_rows, found["hash"], sizes, unreadable_keys, corrupt, why_gone, result)

    # 5. one row per hash, deterministic.
    table = _choose_locations(pa.concat_tables([found, extra]), old_rows)
    result.blobs_indexed = table.num_rows
    old_hashes = pc.unique(old_rows["hash"]) if old_rows.num_rows else pa.array([], pa.string())
    result.blobs_found = int(pc.sum(pc.invert(pc.is_in(table["hash"], value_set=old_hashes))).as_py() or 0)

    # 6. the invariant: a referenced blob is missing only when its data is gone.
    _report_lost(repo, table, old_hashes, why_gone, result)

    # 7. write the new index, then remove the files it replaces.
    unchanged = (not result.index_files_unreadable and table.num_rows == old_rows.num_rows
                 and table.num_rows == len(old_hashes)
                 and _same_rows(table, old_rows))
    if not dry_run and not unchanged:
        name = f"repair-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
        written = indexmod.write_index(repo, table, name)
        result.index_written = written.rsplit("/", 1)[-1] if written else None
        for old_name in old_names:
            try:
                repo.fs.rm_file(repo.path("index", old_name))
                result.index_files_removed += 1
            except FileNotFoundError:
                pass
    result.exit_code = EXIT_FAILED if (result.lost or result.unreadable or result.corrupt
                                       or result.damaged_manifests) else EXIT_OK
    return result, table


def _read_old_index(repo: Repository, names: list[str], result: RepairIndexResult) -> pa.Table:
    """The rows of the index files ``names``; a damaged one (format 2: one that does not
    authenticate, or whose name is not the BLAKE3 of its bytes) is named and left out."""
    try:
        return indexmod.read_index_files(repo, names)
    except FileNotFoundError:
        raise
    except Exception:   # a damaged file: read them one by one to name it
        tables = []
    for name in names:
        try:
            tables.append(indexmod.read_index_files(repo, [name]))
        except FileNotFoundError:
            raise
        except Exception as exc:
            result.index_files_unreadable.append({"key": f"index/{name}", "detail": _one_line(exc)})
    return pa.concat_tables(tables) if tables else indexmod.schema(repo).empty_table()


def _rows_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    """Index rows (tuples in ``schema``'s column order) as a table."""
    return pa.table({c: pa.array([r[i] for r in rows], schema.field(c).type) for i, c in enumerate(schema.names)},
                    schema=schema)


def _distinct_rows(table: pa.Table) -> pa.Table:
    """One row per location (hash, key, offset, length); format 2's other columns from the first such row."""
    if table.num_rows == 0:
        return table
    schema = table.schema
    extra = [c for c in schema.names if c not in _ROW_KEYS]
    if not extra:
        return table.group_by(_ROW_KEYS, use_threads=False).aggregate([]).select(_ROW_KEYS).cast(schema)
    grouped = table.group_by(_ROW_KEYS, use_threads=False).aggregate([(c, "first") for c in extra])
    grouped = grouped.rename_columns([n[: -len("_first")] if n.endswith("_first") else n
                                      for n in grouped.column_names])
    return grouped.select(schema.names).cast(schema)


def _list_data(repo: Repository, result: RepairIndexResult) -> tuple[dict[str, int], dict[str, int]]:
    """``{key: size}`` of the well-named packs and objects; everything else is reported foreign.

    One recursive listing per folder; ``storage.list_keys`` would hide the
    ``.tmp-`` names, which the report names too.
    """
    found: dict[str, dict[str, int]] = {"packs": {}, "objects": {}}
    prefix = repo.root.rstrip("/") + "/"
    for folder in (("packs",) if repo.version >= 2 else found):     # format 2 has no objects/
        for info in storage.list_files(repo.fs, repo.path(folder)):
            name = info["name"]
            key = name[len(prefix):] if name.startswith(prefix) else name
            reason = _foreign_reason(key, folder)
            if reason:
                result.foreign.append({"key": key, "detail": reason})
            else:
                found[folder][key] = int(info.get("size") or 0)
    result.foreign.sort(key=lambda f: f["key"])
    return found["packs"], found["objects"]


def _foreign_reason(key: str, folder: str) -> str | None:
    parts = key.split("/")
    name = parts[-1]
    if ".tmp-" in name:
        return "temporary file of an interrupted write (prune removes it once it is an hour old)"
    if len(parts) == 3 and _HEX64.fullmatch(name) and parts[1] == name[:2]:
        return None
    kind = "pack" if folder == "packs" else "object"
    return f"not a keepflow {kind} name ({folder}/<ab>/<64 hex digits>); left alone"


def _read_data_keys(repo: Repository, packs: dict[str, int], objects: dict[str, int], read_data: bool,
                    result: RepairIndexResult) -> list[tuple]:
    """Index rows for every blob the data holds: ``(hash, key, offset, length)`` (format 1), the
    whole in-memory row (format 2, ``store.INDEX2_SCHEMA``'s order)."""
    jobs = [(k, s, True) for k, s in sorted(packs.items())] + [(k, s, False) for k, s in sorted(objects.items())]
    if read_data:
        progress.start("read", len(jobs), sum(s for _, s, _ in jobs))
    v2 = repo.version >= 2

    def one(job):
        key, size, is_pack = job
        try:
            if v2:
                if read_data:
                    return _read_and_check2(repo, key)
                salt, entries = pack.read_header2(repo.keys, repo.fs, repo.path(key), size)
                return [_row2(key, salt, e) for e in entries], [], [], 0
            if not read_data:
                if not is_pack:
                    return [(key.rsplit("/", 1)[-1], key, 0, size)], [], [], 0
                return [(h, key, o, n) for h, o, n in pack.read_trailer(repo.fs, repo.path(key), size)], [], [], 0
            return _read_and_check(repo, key, size, is_pack)
        except PackFormatError as exc:
            return [], [{"key": key, "detail": exc.fields["reason"]}], [], 0
        except OSError as exc:   # includes FileNotFoundError: listed, then gone or unreadable
            return [], [{"key": key, "detail": f"cannot be read: {_one_line(exc)}"}], [], 0

    rows: list[tuple] = []
    # Local reads are cheap, and AES-GCM holds the GIL: fewer threads there.
    threads = (2 if read_data else 4) if v2 and repo.is_local else (DATA_THREADS if read_data else TRAILER_THREADS)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for found, unreadable, corrupt, nbytes in pool.map(one, jobs):
            rows.extend(found)
            result.unreadable.extend(unreadable)
            result.corrupt.extend(corrupt)
            if nbytes:
                result.keys_read += 1
                result.bytes_read += nbytes
    return rows


def _check_object_sizes(rows: list[tuple], old_rows: pa.Table, result: RepairIndexResult) -> list[tuple]:
    """An object whose size is not the length the index recorded has changed: keep the recorded row.

    Its name is the hash of its content, so a sound object never changes size.
    The recorded length is the right one; keeping it lets a restore detect the
    damage and read the blob from a replica (``--fallback``). Reported corrupt.
    """
    objects = old_rows.filter(pc.starts_with(old_rows["key"], "objects/")) if old_rows.num_rows else old_rows
    recorded = {(k, h): n for h, k, n in zip(objects["hash"].to_pylist(), objects["key"].to_pylist(),
                                             objects["length"].to_pylist(), strict=True)}
    out = []
    for blob, key, offset, length in rows:
        was = recorded.get((key, blob))
        if key.startswith("objects/") and was is not None and was != length:
            result.corrupt.append({"key": key, "hash": blob,
                                   "detail": f"{length} bytes stored, the index recorded {was}: kept as recorded "
                                             "(restore from a replica)"})
            out.append((blob, key, 0, was))
        else:
            out.append((blob, key, offset, length))
    return out


def _read_and_check(repo: Repository, key: str, size: int, is_pack: bool):
    """Read one key whole; return its verified rows, unreadable and corrupt findings, bytes read."""
    name = key.rsplit("/", 1)[-1]
    if not is_pack:
        hasher, nbytes = blake3.blake3(), 0
        with repo.fs.open(repo.path(key), "rb") as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
                nbytes += len(chunk)
        progress.advance("read", 1, nbytes)
        if hasher.hexdigest() != name:
            return [], [], [{"key": key, "hash": name, "detail": "content does not match its name; left out"}], nbytes
        return [(name, key, 0, nbytes)], [], [], nbytes
    data = repo.fs.cat_file(repo.path(key))
    progress.advance("read", 1, len(data))
    corrupt = []
    if blake3.blake3(data).hexdigest() != name:
        corrupt.append({"key": key, "hash": None, "detail": "pack bytes do not match the pack's name"})
    entries = pack.trailer_from_bytes(data, key)
    rows = []
    view = memoryview(data)
    for blob, offset, length in entries:
        if blake3.blake3(view[offset: offset + length]).hexdigest() == blob:
            rows.append((blob, key, offset, length))
        else:
            corrupt.append({"key": key, "hash": blob,
                            "detail": f"bytes {offset}-{offset + length} do not match the blob's hash; left out"})
    return rows, [], corrupt, len(data)


def _row2(key: str, salt: bytes, e: pack.Entry2) -> tuple:
    """A format 2 index row (``store.INDEX2_SCHEMA``'s order) for blob ``e`` of the pack ``key``."""
    return (e.id, key, e.offset, e.length, e.kind, e.seq, salt, e.raw_length, e.compressed)


def _entry_of_row(row: tuple) -> tuple[bytes, pack.Entry2]:
    blob, _key, offset, length, kind, seq, salt, raw_length, compressed = row
    return salt, pack.Entry2(blob, kind, compressed, seq, offset, length, raw_length)


def _read_and_check2(repo: Repository, key: str):
    """Format 2: read one pack whole; its name, its header, and every blob opened (tag, zstd, id)."""
    data = repo.fs.cat_file(repo.path(key))
    progress.advance("read", 1, len(data))
    corrupt = []
    if blake3.blake3(data).hexdigest() != key.rsplit("/", 1)[-1]:
        corrupt.append({"key": key, "hash": None, "detail": "pack bytes do not match the pack's name"})
    salt, entries = pack.header2_from_bytes(repo.keys, data, key)     # PackFormatError: unreadable
    rows = []
    view = memoryview(data)
    for e in entries:
        try:
            pack.open_blob2(repo.keys, salt, e, view[e.offset: e.offset + e.length])
        except KeepflowError as exc:
            reason = exc.fields.get("reason") or _one_line(exc)
            corrupt.append({"key": key, "hash": e.id,
                            "detail": f"blob {e.seq} at {e.offset}+{e.length} {reason}; left out"})
            continue
        rows.append(_row2(key, salt, e))
    return rows, [], corrupt, len(data)


def _judge_unconfirmed(repo: Repository, old_rows: pa.Table, found_hashes, sizes: dict[str, int],
                       unreadable_keys: set[str], corrupt: set[tuple], why_gone: dict[str, str],
                       result: RepairIndexResult) -> pa.Table:
    """Old rows the data did not list: keep what is provably (or possibly) still there.

    Only blobs the data holds nowhere need this: for the others the new index
    has a confirmed location already.
    """
    keep: list[tuple] = []
    recheck: list[tuple] = []
    schema = old_rows.schema
    v2 = repo.version >= 2
    unconfirmed = old_rows.filter(pc.invert(pc.is_in(old_rows["hash"], value_set=found_hashes))) \
        if old_rows.num_rows else old_rows
    gone_keys = pc.invert(pc.is_in(old_rows["key"], value_set=pa.array(sorted(sizes), pa.string())))
    result.rows_dropped = int(pc.sum(gone_keys).as_py() or 0) if old_rows.num_rows else 0
    for row in zip(*(unconfirmed[c].to_pylist() for c in schema.names), strict=True):
        blob, key, offset, length = row[:4]
        if key not in sizes:
            why_gone.setdefault(blob, f"its key {key} is gone")
        elif (key, blob) in corrupt:
            why_gone[blob] = f"corrupt in {key}"
        elif key in unreadable_keys:
            if offset + length <= sizes[key]:
                keep.append(row)          # nothing proves it wrong; the key is reported unreadable
                result.rows_kept_unverified += 1
            else:
                why_gone.setdefault(blob, f"{key} is unreadable and too short for it")
        elif offset + length > sizes[key]:
            why_gone.setdefault(blob, f"{key} is shorter than {offset + length} bytes")
        else:
            recheck.append(row)
    result.rows_unconfirmed = len(recheck)

    def check(row):
        blob, key, offset, length = row[:4]
        try:
            data = repo.fs.cat_file(repo.path(key), start=offset, end=offset + length) if length else b""
        except OSError as exc:
            return row, f"{key} cannot be read: {_one_line(exc)}"
        if v2:
            salt, entry = _entry_of_row(row)
            try:
                pack.open_blob2(repo.keys, salt, entry, data)
                return row, None
            except KeepflowError:
                return row, f"{key} no longer holds it (its blob at {offset}+{length} does not open)"
        if blake3.blake3(data).hexdigest() == blob:
            return row, None
        return row, f"{key} no longer holds it (bytes {offset}-{offset + length} do not match)"

    if recheck:
        with ThreadPoolExecutor(max_workers=TRAILER_THREADS) as pool:
            for row, problem in pool.map(check, recheck):
                if problem is None:
                    keep.append(row)
                else:
                    why_gone.setdefault(row[0], problem)
    return _rows_table(keep, schema)


def _choose_locations(candidates: pa.Table, old_rows: pa.Table) -> pa.Table:
    """One row per hash: the old index's location first, then the lowest (key, offset)."""
    if candidates.num_rows == 0:
        return candidates
    schema = candidates.schema
    candidates = _distinct_rows(candidates)
    if old_rows.num_rows:
        marked = old_rows.select(_ROW_KEYS).append_column("was", pa.array([0] * old_rows.num_rows, pa.int8()))
        candidates = candidates.join(marked, keys=_ROW_KEYS, join_type="left outer")
        rank = pc.fill_null(candidates["was"], 1)
    else:
        rank = pa.array([1] * candidates.num_rows, pa.int8())
    ranked = candidates.select(schema.names).append_column("rank", rank)
    ranked = ranked.sort_by([("rank", "ascending"), ("key", "ascending"), ("offset", "ascending")])
    chosen = indexmod.unique_hashes(ranked.select(schema.names))
    return chosen.sort_by([("key", "ascending"), ("offset", "ascending")]).cast(schema)


def _same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Two tables of distinct rows hold the same rows (every column: format 2's salt, seq... too)."""
    if a.num_rows != b.num_rows:
        return False
    if a.num_rows == 0:
        return True
    both = a.join(b.append_column("b", pa.array([1] * b.num_rows, pa.int8())), keys=a.column_names,
                  join_type="inner")
    return both.num_rows == a.num_rows


def _report_lost(repo: Repository, table: pa.Table, old_hashes, why_gone: dict[str, str],
                 result: RepairIndexResult) -> None:
    """Every content id a manifest references that the new index ``table`` cannot serve is *lost*.

    Format 2: a content id that is a list blob is lost too when its list
    cannot be read or opened, or names a chunk the new index lacks.
    """
    indexed = table["hash"]
    infos = _readable_snapshots(repo, result.damaged_manifests)
    # Two passes, one manifest at a time: the hash column of every manifest first (like
    # gc.referenced_hashes), the paths only when something is lost.
    arrays = [pc.drop_null(pc.unique(t["hash"].combine_chunks()))
              for _, t in _manifests(repo, infos, ["hash"], result.damaged_manifests)]
    referenced = pc.unique(pa.concat_arrays(arrays)) if arrays else pa.array([], pa.string())
    lost = referenced.filter(pc.invert(pc.is_in(referenced, value_set=indexed))) if len(referenced) else referenced
    bad_lists: dict[str, str] = {}
    missing_chunks = pa.array([], pa.string())
    if repo.version >= 2 and len(referenced):
        bad_lists, missing_chunks = _lists_that_lost_data(repo, table, referenced, why_gone)
    if len(lost) == 0 and not bad_lists:
        return
    dropped = pa.concat_arrays([lost, missing_chunks]) if len(missing_chunks) else lost
    was_indexed = set(pc.filter(dropped, pc.is_in(dropped, value_set=old_hashes)).to_pylist()) \
        if len(old_hashes) and len(dropped) else set()
    unexplained = sorted(was_indexed - why_gone.keys())
    if unexplained:   # cannot happen (steps 3-4 give every dropped row a reason): a bug, so change nothing
        raise RuntimeError(f"repair index of {repo.url} stopped before changing anything: {len(unexplained)} "
                           f"referenced blobs were indexed and would be dropped without a reason (first "
                           f"{unexplained[0]}); please report this keepflow bug")
    was_indexed &= set(lost.to_pylist())
    if bad_lists:
        lost = pa.concat_arrays([lost, pa.array(sorted(bad_lists), pa.string())])
    affected = _affected_files(_manifests(repo, infos, ["path", "type", "hash", "size"], []), lost)
    by_hash: dict[str, dict] = {}
    for row in affected.to_pylist():
        entry = by_hash.setdefault(row["hash"], {"snapshots": [], "paths": [], "files": 0})
        if row["snapshot"] not in entry["snapshots"]:
            entry["snapshots"].append(row["snapshot"])
        entry["files"] += 1
        if len(entry["paths"]) < MAX_PATHS and row["path"] not in entry["paths"]:
            entry["paths"].append(row["path"])
    for blob in sorted(lost.to_pylist()):
        detail = bad_lists.get(blob) or why_gone.get(blob) or (
            "indexed before, but no pack or object holds it" if blob in was_indexed
            else "in no index file and in no pack or object")
        entry = by_hash.get(blob, {"snapshots": [], "paths": [], "files": 0})
        result.lost.append({"hash": blob, "detail": detail, **entry})


def _lists_that_lost_data(repo: Repository, table: pa.Table, referenced,
                          why_gone: dict[str, str]) -> tuple[dict, pa.Array]:
    """Format 2: the referenced list blobs of ``table`` that cannot serve their file.

    Returns ``{list id: why}`` (its list cannot be read or opened, or names
    chunks ``table`` lacks) and the distinct chunk ids that are missing. Each
    list is read once (``chunk_lists.read_lists``: range reads, 8 threads on
    object stores).
    """
    from .chunk_lists import read_lists

    lists = table.filter(pc.and_(pc.equal(table["type"], pack.KIND_LIST),
                                 pc.is_in(table["hash"], value_set=referenced)))
    if lists.num_rows == 0:
        return {}, pa.array([], pa.string())
    bad: dict[str, str] = {}
    owners: list[int] = []
    totals: dict[int, int] = {}
    chunk_ids: list[str] = []
    list_ids, keys = lists["hash"].to_pylist(), lists["key"].to_pylist()
    for i, chunks in enumerate(read_lists(repo, lists)):
        if chunks is None:
            bad[list_ids[i]] = f"its chunk list in {keys[i]} cannot be read or does not open"
            continue
        chunk_ids.extend(c for c, _ in chunks)
        owners.extend([i] * len(chunks))
        totals[i] = len(chunks)
    if not chunk_ids:
        return bad, pa.array([], pa.string())
    ids = pa.array(chunk_ids, pa.string())
    absent = pc.invert(pc.is_in(ids, value_set=table["hash"]))
    missing = pc.filter(ids, absent).to_pylist()
    first_missing: dict[int, str] = {}
    counts: dict[int, int] = {}
    for owner, chunk in zip(pc.filter(pa.array(owners, pa.int64()), absent).to_pylist(), missing, strict=True):
        first_missing.setdefault(owner, chunk)
        counts[owner] = counts.get(owner, 0) + 1
    for owner, chunk in first_missing.items():
        why = why_gone.get(chunk, "in no index file and in no pack")
        bad[list_ids[owner]] = (f"{counts[owner]} of its {totals[owner]} chunks are in no pack (first {chunk[:16]}: "
                                f"{why})")
    return bad, pc.unique(pa.array(missing, pa.string()))


def _readable_snapshots(repo: Repository, damaged: list[dict]) -> list[manifest.SnapshotInfo]:
    """Every snapshot whose footer reads; the others are named in ``damaged``.

    A damaged manifest never stops a repair: it is named, left alone, and
    makes the run end with exit 1.
    """
    found: list = []
    infos = snapshots.list_snapshots(repo, damaged=found)
    damaged.extend({"key": f"snapshots/{d.name}", "detail": d.reason} for d in found)
    return infos


def _manifests(repo: Repository, infos, columns: Sequence[str] | None, damaged: list[dict]):
    """``(info, table)`` for each of ``infos`` whose rows read, one at a time; the others go to ``damaged``."""
    for info in infos:
        try:
            table = manifest.read_manifest(repo, info, columns=columns)
        except (OSError, ValueError, KeyError) as exc:    # footer fine, rows not (pyarrow raises ValueErrors)
            damaged.append({"key": f"snapshots/{info.key}", "detail": _one_line(exc)})
            continue
        yield info, table


def _affected_files(manifests, hashes: pa.Array) -> pa.Table:
    """Every file entry of ``manifests`` whose hash is in ``hashes``: snapshot, path, hash, size."""
    parts = []
    for info, table in manifests:
        hit = table.filter(pc.and_(pc.equal(table["type"], "file"), pc.is_in(table["hash"], value_set=hashes)))
        if hit.num_rows:
            parts.append(pa.table({"snapshot": pa.array([info.id] * hit.num_rows, pa.string()),
                                   "path": hit["path"], "hash": hit["hash"], "size": hit["size"]}))
    if not parts:
        return pa.table({"snapshot": pa.array([], pa.string()), "path": pa.array([], pa.string()),
                         "hash": pa.array([], pa.string()), "size": pa.array([], pa.int64())})
    return pa.concat_tables(parts)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# -- repair snapshots ------------------------------------------------------------------

def _replace_snapshots(repo: Repository, indexed, result: RepairSnapshotsResult) -> None:
    snaps = _readable_snapshots(repo, result.damaged_manifests)
    result.snapshots = len(snaps)
    replacement_of = {s.parent: s for s in snaps if REPAIRED_TAG in s.tags and s.parent}
    lost_blobs: set[str] = set()
    for info, table in _manifests(repo, snaps, None, result.damaged_manifests):
        is_file = pc.fill_null(pc.equal(table["type"], "file"), False)
        lost = pc.and_(is_file, pc.invert(pc.fill_null(pc.is_in(table["hash"], value_set=indexed), False)))
        if not pc.any(lost).as_py():
            continue                                        # whole: untouched
        result.snapshots_damaged += 1
        dropped = table.filter(lost)
        lost_blobs.update(dropped["hash"].to_pylist())
        existing = replacement_of.get(info.id)
        if existing is not None:
            result.already_replaced.append({"original": info.id, "replacement": existing.id})
        else:
            new = _replacement_info(info, dropped)
            if not result.dry_run:
                manifest.write_manifest(repo, table.filter(pc.invert(lost)), new)
            result.replaced.append({"original": info.id, "replacement": new.id, "time": new.time,
                                    "source": info.source, "files_dropped": dropped.num_rows,
                                    "bytes_dropped": int(pc.sum(dropped["size"]).as_py() or 0)})
            for row in dropped.select(["path", "hash", "size"]).to_pylist():
                result.files_dropped.append({"snapshot": info.id, "replacement": new.id, **row})
        if result.forget:
            gc.forget(repo, [info], result.dry_run)         # after its replacement is stored
            result.forgotten.append(info.id)
    result.blobs_lost = len(lost_blobs)


def _replacement_info(info: manifest.SnapshotInfo, dropped: pa.Table) -> manifest.SnapshotInfo:
    later = dt.datetime.fromisoformat(info.time) + dt.timedelta(microseconds=1)
    tags = list(info.tags) + ([] if REPAIRED_TAG in info.tags else [REPAIRED_TAG])
    return dataclasses.replace(
        info, id=uuid.uuid4().hex[:16], time=later.isoformat(timespec="microseconds"), parent=info.id, tags=tags,
        files=info.files - dropped.num_rows, bytes=info.bytes - int(pc.sum(dropped["size"]).as_py() or 0), key="")
