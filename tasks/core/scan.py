"""Scanning a source into an Arrow table of entries (no file is opened).

Local sources are walked with ``os.scandir`` depth-first; each entry costs one
``lstat`` (symlinks are recorded as links, never followed). Memory stays
proportional to Arrow's compact columns, never to Python objects per entry:
a folder is listed ``FLUSH_ROWS`` entries at a time, the rows are collected in
plain lists and every ``FLUSH_ROWS`` rows turned into an Arrow table (Python
lists cost ~1 KB per entry, Arrow ~95 bytes). Optional columns that are null
for a whole chunk (nearly all of them, nearly always) share one preallocated
null array (columns.py) instead of allocating their own. At the end the chunks are sorted
by path one column at a time (``sort_indices`` once, then ``take`` per
column, each old column freed as soon as its sorted copy exists), so the
peak is the table plus one column, not two tables; the diff against the
parent manifest then walks both sides in path order (diff.py).

Exclusions use gitignore syntax through pathspec (pure matching; the walking
is ours): ``--exclude`` patterns apply from the source root, and a
``.keepflowignore`` file in any folder applies to that folder and below, like
a ``.gitignore``. An excluded folder is not descended into. A repository that
lives inside the source is excluded automatically, or every backup would
back up the previous one.

Remote sources (any fsspec URL) are listed with ``find(detail=True)``; their
info dicts are normalised to size and mtime only (no inode or ctime), so the
unchanged test for them is size + mtime.

Unreadable folders are not fatal: they are reported in ``skipped`` and the
scan goes on.
"""

from __future__ import annotations

import bisect
import datetime as dt
import decimal
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice, pairwise
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pathspec
import pyarrow as pa
import pyarrow.compute as pc

from . import storage, xattrs
from .columns import lower_bound as _lower_bound
from .columns import nulls
from .errors import BadPatternError, SourceNotFoundError
from .manifest import MANIFEST_SCHEMA, NS_MAX, NS_MIN, clamp_ns, fs_path, is_utf8, readable_bytes, shown

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

IGNORE_FILE = ".keepflowignore"
# Rows collected as Python lists before they become an Arrow table; also how
# many entries of one folder are listed at a time.
FLUSH_ROWS = 8192
# Rows per table a scan stream gives out (the diff joins one such table at a time).
CHUNK_ROWS = 65536
CLASH = "name is not valid UTF-8 and its shown form is another entry's name; rename one"

SCAN_COLUMNS = ["path", "type", "size", "mtime_ns", "ctime_ns", "inode", "mode", "uid", "gid", "link_target",
                "mtime_ns_exact", "link_target_bytes", "rdev", "hardlink_to", "xattrs", "path_bytes"]


@dataclass
class ScanResult:
    table: pa.Table
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    start_ns: int = 0


def compile_patterns(patterns: Sequence[str] | None, origin: str = "--exclude") -> pathspec.PathSpec | None:
    patterns = [p for p in (patterns or []) if p.strip()]
    if not patterns:
        return None
    try:
        return pathspec.GitIgnoreSpec.from_lines(patterns)
    except Exception as exc:  # pathspec raises several types for bad syntax
        bad = patterns[0] if len(patterns) == 1 else ", ".join(patterns)
        raise BadPatternError(pattern=bad, reason=f"{exc} (from {origin})") from None


class _Ignorer:
    """Stack of (base folder, spec) pairs active at the current depth."""

    def __init__(self, specs: list[tuple[str, pathspec.PathSpec]]) -> None:
        self.specs = specs

    def ignored(self, rel: str, is_dir: bool) -> bool:
        for base, spec in self.specs:
            sub = rel[len(base) + 1:] if base else rel
            if spec.match_file(sub + "/" if is_dir else sub):
                return True
        return False


@dataclass
class ScanStream:
    """A scan given out as consecutive tables in path order (``chunks``, each at
    most ``chunk_rows`` rows, every path greater than the one before it).
    ``skipped`` is complete once the chunks are exhausted."""
    chunks: Iterator[pa.Table]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    start_ns: int = 0
    local_root: str | None = None      # the source's folder when it is on this machine's file system


