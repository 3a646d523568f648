"""Diffing a scan against the parent manifest: what must be read, what is reused.

One vectorised left join (Arrow's hash join) of the scan with the parent's
``path, type, size, mtime_ns, ctime_ns, inode, hash`` columns decides, for
every file at once, whether it is unchanged. Following restic's
``fileChanged``, a file is unchanged when size, mtime_ns, and (where the
source has them) ctime_ns and inode all match; then its parent hash is reused
and the file is never opened.

Racy-timestamp guard (borg's ``file_known_and_unchanged``): a file whose mtime
is within ``RACY_WINDOW_NS`` of the parent snapshot's scan start could have
been modified again in the same timestamp granule after it was read, without
its mtime moving. Such parent entries are not trusted: the file is read again.

``--rehash`` (a "full" backup) trusts nothing and reads every file.

Extended attributes (``inherit_xattrs``). Setting or removing one changes
the entry's ctime, so an entry whose type, inode and ctime match its parent
row has the parent's attributes: the diff takes them from the parent (by the
parent row's number: Arrow's join carries no nested column) and lists the
rows whose attributes must still be read (``DiffResult.xattrs_to_read``:
new entries, changed ones, and those whose parent ctime is within the racy
window). The scan then skips ``listxattr`` for unchanged entries: one system
call per entry, 2-3 s of a 1M-file no-change backup. Only for a local
source whose parent read attributes (``SnapshotInfo.xattrs``).

Memory. Both sides are sorted by path (the scan sorts; a manifest is a
sorted scan, and is sorted here if it is not), so the join runs on
``CHUNK_ROWS`` scan rows at a time against the parent rows of the same path
range, found by bisecting the parent's path column: Arrow's hash table is
built for one slice of the parent at a time, never for the whole tree (on
1M files the single join peaked at +490 MiB). Deleted files are counted per
slice (parent files the slice's join did not match), without a set of every
scanned path. The result's new columns are chunked arrays, one chunk per
slice. ``parent_hash`` is kept only for files that are read again (for a
file that is not read, its parent hash is its hash): the other rows hold a
null, which costs 4 bytes instead of 68.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .columns import nulls
from .manifest import MANIFEST_SCHEMA

if TYPE_CHECKING:
    from .known_blobs import KnownBlobs

# Two seconds covers the coarsest common mtime granularity (FAT) and the
# kernel's coarse clock on ext4/xfs many times over.
RACY_WINDOW_NS = 2_000_000_000

PARENT_COLUMNS = ["path", "type", "size", "mtime_ns", "ctime_ns", "inode", "hash"]
# Scan rows joined at a time: large enough that per-join overhead is noise
# (16 joins for 1M files), small enough that the hash table stays a few MiB.
CHUNK_ROWS = 65536


@dataclass
class DiffResult:
    table: pa.Table          # scan columns + hash (reused or null) + needs_read flag
    new: int
    changed: int
    unchanged: int
    deleted: int
    xattrs_to_read: np.ndarray | None = None    # with inherit_xattrs: rows whose attributes the parent lacks

    @property
    def to_read(self) -> pa.Table:
        return self.table.filter(self.table["needs_read"])


def diff(scan: pa.Table, parent: pa.Table | None, parent_start_ns: int = 0,
         rehash: bool = False) -> DiffResult:
    """The whole diff as one table (``diff_parts`` collected)."""
    parts = list(diff_parts(scan, parent, parent_start_ns, rehash))
    return DiffResult(pa.concat_tables([p.table for p in parts]), new=sum(p.new for p in parts),
                      changed=sum(p.changed for p in parts), unchanged=sum(p.unchanged for p in parts),
                      deleted=sum(p.deleted for p in parts))


def diff_parts(scan: pa.Table, parent: pa.Table | None, parent_start_ns: int = 0,
               rehash: bool = False) -> Iterator[DiffResult]:
    """The diff of a whole scan table in consecutive slices of the scan (at
    least one), in scan order; ``diff_stream`` over the table's slices.

    Each part has its own counts; their sums are the diff's (a deleted file
    is counted in the part whose parent slice held it). When the scan is not
    sorted by path (a hand-built table), one part covers everything: the
    plain hash join.
    """
    n = scan.num_rows
    chunks = (scan.slice(start, CHUNK_ROWS) for start in range(0, max(n, 1), CHUNK_ROWS))
    if parent is None or parent.num_rows == 0:
        yield from diff_stream(chunks, None, parent_start_ns, rehash)
        return
    if not _sorted_unique(scan["path"]):
        yield _diff_piece(scan, _prefixed(parent), parent_start_ns, rehash)
        return
    if not _sorted_unique(parent["path"]):
        parent = parent.sort_by("path")
        if not _sorted_unique(parent["path"]):          # the parent repeats a path: one plain join
            yield _diff_piece(scan, _prefixed(parent), parent_start_ns, rehash)
            return
    yield from diff_stream(chunks, [parent], parent_start_ns, rehash)


def diff_stream(scan_chunks: Iterable[pa.Table], parent_groups: Iterable[pa.Table] | None,
                parent_start_ns: int = 0, rehash: bool = False,
                inherit_xattrs: bool = False) -> Iterator[DiffResult]:
    """The diff of a scan given in path order (``scan.scan_stream``'s chunks)
    against the parent's rows in path order (``PARENT_COLUMNS``, e.g. the row
    groups of a manifest whose ``ManifestRows.sorted_by_path`` holds; see
    ``sorted_parent`` for one that is not), one result per scan chunk.

    Each chunk is joined with the parent rows of its path range only, pulled
    a row group at a time as the scan advances: neither side is ever whole in
    memory. A scan chunk out of path order is a bug, not a state of the
    source: it raises rather than pair the wrong rows.

    ``inherit_xattrs``: the scan left extended attributes out; take them from
    the parent where its row still describes the entry (module docstring).
    """
    if parent_groups is None:
        for piece in scan_chunks:
            is_file = pc.equal(piece["type"], "file")
            piece = piece.append_column("hash", nulls(pa.string(), piece.num_rows))
            piece = piece.append_column("needs_read", is_file)
            piece = piece.append_column("parent_hash", nulls(pa.string(), piece.num_rows))
            every = np.arange(piece.num_rows, dtype=np.int64) if inherit_xattrs else None
            yield DiffResult(piece, new=pc.sum(is_file).as_py() or 0, changed=0, unchanged=0, deleted=0,
                             xattrs_to_read=every)
        return
    parent = _ParentRows((_prefixed(g, inherit_xattrs) for g in parent_groups), inherit_xattrs)
    last: str | None = None
    chunks = iter(scan_chunks)
    chunk = next(chunks, None)
    while chunk is not None:
        following = next(chunks, None)
        paths, n = chunk["path"], chunk.num_rows
        if n:
            first = paths[0].as_py()
            if not _sorted_unique(paths) or (last is not None and not last < first):
                raise RuntimeError("the scan came out of path order (a bug in keepflow's scan); nothing was stored")
            last = paths[n - 1].as_py()
        if following is None:
            yield _diff_piece(chunk, parent.rest(), parent_start_ns, rehash, inherit_xattrs)
        elif n:
            yield _diff_piece(chunk, parent.upto(last), parent_start_ns, rehash,   # type: ignore[arg-type]
                              inherit_xattrs)
        chunk = following


def sorted_parent(parent: pa.Table) -> pa.Table:
    """A parent table that ``diff_stream`` can walk: sorted by path, each path
    once (a manifest keepflow wrote is both already; a hand-made one that
    repeats a path keeps its first row)."""
    if _sorted_unique(parent["path"]):
        return parent
    parent = parent.sort_by("path")
    paths, n = parent["path"], parent.num_rows
    if n > 1:
        repeat = pc.equal(paths.slice(1), paths.slice(0, n - 1))
        if pc.any(repeat).as_py():
            keep = pa.concat_arrays([pa.array([True]), pc.invert(repeat).combine_chunks()])
            parent = parent.filter(keep)
    return parent


def _prefixed(parent: pa.Table, xattrs: bool = False) -> pa.Table:
    columns = PARENT_COLUMNS + (["xattrs"] if xattrs else [])
    return parent.select(columns).rename_columns([f"p_{c}" if c != "path" else "path" for c in columns])


def _diff_piece(piece: pa.Table, parent_slice: pa.Table, parent_start_ns: int, rehash: bool,
                inherit_xattrs: bool = False) -> DiffResult:
    """One scan piece against the (prefixed) parent rows of its path range."""
    # Join only the columns compared: Arrow's hash join carries no nested
    # columns (xattrs: the parent row's number instead), and narrower is faster.
    narrow = piece.select(["path", "type", "size", "mtime_ns", "ctime_ns", "inode"])
    parent_xattrs = None
    if inherit_xattrs:
        parent_xattrs = parent_slice["p_xattrs"]
        rows = np.arange(parent_slice.num_rows, dtype=np.int64)
        parent_slice = parent_slice.drop_columns(["p_xattrs"]).append_column(
            "p_row", pa.Array.from_buffers(pa.int64(), len(rows), [None, pa.py_buffer(rows)]))
    part = _diff_slice(narrow, parent_slice, parent_start_ns, rehash)
    to_read = None
    if parent_xattrs is not None:
        source_row = part["xattrs_from"]
        at = piece.schema.get_field_index("xattrs")
        piece = piece.set_column(at, piece.schema.field(at),
                                 parent_xattrs.take(source_row).cast(piece.schema.field(at).type))
        to_read = np.flatnonzero(pc.is_null(source_row).to_numpy(zero_copy_only=False))
    piece = piece.append_column("hash", part["hash"])
    piece = piece.append_column("needs_read", part["needs_read"])
    # Kept so the final report can classify re-read files by content.
    piece = piece.append_column("parent_hash", part["parent_hash"])
    files = pc.sum(pc.equal(piece["type"], "file")).as_py() or 0
    parent_files = pc.sum(pc.equal(parent_slice["p_type"], "file")).as_py() or 0
    return DiffResult(piece, new=part["new"], changed=files - part["new"] - part["unchanged"],
                      unchanged=part["unchanged"], deleted=parent_files - part["matched_parent_files"],
                      xattrs_to_read=to_read)


class _ParentRows:
    """The parent's rows in path order, pulled a table at a time as the scan
    advances: ``upto(path)`` gives the rows not yet given whose path is at
    most ``path``; only the last table pulled can hold rows beyond it, and
    those wait for the next call."""

    def __init__(self, tables: Iterable[pa.Table], xattrs: bool = False) -> None:
        self._tables = iter(tables)
        self._held: list[pa.Table] = []
        self._schema: pa.Schema | None = None
        self._xattrs = xattrs

    def _pull(self) -> bool:
        table = next(self._tables, None)
        if table is None:
            return False
        self._schema = table.schema
        if table.num_rows:
            self._held.append(table)
        return True

    def upto(self, path: str) -> pa.Table:
        while not self._held or self._held[-1]["path"][-1].as_py() <= path:
            if not self._pull():
                break
        if not self._held:
            return self._empty()
        last = self._held[-1]
        k = pc.sum(pc.less_equal(last["path"], path)).as_py() or 0     # sorted: the rows <= path come first
        out = [*self._held[:-1], last.slice(0, k)]
        self._held = [last.slice(k)] if k < last.num_rows else []
        return pa.concat_tables(out)

    def rest(self) -> pa.Table:
        while self._pull():
            pass
        out, self._held = self._held, []
        return pa.concat_tables(out) if out else self._empty()

    def _empty(self) -> pa.Table:
        if self._schema is None:
            return _prefixed(MANIFEST_SCHEMA.empty_table(), self._xattrs)
        return self._schema.empty_table()


def _sorted_unique(paths: pa.ChunkedArray) -> bool:
    """True when every path is greater than the one before (vectorised)."""
    n = len(paths)
    return n < 2 or bool(pc.all(pc.less(paths.slice(0, n - 1), paths.slice(1))).as_py())


def _diff_slice(narrow: pa.Table, parent: pa.Table, parent_start_ns: int, rehash: bool) -> dict:
    """The unchanged rule for one slice: hash, needs_read and parent_hash in scan order."""
    # Paths are unique, so sorting by the scan's row number lines the
    # parent's columns up with the scan.
    # from_buffers, not pa.array(ndarray): the first pa.array of a numpy array imports
    # numpy.ma (0.1-0.4 s here), a cost every no-change backup paid for this one column.
    rows = np.arange(narrow.num_rows, dtype=np.int64)
    narrow = narrow.append_column("_row", pa.Array.from_buffers(pa.int64(), len(rows), [None, pa.py_buffer(rows)]))
    joined = narrow.join(parent, keys="path", join_type="left outer").sort_by("_row")

    in_parent = pc.is_valid(joined["p_type"])
    is_file = pc.equal(joined["type"], "file")
    same = pc.and_kleene(pc.equal(joined["p_type"], "file"), pc.is_valid(joined["p_hash"]))
    same = pc.and_kleene(same, pc.equal(joined["size"], joined["p_size"]))
    same = pc.and_kleene(same, pc.equal(joined["mtime_ns"], joined["p_mtime_ns"]))
    for col in ("ctime_ns", "inode"):
        # Compare only where both sides know the value (remote sources do not).
        both = pc.and_(pc.is_valid(joined[col]), pc.is_valid(joined[f"p_{col}"]))
        equal_or_unknown = pc.or_(pc.invert(both), pc.fill_null(pc.equal(joined[col], joined[f"p_{col}"]), False))
        same = pc.and_kleene(same, equal_or_unknown)
    if parent_start_ns:
        racy = pc.greater_equal(joined["p_mtime_ns"], parent_start_ns - RACY_WINDOW_NS)
        same = pc.and_kleene(same, pc.invert(pc.fill_null(racy, False)))
    same = pc.and_(is_file, pc.fill_null(same, False))
    if rehash:
        same = pc.and_(same, pa.scalar(False))
    needs_read = pc.and_(is_file, pc.invert(same))
    null = pa.scalar(None, pa.string())
    xattrs_from = None
    if "p_row" in joined.column_names:
        # The parent row still describes the entry's attributes: same type and
        # inode, and a ctime that is known on both sides, equal, and older than
        # the parent scan's racy window (an attribute set in the same granule
        # after the parent read it would not have moved the ctime).
        kept = pc.and_kleene(pc.equal(joined["type"], joined["p_type"]), pc.equal(joined["inode"], joined["p_inode"]))
        kept = pc.and_kleene(kept, pc.equal(joined["ctime_ns"], joined["p_ctime_ns"]))
        if parent_start_ns:
            kept = pc.and_kleene(kept, pc.less(joined["p_ctime_ns"], parent_start_ns - RACY_WINDOW_NS))
        if rehash:
            kept = pc.and_(kept, pa.scalar(False))
        kept = pc.fill_null(kept, False)
        xattrs_from = _one_chunk(pc.if_else(kept, joined["p_row"], pa.scalar(None, pa.int64())))
    return {
        "xattrs_from": xattrs_from,
        "hash": _one_chunk(pc.if_else(same, joined["p_hash"], null)),
        "needs_read": _one_chunk(needs_read),
        "parent_hash": _one_chunk(pc.if_else(needs_read, joined["p_hash"], null)),
        "new": pc.sum(pc.and_(is_file, pc.invert(in_parent))).as_py() or 0,
        "unchanged": pc.sum(same).as_py() or 0,
        "matched_parent_files": pc.sum(pc.equal(joined["p_type"], "file")).as_py() or 0,
    }


def _one_chunk(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values


def distrust_unindexed(result: DiffResult, indexed: KnownBlobs) -> DiffResult:
    """Re-read unchanged files whose parent hash the index does not hold.

    A parent snapshot can reference lost data (a pack deleted by hand, the
    old compaction bug); reusing its hash would carry the loss into the new
    snapshot, and the commit guard would then refuse the whole backup. Reading
    such files again stores their data anew, so the backup heals instead.

    ``indexed``: a ``KnownBlobs`` (compact, vectorised lookups) or an Arrow
    column of the indexed hashes.
    """
    table = result.table
    reused = pc.and_(pc.invert(table["needs_read"]), pc.is_valid(table["hash"]))
    if hasattr(indexed, "contains_many"):
        held = indexed.contains_many(table["hash"])
    else:
        held = pc.is_in(table["hash"], value_set=indexed)
    lost = pc.and_(reused, pc.invert(held))
    count = pc.sum(lost).as_py() or 0
    if not count:
        return result
    table = table.set_column(table.schema.get_field_index("needs_read"), "needs_read",
                             pc.or_(table["needs_read"], lost))
    # A file that is read again keeps its parent hash (see the module docstring).
    table = table.set_column(table.schema.get_field_index("parent_hash"), "parent_hash",
                             pc.if_else(lost, table["hash"], table["parent_hash"]))
    table = table.set_column(table.schema.get_field_index("hash"), "hash",
                             pc.if_else(lost, pa.scalar(None, pa.string()), table["hash"]))
    return DiffResult(table, new=result.new, changed=result.changed + count, unchanged=result.unchanged - count,
                      deleted=result.deleted, xattrs_to_read=result.xattrs_to_read)


def final_counts(table: pa.Table) -> dict:
    """Classify files by content once every hash is known (after storing).

    A re-read file whose hash equals its parent's counts as unchanged, so a
    full (``--rehash``) backup of an unchanged tree reports no changes. A file
    that was not read reused its parent's hash (``parent_hash`` is null there,
    see the module docstring): unchanged.
    """
    is_file = pc.equal(table["type"], "file")
    has_parent = pc.and_(is_file, pc.is_valid(table["parent_hash"]))
    same = pc.and_(has_parent, pc.fill_null(pc.equal(table["hash"], table["parent_hash"]), False))
    files = pc.sum(is_file).as_py() or 0
    with_parent = pc.sum(has_parent).as_py() or 0
    unchanged = pc.sum(same).as_py() or 0
    if "needs_read" in table.column_names:
        reused = pc.sum(pc.and_(is_file, pc.invert(table["needs_read"]))).as_py() or 0
        with_parent += reused
        unchanged += reused
    return {"new": files - with_parent, "changed": with_parent - unchanged, "unchanged": unchanged}
