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
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# Two seconds covers the coarsest common mtime granularity (FAT) and the
# kernel's coarse clock on ext4/xfs many times over.
RACY_WINDOW_NS = 2_000_000_000

PARENT_COLUMNS = ["path", "type", "size", "mtime_ns", "ctime_ns", "inode", "hash"]


@dataclass
class DiffResult:
    table: pa.Table          # scan columns + hash (reused or null) + needs_read flag
    new: int
    changed: int
    unchanged: int
    deleted: int

    @property
    def to_read(self) -> pa.Table:
        return self.table.filter(self.table["needs_read"])


def diff(scan: pa.Table, parent: pa.Table | None, parent_start_ns: int = 0,
         rehash: bool = False) -> DiffResult:
    is_file = pc.equal(scan["type"], "file")
    if parent is None or parent.num_rows == 0:
        table = scan.append_column("hash", pa.nulls(scan.num_rows, pa.string()))
        table = table.append_column("needs_read", is_file)
        table = table.append_column("parent_hash", pa.nulls(scan.num_rows, pa.string()))
        new = pc.sum(is_file).as_py() or 0
        return DiffResult(table, new=new, changed=0, unchanged=0, deleted=0)

    parent = parent.select(PARENT_COLUMNS).rename_columns([f"p_{c}" if c != "path" else "path" for c in PARENT_COLUMNS])
    # Join only the columns compared: Arrow's hash join carries no nested
    # columns (xattrs), and narrower is faster. Paths are unique, so sorting
    # by the scan's row number lines the parent's columns up with the scan.
    narrow = scan.select(["path", "type", "size", "mtime_ns", "ctime_ns", "inode"])
    narrow = narrow.append_column("_row", pa.array(range(scan.num_rows), pa.int64()))
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

    hashes = pc.if_else(same, joined["p_hash"], pa.scalar(None, pa.string()))
    out = scan.append_column("hash", hashes)
    out = out.append_column("needs_read", needs_read)
    # Kept so the final report can classify re-read files by content.
    out = out.append_column("parent_hash", pc.if_else(is_file, joined["p_hash"], pa.scalar(None, pa.string())))

    new = pc.sum(pc.and_(is_file, pc.invert(in_parent))).as_py() or 0
    unchanged = pc.sum(same).as_py() or 0
    files = pc.sum(is_file).as_py() or 0
    parent_files = parent.filter(pc.equal(parent["p_type"], "file"))
    still_there = pc.is_in(parent_files["path"], value_set=pa.concat_arrays(scan["path"].chunks) if scan["path"].num_chunks else pa.array([], pa.string()))
    deleted = parent_files.num_rows - (pc.sum(still_there).as_py() or 0)
    return DiffResult(out, new=new, changed=files - new - unchanged, unchanged=unchanged, deleted=deleted)


def distrust_unindexed(result: DiffResult, indexed: pa.Array | pa.ChunkedArray) -> DiffResult:
    """Re-read unchanged files whose parent hash the index does not hold.

    A parent snapshot can reference lost data (a pack deleted by hand, the
    old compaction bug); reusing its hash would carry the loss into the new
    snapshot, and the commit guard would then refuse the whole backup. Reading
    such files again stores their data anew, so the backup heals instead.
    """
    table = result.table
    reused = pc.and_(pc.invert(table["needs_read"]), pc.is_valid(table["hash"]))
    lost = pc.and_(reused, pc.invert(pc.is_in(table["hash"], value_set=indexed)))
    count = pc.sum(lost).as_py() or 0
    if not count:
        return result
    table = table.set_column(table.schema.get_field_index("needs_read"), "needs_read", pc.or_(table["needs_read"], lost))
    table = table.set_column(table.schema.get_field_index("hash"), "hash",
                             pc.if_else(lost, pa.scalar(None, pa.string()), table["hash"]))
    return DiffResult(table, new=result.new, changed=result.changed + count, unchanged=result.unchanged - count,
                      deleted=result.deleted)


def final_counts(table: pa.Table) -> dict:
    """Classify files by content once every hash is known (after storing).

    A re-read file whose hash equals its parent's counts as unchanged, so a
    full (``--rehash``) backup of an unchanged tree reports no changes.
    """
    is_file = pc.equal(table["type"], "file")
    has_parent = pc.and_(is_file, pc.is_valid(table["parent_hash"]))
    same = pc.and_(has_parent, pc.fill_null(pc.equal(table["hash"], table["parent_hash"]), False))
    files = pc.sum(is_file).as_py() or 0
    with_parent = pc.sum(has_parent).as_py() or 0
    unchanged = pc.sum(same).as_py() or 0
    return {"new": files - with_parent, "changed": with_parent - unchanged, "unchanged": unchanged}