def scan_stream(source: str, excludes: Sequence[str] | None = None, exclude_paths: Iterable[str] = (),
                storage_options: dict[str, Any] | None = None, with_xattrs: bool = True,
                chunk_rows: int | None = None) -> ScanStream:
    """Scan ``source`` (a path or URL) as a stream of sorted tables; see ``scan``.

    Bad input (a pattern, a missing source) is refused here, before the first chunk.
    """
    root_spec = compile_patterns(excludes)
    fs, root = storage.open_url(source, storage_options)
    start_ns = int(dt.datetime.now(dt.UTC).timestamp() * 1e9)
    skipped: list[tuple[str, str]] = []
    tables: Iterator[pa.Table]
    if storage.is_local(fs):
        if not os.path.isdir(root):
            raise SourceNotFoundError(source=root)
        tables = _walk_local(root, root_spec, {os.path.abspath(p) for p in exclude_paths}, with_xattrs, skipped)
    else:
        # fs.find lists the whole tree at once (a dict per entry): sorted whole, then given out in slices.
        tables = iter([_scan_fsspec(fs, root, root_spec)])
    return ScanStream(_rechunked(tables, chunk_rows or CHUNK_ROWS), skipped, start_ns,
                      root if storage.is_local(fs) else None)


def read_xattrs_of(table: pa.Table, rows: np.ndarray, root: str, skipped: list[tuple[str, str]]) -> pa.Table:
    """``table`` (scan rows of the local source at ``root``) with the extended
    attributes of its rows ``rows`` read now, as the scan reads them.

    For an incremental backup that takes an unchanged entry's attributes from
    its parent (diff.py, "Extended attributes") and reads only the others'.
    """
    if not len(rows):
        return table
    paths = table["path"].take(pa.array(rows)).to_pylist()
    raws = table["path_bytes"].take(pa.array(rows)).to_pylist()
    values: list[list[dict] | None] = []
    for path, raw in zip(paths, raws, strict=True):
        try:
            values.append(xattrs.read(os.path.join(root, fs_path(path, raw))))
        except OSError as exc:   # the entry is kept; only its attributes are lost (as in the scan)
            values.append(None)
            skipped.append((path, f"extended attributes not kept: {exc.strerror or exc}"))
    at = table.schema.get_field_index("xattrs")
    column = table.column(at)
    order = np.arange(table.num_rows, dtype=np.int64)
    order[rows] = table.num_rows + np.arange(len(rows), dtype=np.int64)
    merged = pa.concat_arrays([column.combine_chunks(), pa.array(values, column.type)]).take(pa.array(order))
    return table.set_column(at, table.schema.field(at), merged)


def scan(source: str, excludes: Sequence[str] | None = None, exclude_paths: Iterable[str] = (),
         storage_options: dict[str, Any] | None = None, with_xattrs: bool = True) -> ScanResult:
    """Scan ``source`` (a path or URL) into one table sorted by path. ``exclude_paths``
    are absolute local paths to skip.

    ``with_xattrs``: read extended attributes and ACLs (local sources; see xattrs.py).
    A backup uses ``scan_stream`` instead, so the whole table never exists.
    """
    stream = scan_stream(source, excludes, exclude_paths, storage_options, with_xattrs)
    tables = list(stream.chunks)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return ScanResult(table, stream.skipped, stream.start_ns)


# -- the local walk, in path order ----------------------------------------------------
#
# A row is a tuple in SCAN_COLUMNS order (one tuple per entry is cheaper than
# sixteen list appends; ``zip(*rows)`` turns FLUSH_ROWS of them into columns
# at C speed). Sorted output without sorting the tree: within a folder an
# entry sorts at its name and a sub-folder's contents at its name + "/"
# (paths compare as strings, and "/" is the only character a name cannot
# hold), so the walk gives out a folder's own entries below a sub-folder's
# key, then that sub-folder, depth first. Only the folders on the current
# path are held: a folder of up to FLUSH_ROWS entries as Python rows, a
# larger one as Arrow tables sorted by Arrow (no Python object per entry).

_PATH, _TYPE, _HARDLINK, _PATH_BYTES = (SCAN_COLUMNS.index(c) for c in ("path", "type", "hardlink_to", "path_bytes"))


