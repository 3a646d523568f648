"""A restore's plan, written a manifest row group at a time (restore.prepare's middle).

The snapshot's manifest is read a row group at a time (manifest.ManifestRows,
path order); each group is selected (``--include``), split into files to
write and other entries, its files looked up in the compact index
(locations.py) and sorted by (pack key, offset) within the group, format 2's
chunk lists expanded, and the rows handed to the batch cutter, which writes
each batch's work list (and chunk list) as soon as the batch is complete.
Memory: the index's compact columns, one row group, one pending batch, and
the folders (one string per folder, for ``_make_dirs``); never the whole
manifest, nor a join of it with the index (1M files: 1.6 GiB that way).

Sorting by pack within a group, not across the snapshot: files are packed in
path order by the backup that stored them, so a group's files already come
from few packs, and a batch still reads each pack's blobs in offset order.

Path order also serves hard links and ``--include``'s folders: a hard link's
first name (``hardlink_to``) sorts before the others, so when a further name
comes its first name is known to be restored or not; a folder's entry comes
before its contents, so folders are held (they are few) and selected at the
end, with the folders above every selected entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import manifest, restore_chunks
from . import scratch as scratch_io
from .locations import BlobLocations
from .repository import Repository


@dataclass
class PlanFacts:
    batches: list[tuple[int, int]] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    selected: int = 0
    folders: set[str] = field(default_factory=lambda: {""})
    missing: list[str] = field(default_factory=list)


def write_plan(repo: Repository, rows: manifest.ManifestRows, scratch: str, *, spec: Any, local_target: bool,
               fallbacks: Sequence[Callable[[], Repository | None]], batch_columns: list[str],
               max_files: int, max_bytes: int, parent_folders: Callable[[pa.Table, bool], set[str]],
               dir_paths: Callable[[pa.Table, bool], list[str]]) -> PlanFacts:
    """Write the plan of restoring the manifest ``rows`` into ``scratch``: the
    ``batch-N`` work lists (``batch_columns``), format 2's ``chunks-N``, and
    ``other`` (folders, links, special entries, further hard-link names)."""
    facts = PlanFacts()
    leaders = _hard_link_leaders(rows) if local_target else set()
    restored_leaders: set[str] = set()
    leader_raw: dict[str, bytes] = {}
    locations = BlobLocations(repo)
    v2 = repo.version >= 2
    columns = batch_columns + (["kind", "seq", "salt", "raw_length", "compressed"] if v2 else [])
    work = _RestoreWork(scratch, columns, "size" if v2 else "length", max_files, max_bytes, v2)
    other = scratch_io.TableWriter(scratch, "other")
    wrote_other = False
    dirs: list[pa.Table] = []
    ancestors: set[str] = set()
    for group in rows.groups():
        if spec is not None:
            group = _select_group(group, spec, ancestors)
        if leaders:
            _note_leader_bytes(group, leaders, leader_raw)
        group = _with_link_target_bytes(group, leader_raw)
        kinds = group["type"]
        is_dir = pc.equal(kinds, "dir")
        dirs.append(group.filter(is_dir))
        entries = group.filter(pc.invert(is_dir))
        facts.selected += entries.num_rows
        is_file = pc.equal(entries["type"], "file")
        files = entries.filter(is_file)
        rest = entries.filter(pc.invert(is_file))
        facts.symlinks += pc.sum(pc.equal(rest["type"], "symlink")).as_py() or 0
        files, hard_links = _split_hard_links(files, leaders, restored_leaders)
        facts.folders |= parent_folders(entries, local_target)
        for table in (rest, hard_links):
            if table.num_rows:
                other.write(table)
                wrote_other = True
        facts.files += files.num_rows
        facts.bytes += pc.sum(files["size"]).as_py() or 0
        if files.num_rows:
            _add_files(work, repo, files, locations, fallbacks, facts)
        del group, entries, files, rest, hard_links
    held = pa.concat_tables(dirs) if dirs else None
    if held is not None and spec is not None:
        keep = [p in ancestors or bool(spec.match_file(p + "/")) for p in held["path"].to_pylist()]
        held = held.filter(pa.array(keep, pa.bool_()))
    if held is not None and held.num_rows:
        facts.dirs = held.num_rows
        facts.selected += held.num_rows
        facts.folders |= set(dir_paths(held, local_target))
        other.write(held)
        wrote_other = True
    if not wrote_other:
        other.write(_with_link_target_bytes(manifest.MANIFEST_SCHEMA.empty_table(), {}))
    other.close()
    facts.batches = work.close()
    return facts


def _add_files(work: _RestoreWork, repo: Repository, files: pa.Table, locations: BlobLocations,
               fallbacks: Sequence[Callable[[], Repository | None]], facts: PlanFacts) -> None:
    where = locations.locate(files["hash"])
    located = files
    for name in where.column_names:
        located = located.append_column(name, where[name])
    missing = pc.is_null(located["key"])
    if pc.any(missing).as_py():
        facts.missing.extend(located.filter(missing)["path"].to_pylist())
        located = located.filter(pc.invert(missing))
    located = located.sort_by([("key", "ascending"), ("offset", "ascending")])
    chunks = None
    if repo.version >= 2:
        located, chunks, unreadable = restore_chunks.expand_lists(repo, located, locations.locate, fallbacks)
        facts.missing.extend(unreadable["path"].to_pylist())
    work.add(located, chunks)


def _hard_link_leaders(rows: manifest.ManifestRows) -> set[str]:
    """The first names of hard-linked files (few: only files with several names)."""
    leaders: set[str] = set()
    for group in rows.groups(["hardlink_to"]):
        column = group["hardlink_to"]
        if column.null_count < len(column):
            leaders.update(pc.unique(pc.drop_null(column)).to_pylist())
    return leaders


def _note_leader_bytes(group: pa.Table, leaders: set[str], raw: dict[str, bytes]) -> None:
    """Remember the raw path of each first name that is not UTF-8 (its further names come later)."""
    if group["path_bytes"].null_count == group.num_rows:
        return
    named = group.filter(pc.and_(pc.is_valid(group["path_bytes"]),
                                 pc.is_in(group["path"], value_set=pa.array(list(leaders), pa.string()))))
    raw.update(zip(named["path"].to_pylist(), named["path_bytes"].to_pylist(), strict=True))


def _with_link_target_bytes(group: pa.Table, raw: dict[str, bytes]) -> pa.Table:
    """Add ``hardlink_to_bytes``: the raw path of each hard link's first name (when not UTF-8)."""
    column = pa.nulls(group.num_rows, pa.binary())
    if raw and group["hardlink_to"].null_count < group.num_rows:
        column = pa.array([raw.get(p) if p is not None else None for p in group["hardlink_to"].to_pylist()],
                          pa.binary())
    return group.append_column("hardlink_to_bytes", column)


