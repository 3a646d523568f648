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

import datetime as dt
import decimal
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import pathspec
import pyarrow as pa
import pyarrow.compute as pc

from . import storage, xattrs
from .columns import nulls
from .errors import BadPatternError, SourceNotFoundError
from .manifest import MANIFEST_SCHEMA, NS_MAX, NS_MIN, clamp_ns, is_utf8, readable_bytes, shown

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

IGNORE_FILE = ".keepflowignore"
# Rows collected as Python lists before they become an Arrow table; also how
# many entries of one folder are listed at a time.
FLUSH_ROWS = 8192

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


def scan(source: str, excludes: Sequence[str] | None = None, exclude_paths: Iterable[str] = (),
         storage_options: dict[str, Any] | None = None, with_xattrs: bool = True) -> ScanResult:
    """Scan ``source`` (a path or URL). ``exclude_paths`` are absolute local paths to skip.

    ``with_xattrs``: read extended attributes and ACLs (local sources; see xattrs.py).
    """
    root_spec = compile_patterns(excludes)
    fs, root = storage.open_url(source, storage_options)
    start_ns = dt.datetime.now(dt.UTC).timestamp() * 1e9
    if storage.is_local(fs):
        result = _scan_local(root, root_spec, {os.path.abspath(p) for p in exclude_paths}, with_xattrs)
    else:
        result = _scan_fsspec(fs, root, root_spec)
    result.start_ns = int(start_ns)
    return result


def _scan_local(root: str, root_spec, exclude_paths: set[str], with_xattrs: bool = True) -> ScanResult:
    if not os.path.isdir(root):
        raise SourceNotFoundError(source=root)
    cols: dict[str, list[Any]] = {c: [] for c in SCAN_COLUMNS}
    batches: list[pa.Table] = []
    skipped: list[tuple[str, str]] = []
    add_path, add_type, add_size = cols["path"].append, cols["type"].append, cols["size"].append
    add_mtime, add_ctime, add_inode = cols["mtime_ns"].append, cols["ctime_ns"].append, cols["inode"].append
    add_mode, add_uid, add_gid = cols["mode"].append, cols["uid"].append, cols["gid"].append
    add_link = cols["link_target"].append
    add_mtime_exact, add_link_bytes = cols["mtime_ns_exact"].append, cols["link_target_bytes"].append
    add_rdev, add_xattrs, add_path_bytes = cols["rdev"].append, cols["xattrs"].append, cols["path_bytes"].append
    read_xattrs = xattrs.read if with_xattrs else None
    S_ISDIR, S_ISREG, S_ISLNK = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK
    # Files with several names: (device, inode) -> their paths. Only files
    # with st_nlink > 1 enter it, so it stays small on ordinary trees.
    link_groups: dict[tuple[int, int], list[str]] = {}

    # Each stack item: (absolute dir, relative dir, ignorer specs active there,
    # whether the relative dir holds bytes that are not UTF-8).
    stack: list[tuple[str, str, list, bool]] = [(root, "", [("", root_spec)] if root_spec else [], False)]
    while stack:
        abs_dir, rel_dir, specs, raw_dir = stack.pop()
        try:
            listing = os.scandir(abs_dir)
        except OSError as exc:
            skipped.append((shown(rel_dir) or ".", f"cannot list folder: {exc.strerror or exc}"))
            continue
        with listing:
            try:
                entries = list(islice(listing, FLUSH_ROWS))
            except OSError as exc:
                skipped.append((shown(rel_dir) or ".", f"cannot list folder: {exc.strerror or exc}"))
                continue
            # The folder's ignore file applies to its own entries: look for it
            # before the first entry (in the first slice, or by name in a huge folder).
            if (IGNORE_FILE in {e.name for e in entries}
                    or (len(entries) == FLUSH_ROWS and os.path.lexists(os.path.join(abs_dir, IGNORE_FILE)))):
                specs = specs + _read_ignore_file(os.path.join(abs_dir, IGNORE_FILE), rel_dir, skipped)
            ignorer = _Ignorer(specs) if specs else None
            while entries:
                for entry in entries:
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
                        continue
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
                        continue
                    if ignorer is not None and ignorer.ignored(rel, kind == "dir"):
                        continue
                    if kind == "dir" and exclude_paths and entry.path in exclude_paths:
                        continue
                    link = link_bytes = None
                    if kind == "symlink":
                        try:
                            link = os.readlink(entry.path)
                        except OSError as exc:
                            skipped.append((shown_rel, f"cannot read link: {exc.strerror or exc}"))
                            continue
                        if not link.isascii() and not is_utf8(link):
                            # Kept byte-exact for restore; the string column shows it readably.
                            link_bytes = os.fsencode(link)
                            link = readable_bytes(link_bytes)
                    add_path(shown_rel)
                    add_path_bytes(raw)
                    add_type(kind)
                    add_size(st.st_size if kind == "file" else 0)
                    mtime = st.st_mtime_ns
                    if NS_MIN <= mtime <= NS_MAX:
                        add_mtime(mtime)
                        add_mtime_exact(None)
                    else:   # before 1677 or after 2262: clamped here, exact in its own column
                        add_mtime(clamp_ns(mtime))
                        add_mtime_exact(mtime)
                    add_link_bytes(link_bytes)
                    add_rdev(st.st_rdev if kind in ("chardev", "blockdev") else None)
                    attrs = None
                    if read_xattrs is not None:
                        try:
                            attrs = read_xattrs(entry.path)
                        except OSError as exc:   # the entry is kept; only its attributes are lost
                            skipped.append((shown_rel, f"extended attributes not kept: {exc.strerror or exc}"))
                    add_xattrs(attrs)
                    if kind == "file" and st.st_nlink > 1:
                        link_groups.setdefault((st.st_dev, st.st_ino), []).append(shown_rel)
                    add_ctime(clamp_ns(st.st_ctime_ns))
                    add_inode(st.st_ino)
                    add_mode(mode)
                    add_uid(st.st_uid)
                    add_gid(st.st_gid)
                    add_link(link)
                    if kind == "dir":
                        stack.append((entry.path, rel, specs, raw is not None))
                if len(cols["path"]) >= FLUSH_ROWS:
                    batches.append(_to_table(cols, sort=False))
                    for values in cols.values():
                        values.clear()
                if len(entries) < FLUSH_ROWS:
                    break
                try:
                    entries = list(islice(listing, FLUSH_ROWS))
                except OSError as exc:
                    skipped.append((shown(rel_dir) or ".", f"cannot list folder: {exc.strerror or exc}"))
                    break
    batches.append(_to_table(cols, sort=False))
    cols.clear()
    table = _sorted_by_path(batches)
    table = _unique_shown_paths(table, skipped)
    return ScanResult(_with_hard_links(table, link_groups), skipped)


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