@dataclass
class _Subfolder:
    key: str               # its shown path + "/": where its contents sort among its parent's entries
    abs_dir: str
    rel_dir: str           # as the OS spells it (the ignorer matches this)
    specs: list
    raw: bool              # its path holds bytes that are not UTF-8


@dataclass
class _Folder:
    rows: list[tuple] | None           # sorted by path (small folder) ...
    table: pa.Table | None             # ... or a sorted table (large folder)
    subfolders: list[_Subfolder]       # by key, descending: the next one is last
    links: list[tuple[str, tuple[int, int]]]    # (path, (device, inode)) of files with several names, by path
    pos: int = 0
    link_pos: int = 0

    def upto(self, key: str | None, out: _Chunks, leaders: dict) -> None:
        """Give ``out`` this folder's entries that sort below ``key`` (all: None)."""
        paths = self.rows if self.rows is not None else self.table["path"]    # type: ignore[index]
        n = len(paths)
        if key is None:
            end = n
        elif self.rows is not None:
            end = bisect.bisect_left(self.rows, key, self.pos, n, key=itemgetter(_PATH))
        else:
            end = _lower_bound(paths, key, self.pos)
        if end == self.pos:
            return
        pointing = self._hard_links(key, leaders)
        if self.rows is not None:
            rows = self.rows[self.pos:end]
            if pointing:
                rows = [r if r[_PATH] not in pointing else
                        r[:_HARDLINK] + (pointing[r[_PATH]],) + r[_HARDLINK + 1:] for r in rows]
            out.add_rows(rows)
        else:
            piece = self.table.slice(self.pos, end - self.pos)     # type: ignore[union-attr]
            if pointing:
                where = pc.index_in(piece["path"], value_set=pa.array(list(pointing), pa.string()))
                piece = piece.set_column(_HARDLINK, "hardlink_to",
                                         pc.take(pa.array(list(pointing.values()), pa.string()), where))
            out.add_table(piece)
        self.pos = end

    def _hard_links(self, key: str | None, leaders: dict) -> dict[str, str]:
        """``hardlink_to`` of the linked names below ``key``: every name of a file
        but the first in path order points at the first (the walk gives names
        out in path order, so the first one seen is the first)."""
        pointing: dict[str, str] = {}
        links = self.links
        while self.link_pos < len(links) and (key is None or links[self.link_pos][0] < key):
            path, ident = links[self.link_pos]
            first = leaders.setdefault(ident, path)
            if first != path:
                pointing[path] = first
            self.link_pos += 1
        return pointing