def _split_hard_links(files: pa.Table, leaders: set[str], restored: set[str]) -> tuple[pa.Table, pa.Table]:
    """Files to write, and further names of a file to link to it once it is written.

    A name is linked only when the name it points at is restored too (an
    ``--include`` may leave it out) and the target is local (``leaders`` is
    empty otherwise); otherwise it is written as a file of its own.
    """
    if not leaders:
        return files, files.slice(0, 0)
    is_leader = pc.is_in(files["path"], value_set=pa.array(list(leaders), pa.string()))
    is_link = pc.is_valid(files["hardlink_to"])
    if pc.any(is_link).as_py():
        # A first name in this group counts as restored (it sorts before its further names).
        restored.update(files.filter(pc.and_(is_leader, pc.invert(is_link)))["path"].to_pylist())
        linked = pc.and_(is_link, pc.is_in(files["hardlink_to"], value_set=pa.array(list(restored), pa.string())))
        return files.filter(pc.invert(linked)), files.filter(linked)
    restored.update(files.filter(is_leader)["path"].to_pylist())
    return files, files.slice(0, 0)


def _select_group(group: pa.Table, spec: Any, ancestors: set[str]) -> pa.Table:
    """The entries of ``group`` matching the include patterns; folders are all kept here
    (selected at the end: the folders above every selected entry come along, so
    their mode and mtime are restored too), and ``ancestors`` gains those folders."""
    paths = group["path"].to_pylist()
    kinds = group["type"].to_pylist()
    keep = []
    for p, k in zip(paths, kinds, strict=True):
        if k == "dir":
            keep.append(True)
            continue
        chosen = bool(spec.match_file(p))
        keep.append(chosen)
        if chosen:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                ancestors.add("/".join(parts[:i]))
    return group.filter(pa.array(keep, pa.bool_()))


class _RestoreWork:
    """The batches' work lists (and format 2's chunk lists), cut as ``scratch.cut_ranges``
    cuts the whole plan (greedy, so every range but the last of any prefix is final) and
    written as soon as each batch is complete; only one pending batch is held."""

    def __init__(self, scratch: str, columns: list[str], sized_by: str, max_files: int, max_bytes: int,
                 chunked: bool) -> None:
        self._scratch, self._columns, self._sized_by = scratch, columns, sized_by
        self._max_files, self._max_bytes, self._chunked = max_files, max_bytes, chunked
        self._rows: list[pa.Table] = []
        self._chunks: list[pa.Table] = []       # ``_file`` relative to the pending rows' start
        self._held = 0
        self._start = 0                          # plan row of the first pending row
        self.batches: list[tuple[int, int]] = []

    def add(self, located: pa.Table, chunks: pa.Table | None) -> None:
        if not located.num_rows:
            return
        self._rows.append(located.select(self._columns))
        if chunks is not None:
            self._chunks.append(chunks.set_column(0, "_file", pc.add(chunks["_file"], self._held)))
        self._held += located.num_rows
        self._cut(final=False)

    def close(self) -> list[tuple[int, int]]:
        self._cut(final=True)
        return self.batches

    def _cut(self, final: bool) -> None:
        if not self._rows:
            return
        rows = pa.concat_tables(self._rows)
        sizes = rows[self._sized_by].to_numpy(zero_copy_only=False)
        ranges = scratch_io.cut_ranges(sizes, self._max_files, self._max_bytes)
        done = ranges if final else ranges[:-1]
        if not done:
            return
        chunks = pa.concat_tables(self._chunks) if self._chunks else None
        for a, b in done:
            number = len(self.batches)
            self.batches.append((self._start + a, self._start + b))
            scratch_io.write_part(self._scratch, "batch", number, rows.slice(a, b - a))
            if self._chunked:
                mine = restore_chunks.empty_chunks() if chunks is None else chunks.filter(
                    pc.and_(pc.greater_equal(chunks["_file"], a), pc.less(chunks["_file"], b)))
                scratch_io.write_part(self._scratch, "chunks", number,
                                      mine.set_column(0, "_file", pc.subtract(mine["_file"], a)))
        end = done[-1][1]
        self._start += end
        left = rows.slice(end)
        self._rows = [left] if left.num_rows else []
        self._held = left.num_rows
        if chunks is not None and left.num_rows:
            rest = chunks.filter(pc.greater_equal(chunks["_file"], end))
            self._chunks = [rest.set_column(0, "_file", pc.subtract(rest["_file"], end))]
        else:
            self._chunks = []