def _unique_shown_paths(table: pa.Table, skipped: list) -> pa.Table:
    """Leave out a non-UTF-8 name whose shown form is also another entry's path.

    ``path`` is the key of every diff and restore; a real name spelled with
    literal ``\\xNN`` text next to a name with those raw bytes would share it.
    Unlikely, but a shared key could pair the wrong files, so such a name is
    reported instead (rename one of the two). The table is sorted by path, so
    a shared path shows as two equal neighbours: no hash table over all paths.
    """
    raw = table["path_bytes"]
    n = table.num_rows
    if raw.null_count == n or n < 2:
        return table
    paths = table["path"]
    same_as_next = pc.equal(paths.slice(1), paths.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if not same_as_next.any():
        return table
    shared = np.zeros(n, dtype=bool)
    shared[1:] |= same_as_next
    shared[:-1] |= same_as_next
    clash = pc.and_(pc.is_valid(raw), pa.array(shared))
    for path in table.filter(clash)["path"].to_pylist():
        skipped.append((path, "name is not valid UTF-8 and its shown form is another entry's name; rename one"))
    return table.filter(pc.invert(clash))


def _with_hard_links(table: pa.Table, groups: dict[tuple[int, int], list[str]]) -> pa.Table:
    """Fill ``hardlink_to``: every name of a file but the first (by path) points at the first.

    Names whose other links lie outside the source (or were excluded) form no
    group and are stored as plain files. Only the linked names are Python
    objects; the column itself is one vectorised lookup.
    """
    leader: dict[Any, Any] = {}
    for names in groups.values():
        if len(names) > 1:
            first = min(names)
            leader.update((n, first) for n in names if n != first)
    if not leader:
        return table
    where = pc.index_in(table["path"], value_set=pa.array(list(leader), pa.string()))
    column = pc.take(pa.array(list(leader.values()), pa.string()), where)
    return table.set_column(table.schema.get_field_index("hardlink_to"), "hardlink_to", column)


def _read_ignore_file(path: str, rel_dir: str, skipped) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        skipped.append((shown(path), f"cannot read ignore file: {exc.strerror or exc}"))
        return []
    spec = compile_patterns(lines, origin=path)
    return [(rel_dir, spec)] if spec else []


def _to_table(cols: dict, sort: bool = True) -> pa.Table:
    n = len(cols["path"])
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
        "hardlink_to": nulls(pa.string(), n),    # filled after sorting
        "xattrs": _sparse(cols, "xattrs", list),
        "path_bytes": _sparse(cols, "path_bytes", bytes),
    }
    table = pa.table(arrays)
    return table.sort_by("path") if sort and table.num_rows else table


def _sparse(cols: dict, name: str, convert):
    """An optional column: shared nulls (no per-row work, no allocation) unless some entry needs it."""
    values = cols[name]
    kind = MANIFEST_SCHEMA.field(name).type
    if values.count(None) == len(values):      # C speed; a generator over 8,192 values was 1.6 s per 1M
        return nulls(kind, len(values))
    return pa.array([None if v is None else convert(v) for v in values], kind)


def _scan_fsspec(fs: AbstractFileSystem, root: str, root_spec) -> ScanResult:
    try:
        if not fs.isdir(root):
            raise SourceNotFoundError(source=root)
        found = fs.find(root, detail=True, withdirs=True)
    except FileNotFoundError:
        raise SourceNotFoundError(source=root) from None
    cols: dict[str, list[Any]] = {c: [] for c in SCAN_COLUMNS}
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
        cols["path"].append(rel)
        cols["type"].append(kind)
        cols["size"].append(int(info.get("size") or 0) if kind == "file" else 0)
        cols["mtime_ns"].append(storage.info_mtime_ns(info))
        cols["ctime_ns"].append(None)
        cols["inode"].append(None)
        cols["mode"].append(0o40755 if kind == "dir" else 0o100644)
        cols["uid"].append(None)
        cols["gid"].append(None)
        cols["link_target"].append(None)
        cols["mtime_ns_exact"].append(None)
        cols["link_target_bytes"].append(None)
        cols["rdev"].append(None)
        cols["hardlink_to"].append(None)
        cols["xattrs"].append(None)
        cols["path_bytes"].append(None)
        if len(cols["path"]) >= FLUSH_ROWS:
            batches.append(_to_table(cols, sort=False))
            for values in cols.values():
                values.clear()
    batches.append(_to_table(cols, sort=False))
    return ScanResult(_sorted_by_path(batches), [])


def _parent_ignored(ignorer: _Ignorer, rel: str) -> bool:
    parts = rel.split("/")[:-1]
    return any(ignorer.ignored("/".join(parts[: i + 1]), True) for i in range(len(parts)))