class _Chunks:
    """Collects rows and tables in order; gives out tables of FLUSH_ROWS rows or more."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.tables: list[pa.Table] = []

    def add_rows(self, rows: list[tuple]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= FLUSH_ROWS:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        self._flush()
        self.tables.append(table)

    def _flush(self) -> None:
        if self.rows:
            self.tables.append(_to_table(self.rows))
            self.rows = []

    def take(self) -> list[pa.Table]:
        tables, self.tables = self.tables, []
        return tables

    def finish(self) -> list[pa.Table]:
        self._flush()
        return self.take()


def _walk_local(root: str, root_spec, exclude_paths: set[str], with_xattrs: bool,
                skipped: list[tuple[str, str]]) -> Iterator[pa.Table]:
    ahead = _ReadAhead(_FolderReader(exclude_paths, xattrs.read if with_xattrs else None), skipped)
    leaders: dict[tuple[int, int], str] = {}     # (device, inode) -> its first name; only files with several names
    out = _Chunks()
    try:
        top = ahead.read(_Subfolder("", root, "", [("", root_spec)] if root_spec else [], False))
        stack = [top] if top is not None else []
        while stack:
            folder = stack[-1]
            if folder.subfolders:
                sub = folder.subfolders.pop()
                folder.upto(sub.key, out, leaders)
                child = ahead.read(sub)
                if child is not None:
                    stack.append(child)
                    ahead.prefetch(child)       # its sub-folders come next ...
                ahead.prefetch(folder)          # ... then this one's next ones
            else:
                folder.upto(None, out, leaders)
                stack.pop()
            yield from out.take()
        yield from out.finish()
    finally:
        ahead.close()


class _ReadAhead:
    """Lists the folders the walk reaches next on a thread while it gives out this one.

    Listing a folder is mostly system calls that release the GIL (``scandir``,
    one ``lstat`` and one ``listxattr`` per entry: 7 of the 19 s a 1M-file
    scan took in one thread), so a thread listing the next folders overlaps
    them with the walk's Python work. The plan of a 1M-file first backup
    (``backup.prepare``, 1,000 folders of 1,000 files, warm cache) took 18.8 s
    without it; 16.4 s with one thread, 15.7-16.5 s with two (and 45% more
    system time: the GIL hand-offs), 20.6 s with three. At most ``AHEAD`` folders are listed
    ahead (memory: ``AHEAD`` listings of up to FLUSH_ROWS rows as Python
    tuples, a larger folder as Arrow), the walk's next ones first. What a
    listing reports (unreadable entries...) is added to ``skipped`` when the
    walk reaches that folder, so the report keeps walk order.
    """

    THREADS = 1
    AHEAD = 4

    def __init__(self, reader: _FolderReader, skipped: list[tuple[str, str]]) -> None:
        self.reader, self.skipped = reader, skipped
        self.pending: dict[int, Future] = {}     # id(_Subfolder) -> its listing; the walk holds the _Subfolder
        self.pool: ThreadPoolExecutor | None = None

    def _list(self, where: _Subfolder) -> tuple[_Folder | None, list[tuple[str, str]]]:
        found: list[tuple[str, str]] = []
        return self.reader.read(where, found), found

    def read(self, where: _Subfolder) -> _Folder | None:
        pending = self.pending.pop(id(where), None)
        folder, found = pending.result() if pending is not None else self._list(where)
        self.skipped.extend(found)
        return folder

    def prefetch(self, folder: _Folder) -> None:
        """Start listing the next of ``folder``'s sub-folders (the last in its list is next)."""
        for sub in reversed(folder.subfolders[-self.AHEAD:]):
            if len(self.pending) >= self.AHEAD:
                return
            if id(sub) not in self.pending:
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="keepflow-scan")
                self.pending[id(sub)] = self.pool.submit(self._list, sub)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


class _FolderReader:
    """Lists and lstat()s one folder into a sorted ``_Folder`` (thread-safe: it keeps no state)."""

    def __init__(self, exclude_paths: set[str], read_xattrs) -> None:
        self.exclude_paths, self.read_xattrs = exclude_paths, read_xattrs

    def read(self, where: _Subfolder, skipped: list[tuple[str, str]]) -> _Folder | None:
        """``where`` listed; what cannot be read is reported in ``skipped``."""
        abs_dir, rel_dir, specs, raw_dir = where.abs_dir, where.rel_dir, where.specs, where.raw
        try:
            listing = os.scandir(abs_dir)
        except OSError as exc:
            skipped.append((shown(rel_dir) or ".", f"cannot list folder: {exc.strerror or exc}"))
            return None
        rows: list[tuple] = []
        tables: list[pa.Table] = []
        subfolders: list[_Subfolder] = []
        links: list[tuple[str, tuple[int, int]]] = []
        any_raw = False
        with listing:
            try:
                entries = list(islice(listing, FLUSH_ROWS))
            except OSError as exc:
                skipped.append((shown(rel_dir) or ".", f"cannot list folder: {exc.strerror or exc}"))
                return None
            # The folder's ignore file applies to its own entries: look for it
            # before the first entry (in the first slice, or by name in a huge folder).
            if (IGNORE_FILE in {e.name for e in entries}
                    or (len(entries) == FLUSH_ROWS and os.path.lexists(os.path.join(abs_dir, IGNORE_FILE)))):
                specs = specs + _read_ignore_file(os.path.join(abs_dir, IGNORE_FILE), rel_dir, skipped)
            ignorer = _Ignorer(specs) if specs else None
            while entries:
                for entry in entries:
                    row = self._row(entry, rel_dir, raw_dir, ignorer, skipped)
                    if row is None:
                        continue
                    row, st = row
                    rows.append(row)
                    if row[_PATH_BYTES] is not None:
                        any_raw = True
                    kind = row[_TYPE]
                    if kind == "dir":
                        name = entry.name
                        subfolders.append(_Subfolder(row[_PATH] + "/", entry.path,
                                                     f"{rel_dir}/{name}" if rel_dir else name, specs,
                                                     row[_PATH_BYTES] is not None))
                    elif kind == "file" and st.st_nlink > 1:
                        links.append((row[_PATH], (st.st_dev, st.st_ino)))
                if len(entries) < FLUSH_ROWS:
                    break
                tables.append(_to_table(rows))      # a large folder: Arrow, FLUSH_ROWS rows at a time
                rows = []
                try:
                    entries = list(islice(listing, FLUSH_ROWS))
                except OSError as exc:
                    skipped.append((shown(rel_dir) or ".", f"cannot list folder: {exc.strerror or exc}"))
                    break
        folder: _Folder
        if not tables:
            rows.sort(key=itemgetter(_PATH))
            dropped = _clashing_rows(rows, skipped) if any_raw else set()
            if dropped:
                rows = [r for r in rows if not (r[_PATH] in dropped and r[_PATH_BYTES] is not None)]
            folder = _Folder(rows, None, subfolders, links)
        else:
            if rows:
                tables.append(_to_table(rows))
            table = _sorted_by_path(tables)
            table, dropped = _unique_shown_paths(table, skipped) if any_raw else (table, set())
            folder = _Folder(None, table, subfolders, links)
        if dropped:     # a clashing name's folder is not walked, and it links nothing
            folder.subfolders = [s for s in subfolders if not (s.raw and s.key[:-1] in dropped)]
            folder.links = [link for link in links if link[0] not in dropped]
        folder.subfolders.sort(key=attrgetter("key"), reverse=True)
        folder.links.sort()
        return folder

    def _row(self, entry: os.DirEntry, rel_dir: str, raw_dir: bool, ignorer: _Ignorer | None,
             skipped: list[tuple[str, str]]):
        """``(row, stat)`` of one entry, or None when it is left out (ignored, excluded, or reported)."""
        name = entry.name
        rel = f"{rel_dir}/{name}" if rel_dir else name
        # `path` is UTF-8 text (readable by any Parquet tool); a name that
        # is not keeps its exact bytes in path_bytes, and `path` shows it
        # with \xNN escapes (the key that diffs, --include and ls use).
        raw = None
        if raw_dir or (not name.isascii() and not is_utf8(name)):
            raw = os.fsencode(rel)
        shown_rel = rel if raw is None else readable_bytes(raw)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            skipped.append((shown_rel, f"cannot stat: {exc.strerror or exc}"))
            return None
        mode = st.st_mode
        if S_ISDIR(mode):
            kind = "dir"
        elif S_ISREG(mode):
            kind = "file"
        elif S_ISLNK(mode):
            kind = "symlink"
        elif stat.S_ISFIFO(mode):
            kind = "fifo"          # an entry with no content: restore recreates it
        elif stat.S_ISCHR(mode):
            kind = "chardev"
        elif stat.S_ISBLK(mode):
            kind = "blockdev"
        else:
            # A socket belongs to a running program and cannot be recreated: reported, never silent.
            if ignorer is None or not ignorer.ignored(rel, False):
                skipped.append((shown_rel, "a socket is not backed up (it belongs to a running program)"))
            return None
        if ignorer is not None and ignorer.ignored(rel, kind == "dir"):
            return None
        if kind == "dir" and self.exclude_paths and entry.path in self.exclude_paths:
            return None
        link = link_bytes = None
        if kind == "symlink":
            try:
                link = os.readlink(entry.path)
            except OSError as exc:
                skipped.append((shown_rel, f"cannot read link: {exc.strerror or exc}"))
                return None
            if not link.isascii() and not is_utf8(link):
                # Kept byte-exact for restore; the string column shows it readably.
                link_bytes = os.fsencode(link)
                link = readable_bytes(link_bytes)
        mtime = st.st_mtime_ns
        exact = None
        if not NS_MIN <= mtime <= NS_MAX:   # before 1677 or after 2262: clamped here, exact in its own column
            exact, mtime = mtime, clamp_ns(mtime)
        attrs = None
        if self.read_xattrs is not None:
            try:
                attrs = self.read_xattrs(entry.path)
            except OSError as exc:   # the entry is kept; only its attributes are lost
                skipped.append((shown_rel, f"extended attributes not kept: {exc.strerror or exc}"))
        # In SCAN_COLUMNS order; hardlink_to is filled in path order by the walk.
        return (shown_rel, kind, st.st_size if kind == "file" else 0, mtime, clamp_ns(st.st_ctime_ns), st.st_ino,
                mode, st.st_uid, st.st_gid, link, exact, link_bytes,
                st.st_rdev if kind in ("chardev", "blockdev") else None, None, attrs, raw), st


S_ISDIR, S_ISREG, S_ISLNK = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK


def _sorted_by_path(batches: list[pa.Table]) -> pa.Table:
    """One table of ``batches`` (emptied), sorted by path, a column at a time.

    ``Table.sort_by`` would hold the unsorted and the sorted table at once;
    here each column is replaced by its sorted copy and freed, and an
    all-null column is not copied at all (it gets shared null chunks again).
    """
    table = pa.concat_tables(batches)
    batches.clear()
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table["path"])
    schema, n = table.schema, table.num_rows
    columns = table.columns
    del table
    for i, column in enumerate(columns):
        columns[i] = None                      # the last reference to the unsorted column ...
        columns[i] = nulls(column.type, n) if column.null_count == n else column.take(order)
        del column                             # ... goes once its sorted copy exists
    return pa.Table.from_arrays(columns, schema=schema)


def _unique_shown_paths(table: pa.Table, skipped: list) -> tuple[pa.Table, set[str]]:
    """Leave out a non-UTF-8 name whose shown form is also another entry's path;
    the table without them, and the paths left out.

    ``path`` is the key of every diff and restore; a real name spelled with
    literal ``\\xNN`` text next to a name with those raw bytes would share it.
    Unlikely, but a shared key could pair the wrong files, so such a name is
    reported instead (rename one of the two). The table is sorted by path, so
    a shared path shows as two equal neighbours: no hash table over all paths.
    """
    raw = table["path_bytes"]
    n = table.num_rows
    if raw.null_count == n or n < 2:
        return table, set()
    paths = table["path"]
    same_as_next = pc.equal(paths.slice(1), paths.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if not same_as_next.any():
        return table, set()
    shared = np.zeros(n, dtype=bool)
    shared[1:] |= same_as_next
    shared[:-1] |= same_as_next
    clash = pc.and_(pc.is_valid(raw), pa.array(shared))
    dropped = table.filter(clash)["path"].to_pylist()
    skipped.extend((path, CLASH) for path in dropped)
    return table.filter(pc.invert(clash)), set(dropped)


def _clashing_rows(rows: list[tuple], skipped: list) -> set[str]:
    """``_unique_shown_paths`` for a small folder's sorted rows: the shared paths
    whose non-UTF-8 names are left out (each reported)."""
    dropped: set[str] = set()
    for before, after in pairwise(rows):
        if before[_PATH] == after[_PATH]:
            dropped.add(before[_PATH])
    for row in rows:
        if row[_PATH] in dropped and row[_PATH_BYTES] is not None:
            skipped.append((row[_PATH], CLASH))
    return dropped


def _read_ignore_file(path: str, rel_dir: str, skipped) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        skipped.append((shown(path), f"cannot read ignore file: {exc.strerror or exc}"))
        return []
    spec = compile_patterns(lines, origin=path)
    return [(rel_dir, spec)] if spec else []


def _to_table(rows: list[tuple]) -> pa.Table:
    """Rows (tuples in SCAN_COLUMNS order) as a table, in the order given."""
    n = len(rows)
    cols = dict(zip(SCAN_COLUMNS, zip(*rows, strict=True), strict=True)) if rows else {c: () for c in SCAN_COLUMNS}
    arrays = {
        "path": pa.array(cols["path"], pa.string()),
        "type": pa.array(cols["type"], pa.string()),
        "size": pa.array(cols["size"], pa.int64()),
        "mtime_ns": pa.array(cols["mtime_ns"], pa.int64()),
        "ctime_ns": pa.array(cols["ctime_ns"], pa.int64()),
        "inode": pa.array([i & 0x7FFFFFFFFFFFFFFF if i is not None else None for i in cols["inode"]], pa.int64()),
        "mode": pa.array(cols["mode"], pa.int32()),
        "uid": pa.array(cols["uid"], pa.int64()),
        "gid": pa.array(cols["gid"], pa.int64()),
        "link_target": _sparse(cols, "link_target", str),
        "mtime_ns_exact": _sparse(cols, "mtime_ns_exact", decimal.Decimal),
        "link_target_bytes": _sparse(cols, "link_target_bytes", bytes),
        "rdev": _sparse(cols, "rdev", int),
        "hardlink_to": _sparse(cols, "hardlink_to", str),
        "xattrs": _sparse(cols, "xattrs", list),
        "path_bytes": _sparse(cols, "path_bytes", bytes),
    }
    del cols
    table = pa.table(arrays)
    assert table.num_rows == n
    return table


def _sparse(cols: dict, name: str, convert):
    """An optional column: shared nulls (no per-row work, no allocation) unless some entry needs it."""
    values = cols[name]
    kind = MANIFEST_SCHEMA.field(name).type
    if values.count(None) == len(values):      # C speed; a generator over 8,192 values was 1.6 s per 1M
        return nulls(kind, len(values))
    return pa.array([None if v is None else convert(v) for v in values], kind)


def _rechunked(tables: Iterable[pa.Table], chunk_rows: int) -> Iterator[pa.Table]:
    """``tables`` regrouped into tables of ``chunk_rows`` rows (the last one shorter;
    at least one, maybe empty), each column one contiguous array (all-null ones shared)."""
    pending: list[pa.Table] = []
    count = 0
    given = False
    for table in tables:
        if not table.num_rows:
            continue
        pending.append(table)
        count += table.num_rows
        while count >= chunk_rows:
            whole = pa.concat_tables(pending)
            rest = whole.slice(chunk_rows)
            yield _contiguous(whole.slice(0, chunk_rows))
            given = True
            pending, count = ([rest] if rest.num_rows else []), rest.num_rows
            del whole
    if pending or not given:
        yield _contiguous(pa.concat_tables(pending)) if pending else _to_table([])


def _contiguous(table: pa.Table) -> pa.Table:
    n = table.num_rows
    columns = [nulls(c.type, n) if c.null_count == n else c.combine_chunks() for c in table.columns]
    return pa.Table.from_arrays(columns, schema=table.schema)


def _scan_fsspec(fs: AbstractFileSystem, root: str, root_spec) -> pa.Table:
    try:
        if not fs.isdir(root):
            raise SourceNotFoundError(source=root)
        found = fs.find(root, detail=True, withdirs=True)
    except FileNotFoundError:
        raise SourceNotFoundError(source=root) from None
    rows: list[tuple] = []
    batches: list[pa.Table] = []
    prefix = root.rstrip("/") + "/"
    ignorer = _Ignorer([("", root_spec)]) if root_spec else None
    for name, info in found.items():
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix):].strip("/")
        if not rel:
            continue
        kind = "dir" if info.get("type") == "directory" else "file"
        if ignorer is not None and (ignorer.ignored(rel, kind == "dir") or _parent_ignored(ignorer, rel)):
            continue
        # No inode, ctime or owners on an object store: the unchanged test is size + mtime.
        rows.append((rel, kind, int(info.get("size") or 0) if kind == "file" else 0, storage.info_mtime_ns(info),
                     None, None, 0o40755 if kind == "dir" else 0o100644, None, None, None, None, None, None, None,
                     None, None))
        if len(rows) >= FLUSH_ROWS:
            batches.append(_to_table(rows))
            rows = []
    batches.append(_to_table(rows))
    return _sorted_by_path(batches)


def _parent_ignored(ignorer: _Ignorer, rel: str) -> bool:
    parts = rel.split("/")[:-1]
    return any(ignorer.ignored("/".join(parts[: i + 1]), True) for i in range(len(parts)))
