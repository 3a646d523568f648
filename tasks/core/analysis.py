"""Questions about a repository's history, answered from what keepflow already writes.

Everything here reads only snapshot facts (``snapshots.list_snapshots``:
the facts trailer of a format 2 manifest, the footer of a Parquet one), the
entries of manifests (``manifest.read_manifest``, only the columns asked for;
a format 2 manifest is decrypted in memory, never on disk), the index, chunk
lists when a figure needs them, and a listing of the data files. Nothing is
written, nothing needs Prefect, and any fsspec URL works (a local path,
``memory://``, a replica on S3 with ``storage_options``). Both formats:
format 1 (plaintext) and format 2, whose encrypted repositories open with the
usual password sources (``KEEPFLOW_PASSWORD``, ``KEEPFLOW_PASSWORD_FILE``,
``KEEPFLOW_PASSWORD_COMMAND``, ``passwords.use_password``).

Sizes: a file's ``size`` (logical bytes) comes from the manifest. A blob's
*stored* size is its index ``length`` (format 2: compressed and encrypted, tag
included); its *raw* size is what it holds before compression (format 2's
``raw_length``; format 1 stores blobs as they are, so raw = stored). Format 2
cuts large files into chunks: a file whose content id is a list blob uses
the list and every chunk in it, and the figures that count blobs count them
all. The repository's stored size is the sizes of its data files: ``packs/``
(format 2 has nothing else) and format 1's ``objects/``.

Every function takes a repository as a URL (or an opened
:class:`~keepflow.tasks.core.repository.Repository`) and returns a pandas DataFrame or
a small dict, ready for a notebook:

=========================  ====================================================
``load_snapshots``         one row per snapshot, from the facts only
``load_manifests``         every entry of the chosen snapshots, a ``snapshot`` column
``read_manifests``         the same as one Arrow table per snapshot
``duckdb``                 a DuckDB connection with views ``snapshots`` and ``entries``
``snapshot_diff``          added / modified / deleted paths between two snapshots
``changes``                the same for each snapshot against its predecessor
``churn_by_directory``     ``changes`` summed per folder
``frequently_changed``     files modified in (almost) every run
``largest``                biggest files or folders of a snapshot
``file_types``             count and bytes by file extension
``dedup_stats``            logical bytes vs stored bytes, per snapshot and overall
``growth``                 logical and stored bytes over time
``repository_summary``     the figures ``keepflow stats`` prints (no pandas)
``replication_status``     which repositories hold which snapshots, what each lacks
=========================  ====================================================

pandas and DuckDB are imported inside the functions that need them, so
``repository_summary`` stays cheap enough for the command line.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import index as indexmod
from . import manifest as manifestmod
from . import snapshots as snapmod
from . import storage
from .errors import RepositoryNotFoundError, UsageError
from .manifest import MANIFEST_SCHEMA, SnapshotInfo
from .repository import Repository

# A repository argument: its URL or path, or an opened Repository (used as it is).
RepoLike: TypeAlias = "str | os.PathLike[str] | Repository"
# Which snapshots: None (all), "latest", an id prefix or a list of them, SnapshotInfos, or
# a load_snapshots frame (its ``id`` column).
Snapshots: TypeAlias = Any

if TYPE_CHECKING:
    import pandas as pd  # imported where used: the CLI's stats never load it

SNAPSHOT_COLUMNS = [
    "id", "short_id", "time", "end_time", "duration_s", "parent", "source", "host", "tags",
    "files", "dirs", "bytes", "added", "changed", "unchanged", "deleted",
    "bytes_read", "bytes_stored", "bytes_written", "skipped", "keepflow_version", "key",
]
CHANGE_COLUMNS = ["path", "change", "type", "size", "old_size"]
_DIFF_COLUMNS = ["path", "type", "size", "hash", "link_target"]


# -- opening --------------------------------------------------------------------------

def open_repo(repo: RepoLike, storage_options: dict[str, Any] | None = None) -> Repository:
    """A Repository from a URL or path (an opened Repository is passed through)."""
    if isinstance(repo, Repository):
        return repo
    return Repository.open(str(repo), storage_options, create=False)


def _pd():
    import pandas as pd

    return pd


def _infos(repo: Repository, snapshots=None, all_snaps: list[SnapshotInfo] | None = None) -> list[SnapshotInfo]:
    """Resolve ``snapshots`` (None, a ref, refs, SnapshotInfos or a DataFrame) in time order."""
    snaps = snapmod.list_snapshots(repo) if all_snaps is None else all_snaps
    if snapshots is None:
        return snaps
    if hasattr(snapshots, "columns") and "id" in snapshots.columns:
        refs = list(snapshots["id"])
    elif isinstance(snapshots, (str, SnapshotInfo)):
        refs = [snapshots]
    else:
        refs = list(snapshots)
    chosen = {}
    for ref in refs:
        info = ref if isinstance(ref, SnapshotInfo) else snapmod.resolve(repo, str(ref), snapshots=snaps)
        chosen[info.id] = info
    return sorted(chosen.values(), key=lambda i: (i.time, i.id))


# -- snapshots ----------------------------------------------------------------------------

def load_snapshots(repo_url: RepoLike, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per snapshot, oldest first, read from the snapshot facts only (no entries):
    format 2's facts block at the end of each manifest, a Parquet manifest's footer.

    Columns: ``id, short_id, time, end_time`` (UTC timestamps), ``duration_s``,
    ``parent, source, host, tags`` (a list), ``files, dirs, bytes`` (logical
    size of the files), ``added, changed, unchanged, deleted`` (file counts
    against the parent), ``bytes_read, bytes_stored, bytes_written`` (what the
    backup run read, the plaintext size of the new data it stored, and the
    bytes it wrote to the repository: format 2 compressed and encrypted, with
    pack headers; 0 in snapshots made before keepflow recorded it),
    ``skipped, keepflow_version, key`` (the manifest file name under
    ``snapshots/``).
    """
    pd = _pd()
    repo = open_repo(repo_url, storage_options)
    rows = [_snapshot_row(s) for s in snapmod.list_snapshots(repo)]
    df = pd.DataFrame(rows, columns=SNAPSHOT_COLUMNS)
    for col in ("time", "end_time"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    df["duration_s"] = (df["end_time"] - df["time"]).dt.total_seconds()
    for col in ("files", "dirs", "bytes", "added", "changed", "unchanged", "deleted",
                "bytes_read", "bytes_stored", "bytes_written", "skipped"):
        df[col] = df[col].astype("int64")
    return df


def _snapshot_row(s: SnapshotInfo) -> dict:
    return {
        "id": s.id, "short_id": s.short_id, "time": s.time, "end_time": s.end_time or s.time,
        "duration_s": 0.0, "parent": s.parent, "source": s.source, "host": s.host, "tags": list(s.tags),
        "files": s.files, "dirs": s.dirs, "bytes": s.bytes, "added": s.new, "changed": s.changed,
        "unchanged": s.unchanged, "deleted": s.deleted, "bytes_read": s.bytes_read,
        "bytes_stored": s.bytes_stored, "bytes_written": s.bytes_written, "skipped": s.skipped,
        "keepflow_version": s.keepflow_version,
        "key": s.key,
    }


# -- manifests ------------------------------------------------------------------------------

def _check_columns(columns: Sequence[str] | str | None) -> list[str]:
    if columns is None:
        return list(MANIFEST_SCHEMA.names)
    if isinstance(columns, str):
        columns = [columns]
    cols = list(dict.fromkeys(columns))
    unknown = [c for c in cols if c not in MANIFEST_SCHEMA.names]
    if unknown:
        raise UsageError(f"unknown manifest column(s) {unknown}; the columns are {MANIFEST_SCHEMA.names}")
    return cols


def _type_filter(types):
    if types is None:
        return None
    types = [types] if isinstance(types, str) else list(types)
    return pc.field("type").isin(types)


def _columns_of(expr) -> list[str]:
    """The manifest columns an expression may refer to: every column named in its text.

    A name that only looks like a reference (``path`` inside ``path_bytes``)
    costs reading one more column, never a wrong answer.
    """
    if expr is None:
        return []
    text = str(expr)
    return [c for c in MANIFEST_SCHEMA.names if c in text]


def read_manifests(repo_url: RepoLike, infos: Sequence[SnapshotInfo], columns: Sequence[str] | None = None, *,
                   types: str | Sequence[str] | None = None, filter: pc.Expression | None = None,
                   storage_options: dict[str, Any] | None = None) -> list[pa.Table]:
    """``columns`` of each snapshot in ``infos`` (SnapshotInfos), one table each, same order.

    Every manifest is read by ``manifest.read_manifest`` (both formats; a
    format 2 manifest is authenticated and decrypted in memory, ``hash`` comes
    back as hex) in a thread pool: Parquet decoding and zstd release the GIL,
    and on an object store each manifest is a round trip. ``types`` and
    ``filter`` (a ``pyarrow.compute``/``pyarrow.dataset`` expression) are
    applied to each table as it is read, so memory holds the kept rows only;
    the columns they refer to are read too, then dropped. Columns get the
    manifest schema's types (older manifests' int32 ``uid``/``gid`` become
    int64; optional columns an older manifest lacks are null).

    A manifest that cannot be read (damaged, not this repository's) raises
    ``DamagedManifestError`` naming it.
    """
    repo = open_repo(repo_url, storage_options)
    infos = list(infos)
    if not infos:
        return []
    cols = _check_columns(columns)
    expr = _type_filter(types)
    if filter is not None:
        expr = filter if expr is None else (expr & filter)
    need = list(dict.fromkeys(cols + _columns_of(expr)))
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in cols])

    def one(info: SnapshotInfo) -> pa.Table:
        try:
            t = manifestmod.read_manifest(repo, info, columns=need)
        except (ValueError, KeyError) as exc:   # ArrowInvalid is a ValueError
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise snapmod.DamagedManifest.from_name(info.key, reason).error(repo.url) from None
        if expr is not None:
            t = t.filter(expr)
        return t.select(cols).cast(schema)

    if len(infos) < 2:
        return [one(i) for i in infos]
    workers = min(len(infos), 4 if repo.is_local else 16)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, infos))


def load_manifests(repo_url: RepoLike, snapshots: Snapshots = None, columns: Sequence[str] | None = None, *,
                   types: str | Sequence[str] | None = None, filter: pc.Expression | None = None,
                   storage_options: dict[str, Any] | None = None, arrow: bool = False) -> pd.DataFrame | pa.Table:
    """Entries of the chosen snapshots as one table, with a ``snapshot`` column.

    ``snapshots``: None (all), ``"latest"``, an id prefix, a list of those, or
    a DataFrame from :func:`load_snapshots` (its ``id`` column). ``columns``:
    the manifest columns to read (default all); only those are decoded.
    ``types``: keep only ``"file"``, ``"dir"``, ``"symlink"`` (or a list),
    and ``filter`` (an expression such as ``ds.field("size") > 2**20``):
    applied to each manifest as it is read (see :func:`read_manifests`).
    ``hash`` is the content id as 64 hex characters in both formats.

    The ``snapshot`` column holds the full snapshot id (categorical in pandas,
    dictionary-encoded in Arrow). ``arrow=True`` returns a ``pyarrow.Table``
    instead of a DataFrame.
    """
    repo = open_repo(repo_url, storage_options)
    infos = _infos(repo, snapshots)
    cols = _check_columns(columns)
    tables = read_manifests(repo, infos, cols, types=types, filter=filter)
    ids = pa.array([i.id for i in infos], pa.string())
    dict_type = pa.dictionary(pa.int32(), pa.string())
    parts = []
    for n, t in enumerate(tables):
        codes = pa.array(np.full(t.num_rows, n, dtype=np.int32))
        parts.append(t.add_column(0, pa.field("snapshot", dict_type),
                                  pa.DictionaryArray.from_arrays(codes, ids)))
    if parts:
        table = pa.concat_tables(parts)
    else:
        table = pa.schema([pa.field("snapshot", dict_type)] + [MANIFEST_SCHEMA.field(c) for c in cols]).empty_table()
    if arrow:
        return table
    df = table.to_pandas(split_blocks=True, self_destruct=True)
    if not parts:  # keep the declared dtypes of an empty result
        df["snapshot"] = df["snapshot"].astype("category")
    return df


def _read_one(repo: Repository, info: SnapshotInfo, columns: Sequence[str], types=None) -> pa.Table:
    return read_manifests(repo, [info], _check_columns(columns), types=types)[0]


# -- DuckDB ---------------------------------------------------------------------------------------

_TIME = pa.timestamp("us", tz="UTC")


def _timestamps(values: list[str]) -> pa.Array:
    import datetime as dt

    def parse(v):
        return dt.datetime.fromisoformat(v.replace("Z", "+00:00")).astimezone(dt.UTC) if v else None

    return pa.array([parse(v) for v in values], _TIME)


def snapshots_table(infos: list[SnapshotInfo]) -> pa.Table:
    """The SnapshotInfo fields as an Arrow table, one row per snapshot (``time``/``end_time`` as UTC timestamps)."""
    fields = list(SnapshotInfo.__dataclass_fields__)
    cols: dict[str, Any] = {f: [getattr(i, f) for i in infos] for f in fields}
    types = {"id": pa.string(), "parent": pa.string(), "source": pa.string(), "host": pa.string(),
             "tags": pa.list_(pa.string()), "keepflow_version": pa.string(), "key": pa.string(),
             "xattrs": pa.bool_()}
    out = {}
    for f in fields:
        if f in ("time", "end_time"):
            out[f] = _timestamps(cols[f])
        else:
            out[f] = pa.array(cols[f], types.get(f, pa.int64()))
    return pa.table(out)


def duckdb(repo_url: RepoLike, storage_options: dict[str, Any] | None = None, snapshots: Snapshots = None, *,
           columns: Sequence[str] | None = None,
           connection: Any = None) -> Any:     # a duckdb.DuckDBPyConnection (duckdb is optional)
    """A DuckDB connection with two views over the repository, decrypted in memory.

    - ``snapshots``: one row per snapshot, the SnapshotInfo fields (``id,
      time, end_time, parent, source, host, tags, files, dirs, bytes, new,
      changed, unchanged, deleted, bytes_read, bytes_stored, bytes_written,
      skipped, start_ns, keepflow_version, key``), ``time``/``end_time`` as
      ``TIMESTAMP WITH TIME ZONE`` (the connection's time zone is UTC).
    - ``entries``: every manifest row of the chosen snapshots, plus
      ``snapshot`` (the snapshot id) and ``time`` (its start); ``hash`` is the
      content id in hex, as everywhere in keepflow.

    Both are Arrow tables registered with DuckDB (``connection.register``):
    the manifests are read with :func:`read_manifests`, so a format 2 manifest
    is authenticated and decrypted in this process's memory and nothing
    decrypted is written to disk. For an encrypted repository the connection's
    ``temp_directory`` is switched off as well, so DuckDB cannot spill
    intermediate results to disk either (a query larger than memory fails
    instead; ``SET temp_directory = '...'`` allows spilling again, knowingly).

    ``snapshots`` chooses the snapshots (as in :func:`load_manifests`; the
    ``snapshots`` view always lists all of them) and ``columns`` the manifest
    columns of ``entries`` (default all): the tables live in memory, about
    what ``load_manifests(..., arrow=True)`` takes. ``connection`` registers
    the views in an existing connection instead of a new in-memory one.

    A plaintext repository (format 1, or format 2 with ``--encryption
    none``) can also be queried in place with ``read_parquet`` on
    ``snapshots/*.parquet`` (README, "DuckDB"); this function gives the same
    views for every repository.
    """
    import duckdb as duckdb_module

    repo = open_repo(repo_url, storage_options)
    all_infos = snapmod.list_snapshots(repo)
    infos = _infos(repo, snapshots, all_infos)
    cols = _check_columns(columns)
    tables = read_manifests(repo, infos, cols)
    ids = pa.array([i.id for i in infos], pa.string())
    times = _timestamps([i.time for i in infos])
    dict_type = pa.dictionary(pa.int32(), pa.string())
    parts = []
    for n, t in enumerate(tables):
        codes = pa.array(np.full(t.num_rows, n, dtype=np.int32))
        t = t.add_column(0, pa.field("time", _TIME), pa.repeat(times[n], t.num_rows))
        parts.append(t.add_column(0, pa.field("snapshot", dict_type), pa.DictionaryArray.from_arrays(codes, ids)))
    if parts:
        entries = pa.concat_tables(parts)
    else:
        entries = pa.schema([pa.field("snapshot", dict_type), pa.field("time", _TIME)]
                            + [MANIFEST_SCHEMA.field(c) for c in cols]).empty_table()
    con = connection if connection is not None else duckdb_module.connect(":memory:")
    if repo.encrypted:
        con.execute("SET temp_directory = ''")
    con.execute("SET TimeZone = 'UTC'")
    con.register("snapshots", snapshots_table(all_infos))
    con.register("entries", entries)
    return con


# -- differences ------------------------------------------------------------------------------

def _diff_tables(ta: pa.Table, tb: pa.Table, ka=None, kb=None) -> pa.Table:
    """Added / modified / deleted entries from A to B (by content, like ``keepflow diff``).

    Returns ``path, change, type, size, old_size``: ``size`` is the size in B
    (in A for deletions), ``old_size`` the size in A for modifications.
    """
    # Most entries are identical in both: drop rows whose (path, type, hash, link)
    # appears on the other side with two set lookups, and join only the rest.
    ka = _row_key(ta) if ka is None else ka
    kb = _row_key(tb) if kb is None else kb
    ta = ta.filter(pc.invert(pc.is_in(ka, value_set=kb)))
    tb = tb.filter(pc.invert(pc.is_in(kb, value_set=ka)))
    a = ta.select(_DIFF_COLUMNS).rename_columns(["path"] + [f"a_{c}" for c in _DIFF_COLUMNS[1:]])
    b = tb.select(_DIFF_COLUMNS).rename_columns(["path"] + [f"b_{c}" for c in _DIFF_COLUMNS[1:]])
    j = a.join(b, keys="path", join_type="full outer", use_threads=True)
    in_a, in_b = pc.is_valid(j["a_type"]), pc.is_valid(j["b_type"])
    added = pc.and_(in_b, pc.invert(in_a))
    deleted = pc.and_(in_a, pc.invert(in_b))
    same = pc.and_(pc.equal(j["a_type"], j["b_type"]),
                   pc.and_(_eq_or_both_null(j["a_hash"], j["b_hash"]),
                           _eq_or_both_null(j["a_link_target"], j["b_link_target"])))
    modified = pc.and_(pc.and_(in_a, in_b), pc.invert(pc.fill_null(same, False)))
    keep = pc.or_(pc.or_(added, deleted), modified)
    j = j.filter(keep)
    added, deleted = pc.filter(added, keep), pc.filter(deleted, keep)
    change = pc.if_else(added, "added", pc.if_else(deleted, "deleted", "modified"))
    out = pa.table({
        "path": j["path"],
        "change": change,
        "type": pc.if_else(deleted, j["a_type"], j["b_type"]),
        "size": pc.if_else(deleted, j["a_size"], j["b_size"]),
        "old_size": pc.if_else(pc.or_(added, deleted), pa.scalar(None, pa.int64()), j["a_size"]),
    })
    return out.sort_by([("path", "ascending")])


def _row_key(t: pa.Table):
    """One string per entry: path, type, hash and link target (nulls distinct from "")."""
    def part(col):
        return pc.fill_null(pc.binary_join_element_wise("v", t[col], ""), "n")

    key = pc.binary_join_element_wise(t["path"], t["type"], part("hash"), part("link_target"), "\0")
    return key if t.num_rows else pa.array([], pa.string())


def _eq_or_both_null(x, y):
    both_null = pc.and_(pc.is_null(x), pc.is_null(y))
    return pc.or_(both_null, pc.fill_null(pc.equal(x, y), False))


def snapshot_diff(repo_url: RepoLike, a: str, b: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """What changed from snapshot ``a`` to snapshot ``b`` (refs: ``latest`` or id prefixes).

    One row per changed path: ``path, change`` (added/modified/deleted),
    ``type, size, old_size, size_delta``. Content changes only, exactly as
    ``keepflow diff`` counts them: a file whose mode or mtime changed but
    whose content did not is not listed.
    """
    repo = open_repo(repo_url, storage_options)
    snaps = snapmod.list_snapshots(repo)
    ia = snapmod.resolve(repo, a, snapshots=snaps)
    ib = snapmod.resolve(repo, b, snapshots=snaps)
    ta, tb = read_manifests(repo, [ia, ib], _DIFF_COLUMNS)
    df = _diff_tables(ta, tb).to_pandas()
    df["size_delta"] = df["size"] - df["old_size"].fillna(0).astype("int64")
    df.loc[df["change"] == "deleted", "size_delta"] = -df["size"]
    df.attrs.update(a=ia.id, b=ib.id)
    return df


def _predecessors(infos: list[SnapshotInfo]) -> list[tuple[SnapshotInfo, SnapshotInfo]]:
    """(previous, snapshot) pairs: the recorded parent when it is among ``infos``,
    else the previous snapshot of the same source and host."""
    by_id = {i.id: i for i in infos}
    last: dict[tuple[str, str], SnapshotInfo] = {}
    pairs = []
    for info in infos:
        prev = by_id.get(info.parent) if info.parent else None
        prev = prev or last.get((info.source, info.host))
        if prev is not None:
            pairs.append((prev, info))
        last[(info.source, info.host)] = info
    return pairs


def changes(repo_url: RepoLike, snapshots: Snapshots = None,
            storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Every change of every snapshot against its predecessor, one row per changed path.

    Columns: ``snapshot, previous, time`` and those of :func:`snapshot_diff`
    (``path, change, type, size, old_size``). The predecessor is the
    snapshot's parent when it is among the chosen snapshots, otherwise the
    previous snapshot of the same source and host; the first snapshot of each
    source has none and contributes no rows.
    """
    pd = _pd()
    repo = open_repo(repo_url, storage_options)
    infos = _infos(repo, snapshots)
    pairs = _predecessors(infos)
    # Manifests are read (in parallel) a few at a time when first needed and
    # dropped after their last pair: memory holds a handful of snapshots, not
    # the whole history.
    needed = [i for i in infos if any(i is p or i is s for p, s in pairs)]
    tables: dict[str, pa.Table] = {}
    keys: dict[str, Any] = {}  # row keys, computed once per snapshot
    read_ahead = 8

    def key(i):
        if i.id not in keys:
            if i.id not in tables:
                at = needed.index(i)
                batch = [j for j in needed[at:at + read_ahead] if j.id not in keys and j.id not in tables]
                tables.update(zip((j.id for j in batch), read_manifests(repo, batch, _DIFF_COLUMNS), strict=True))
            keys[i.id] = _row_key(tables[i.id])
        return keys[i.id]

    uses: dict[Any, Any] = {}
    for prev, snap in pairs:
        uses[prev.id] = uses.get(prev.id, 0) + 1
        uses[snap.id] = uses.get(snap.id, 0) + 1
    frames = []
    for prev, snap in pairs:
        kp, ks = key(prev), key(snap)
        d = _diff_tables(tables[prev.id], tables[snap.id], kp, ks).to_pandas()
        for i in (prev.id, snap.id):  # free what no later pair needs
            uses[i] -= 1
            if not uses[i]:
                keys.pop(i, None)
                tables.pop(i, None)
        d.insert(0, "time", pd.Timestamp(snap.time).tz_convert("UTC"))
        d.insert(0, "previous", prev.id)
        d.insert(0, "snapshot", snap.id)
        frames.append(d)
    if not frames:
        empty = pd.DataFrame(columns=["snapshot", "previous", "time"] + CHANGE_COLUMNS)
        return empty.astype({"size": "int64", "old_size": "float64"})
    df = pd.concat(frames, ignore_index=True)
    df.attrs["pairs"] = len(pairs)
    return df


def _folder(paths, depth: int | None):
    """Parent folder of each path, cut to its first ``depth`` components ('.' at the top)."""
    pd = _pd()
    s = pd.Series(paths, dtype="object")
    parent = s.map(lambda p: posixpath.dirname(p) or ".")
    if depth is None:
        return parent
    return parent.map(lambda d: d if d == "." else "/".join(d.split("/")[:depth]))


def churn_by_directory(repo_url: RepoLike, snapshots: Snapshots = None, depth: int | None = 1,
                       storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Changes summed per folder over all snapshot-to-predecessor pairs.

    Files and symlinks only (a new folder is counted through its files).
    ``depth`` cuts folders to their first components (1: top-level folders,
    None: the file's own folder; files at the top are under ``.``). Columns:
    ``directory, added, modified, deleted, changes, bytes_written`` (sizes of
    added and modified files, what a backup had to read) ``bytes_deleted``;
    sorted by ``changes``, most first.
    """
    pd = _pd()
    ch = changes(repo_url, snapshots, storage_options)
    ch = ch[ch["type"] != "dir"]
    cols = ["directory", "added", "modified", "deleted", "changes", "bytes_written", "bytes_deleted"]
    if ch.empty:
        return pd.DataFrame(columns=cols)
    ch = ch.assign(directory=_folder(ch["path"].to_numpy(), depth).to_numpy())
    counts = pd.crosstab(ch["directory"], ch["change"]).reindex(columns=["added", "modified", "deleted"],
                                                                fill_value=0)
    written = ch[ch["change"] != "deleted"].groupby("directory")["size"].sum()
    removed = ch[ch["change"] == "deleted"].groupby("directory")["size"].sum()
    out = counts.assign(changes=counts.sum(axis=1))
    out["bytes_written"] = written.reindex(out.index, fill_value=0).astype("int64")
    out["bytes_deleted"] = removed.reindex(out.index, fill_value=0).astype("int64")
    out = out.reset_index().rename_axis(None, axis=1)
    return out.sort_values(["changes", "directory"], ascending=[False, True], ignore_index=True)[cols]


def frequently_changed(repo_url: RepoLike, snapshots: Snapshots = None, min_fraction: float = 1.0,
                       storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Files modified in at least ``min_fraction`` of the runs (1.0: every run).

    A run is a snapshot with a predecessor. Columns: ``path, times_modified,
    runs, fraction, last_size``; most often modified first.
    """
    pd = _pd()
    ch = changes(repo_url, snapshots, storage_options)
    runs = ch.attrs.get("pairs", 0)
    cols = ["path", "times_modified", "runs", "fraction", "last_size"]
    mod = ch[(ch["change"] == "modified") & (ch["type"] == "file")]
    if mod.empty or not runs:
        return pd.DataFrame(columns=cols)
    g = mod.groupby("path").agg(times_modified=("change", "size"), last_size=("size", "last")).reset_index()
    g["runs"] = runs
    g["fraction"] = g["times_modified"] / runs
    g = g[g["fraction"] >= min_fraction - 1e-9]
    return g.sort_values(["times_modified", "path"], ascending=[False, True], ignore_index=True)[cols]


# -- one snapshot -------------------------------------------------------------------------------

def largest(repo_url: RepoLike, snapshot: str = "latest", n: int = 20, by: str = "files", depth: int | None = None,
            storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The ``n`` biggest files (``by="files"``) or folders (``by="dirs"``) of a snapshot.

    Folders are measured recursively (everything below them), optionally only
    down to ``depth`` components. Files: ``path, size, mtime, hash``;
    folders: ``directory, bytes, files``.
    """
    pd = _pd()
    if by not in ("files", "dirs"):
        raise UsageError(f"by must be 'files' or 'dirs', not {by!r}")
    repo = open_repo(repo_url, storage_options)
    info = snapmod.resolve(repo, snapshot)
    t = _read_one(repo, info, ["path", "size", "mtime_ns", "hash"], types="file")
    if by == "files":
        t = t.sort_by([("size", "descending"), ("path", "ascending")]).slice(0, n)
        df = t.to_pandas()
        df.insert(2, "mtime", pd.to_datetime(df.pop("mtime_ns"), unit="ns", utc=True))
        return df
    df = t.select(["path", "size"]).to_pandas()
    parts = df["path"].str.split("/")
    frames = []
    max_depth = int(parts.str.len().max() - 1) if len(df) else 0
    for d in range(1, (max_depth if depth is None else min(depth, max_depth)) + 1):
        deep = parts.str.len() > d
        frames.append(pd.DataFrame({"directory": parts[deep].str[:d].str.join("/"), "size": df["size"][deep]}))
    if not frames:
        return pd.DataFrame(columns=["directory", "bytes", "files"])
    all_dirs = pd.concat(frames, ignore_index=True)
    out = all_dirs.groupby("directory").agg(bytes=("size", "sum"), files=("size", "size")).reset_index()
    return out.sort_values(["bytes", "directory"], ascending=[False, True], ignore_index=True).head(n)


def file_types(repo_url: RepoLike, snapshot: str = "latest",
               storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Files and bytes per extension (lower case; ``(none)`` for no extension)."""
    repo = open_repo(repo_url, storage_options)
    info = snapmod.resolve(repo, snapshot)
    df = _read_one(repo, info, ["path", "size"], types="file").to_pandas()
    name = df["path"].str.rsplit("/", n=1).str[-1]
    ext = name.str.extract(r"^.+\.([^.]+)$", expand=False).str.lower().fillna("(none)")
    out = df.assign(extension=ext).groupby("extension").agg(files=("size", "size"), bytes=("size", "sum"))
    total = out["bytes"].sum()
    out["share"] = out["bytes"] / total if total else 0.0
    return out.reset_index().sort_values(["bytes", "extension"], ascending=[False, True], ignore_index=True)


# -- storage -------------------------------------------------------------------------------------

DATA_FOLDERS = ("packs", "objects")      # format 2 has no objects/: large files are chunks in packs


def _data_listing(repo: Repository, folders=DATA_FOLDERS) -> dict[str, int]:
    """Keys of the files under ``folders`` (relative to the root) -> size."""
    out = {}
    for folder in folders:
        for f in storage.list_files(repo.fs, repo.path(folder)):
            name = f["name"]
            key = name[name.rfind(f"{folder}/"):] if f"{folder}/" in name else name
            out[key] = int(f.get("size") or 0)
    return out


def _storage_totals(listing: dict[str, int]) -> dict[str, int]:
    packs = [s for k, s in listing.items() if k.startswith("packs/")]
    objects = [s for k, s in listing.items() if k.startswith("objects/")]
    return {"packs": len(packs), "pack_bytes": sum(packs), "objects": len(objects),
            "object_bytes": sum(objects), "stored_bytes": sum(packs) + sum(objects)}


def _groups(work: list, rows_per_group: int = 2_000_000):
    """Cut (info, flag) pairs into groups of about ``rows_per_group`` manifest rows."""
    group, rows = [], 0
    for item in work:
        group.append(item)
        rows += item[0].files + item[0].dirs
        if rows >= rows_per_group:
            yield group
            group, rows = [], 0
    if group:
        yield group


class _Blobs:
    """The index as arrays, and (format 2) the chunks of list blobs as index positions.

    ``stored`` is each blob's index ``length`` (what it takes in its pack),
    ``raw`` what a data blob holds before compression (0 for a list blob:
    lists are bookkeeping, not content; format 1: ``length``). Chunk lists are
    read with ``chunk_lists.read_lists`` the first time a snapshot uses them,
    each distinct list once, and kept as positions (8 bytes per chunk).
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.v2 = repo.version >= 2
        cols = None if self.v2 else ["hash", "length"]
        self.index = indexmod.load_index(repo, columns=cols)
        n = self.index.num_rows
        self.n = n
        self.value_set = self.index["hash"].combine_chunks() if n else pa.array([], pa.string())
        self.stored = self.index["length"].to_numpy().astype(np.int64) if n else np.zeros(0, np.int64)
        if self.v2 and n:
            kinds = self.index["type"].to_numpy()
            self.is_list = kinds == 1
            self.raw = np.where(self.is_list, 0, self.index["raw_length"].to_numpy().astype(np.int64))
        else:
            self.is_list = np.zeros(n, dtype=bool)
            self.raw = self.stored
        self.start = np.full(n, -1, dtype=np.int64)    # where a read list's chunks begin in ``_flat``
        self.count = np.zeros(n, dtype=np.int64)
        self.unreadable = np.zeros(n, dtype=bool)      # lists read_lists could not open
        self.lost: dict[int, list[str]] = {}            # list position -> its chunk ids not in the index
        self._parts: list[np.ndarray] = []
        self._size = 0
        self._flat = np.zeros(0, np.int64)
        self.lists_read = 0

    def positions(self, hashes) -> np.ndarray:
        """Index positions of ``hashes`` (-1 where not indexed)."""
        if not len(hashes):
            return np.zeros(0, np.int64)
        return pc.fill_null(pc.index_in(hashes, value_set=self.value_set), -1).to_numpy().astype(np.int64)

    def _read(self, todo: np.ndarray) -> None:
        from .chunk_lists import read_lists

        lists = read_lists(self.repo, self.index.take(pa.array(todo)))
        self.lists_read += len(todo)
        readable = [(p, c) for p, c in zip(todo.tolist(), lists, strict=True) if c is not None]
        for p, c in zip(todo.tolist(), lists, strict=True):
            if c is None:
                self.unreadable[p] = True
        ids = [cid for _, chunks in readable for cid, _ in chunks]
        pos = self.positions(pa.array(ids, pa.string())) if ids else np.zeros(0, np.int64)
        at = 0
        for p, chunks in readable:
            mine = pos[at:at + len(chunks)]
            good = mine[mine >= 0]
            if len(good) < len(mine):
                self.lost[p] = [ids[at + k] for k in np.flatnonzero(mine < 0)]
            at += len(chunks)
            self.start[p], self.count[p] = self._size, len(good)
            self._parts.append(good)
            self._size += len(good)
        self._flat = np.concatenate([self._flat] + self._parts) if self._parts else self._flat
        self._parts = []

    def expand(self, known: np.ndarray) -> tuple[np.ndarray, set[str], int]:
        """(every blob the content ids at positions ``known`` use, chunk ids not indexed,
        unreadable lists): ``known`` plus the chunks of the lists among them."""
        if not self.v2 or not len(known):
            return known, set(), 0
        lists = known[self.is_list[known]]
        if not len(lists):
            return known, set(), 0
        todo = lists[(self.start[lists] < 0) & ~self.unreadable[lists]]
        if len(todo):
            self._read(todo)
        ok = lists[self.start[lists] >= 0]
        counts = self.count[ok]
        total = int(counts.sum())
        lost = {cid for p in ok.tolist() if p in self.lost for cid in self.lost[p]}
        unreadable = int(self.unreadable[lists].sum())
        if not total:
            return known, lost, unreadable
        # positions start[l] .. start[l] + count[l] for every list l, in one gather
        ends = np.cumsum(counts)
        offsets = np.repeat(self.start[ok] - (ends - counts), counts) + np.arange(total)
        return np.union1d(known, self._flat[offsets]), lost, unreadable


class DedupStats(NamedTuple):
    per_snapshot: Any   # pandas DataFrame
    overall: dict


def dedup_stats(repo_url: RepoLike, snapshots: Snapshots = None,
                storage_options: dict[str, Any] | None = None) -> DedupStats:
    """Logical bytes against stored bytes, per snapshot and for the repository.

    A snapshot *uses* the blobs of its files' content ids and, for a format 2
    file cut into chunks (its content id is a list blob), the list and every
    chunk in it: chunk lists are read (``chunk_lists.read_lists``, once per
    distinct list) for exactly this. Stored sizes are index ``length`` values
    (format 2: compressed and encrypted, without the pack headers), raw
    sizes what data blobs hold before compression (module docstring).

    Per snapshot (oldest first): ``files``, ``logical_bytes`` (sum of file
    sizes), ``unique_blobs``/``unique_bytes`` (the distinct blobs it uses and
    their stored size), ``unique_raw_bytes`` (their raw size: its content
    after deduplication, before compression), ``new_blobs``/``new_bytes``
    (blobs no earlier snapshot uses, and their stored size: what this
    snapshot added to storage; a changed chunked file adds only its changed
    chunks and its new list), ``new_raw_bytes`` (the raw size of its new data
    blobs: the ``bytes_stored`` its backup run recorded, in both formats;
    ``new_bytes`` plus the pack headers is the run's ``bytes_written``),
    ``missing_blobs`` (content ids and chunks it
    uses that are not indexed), ``unreadable_lists`` (format 2: chunk lists
    that are indexed but cannot be read or opened), ``stored_bytes_cumulative``
    (running total of ``new_bytes``) and ``dedup_ratio`` (``logical_bytes /
    unique_raw_bytes``: duplicates inside the snapshot, whole files and
    chunks; compression does not count).

    Overall: ``logical_bytes`` (all snapshots together: what full copies
    would take), ``referenced_blobs``/``referenced_bytes``/
    ``referenced_raw_bytes`` (distinct blobs any chosen snapshot uses),
    ``indexed_blobs``/``indexed_bytes`` (all blobs in the index),
    ``unreferenced_bytes`` (indexed but used by no snapshot: interrupted runs,
    forgotten snapshots; None when only some snapshots were chosen),
    ``stored_bytes`` (the sizes of all files under ``packs/`` and format 1's
    ``objects/``: pack headers and trailers included), ``packs``,
    ``pack_bytes``, ``objects``, ``object_bytes``, ``dedup_ratio``
    (``logical_bytes / stored_bytes``: deduplication and compression
    together), ``missing_blobs``, ``unreadable_lists`` and ``lists_read``
    (chunk lists read to compute all this).
    """
    pd = _pd()
    repo = open_repo(repo_url, storage_options)
    all_infos = snapmod.list_snapshots(repo)
    infos = _infos(repo, snapshots, all_infos)
    blobs = _Blobs(repo)
    stored, raw = blobs.stored, blobs.raw
    seen = np.zeros(blobs.n, dtype=bool)        # used by an earlier snapshot
    referenced = np.zeros(blobs.n, dtype=bool)  # used by a chosen snapshot
    rows = []
    missing: set[str] = set()
    # Blobs already used by snapshots older than the chosen ones are not "new".
    chosen = {i.id for i in infos}
    older = [i for i in all_infos if infos and i.id not in chosen
             and (i.time, i.id) < (infos[0].time, infos[0].id)]
    work = [(i, False) for i in older] + [(i, True) for i in infos]
    for group in _groups(work):
        tables = read_manifests(repo, [i for i, _ in group], ["hash", "size"], types="file")
        # One hash-table build per group: positions of every row's hash in the index.
        hashes = pa.chunked_array([c for t in tables for c in t["hash"].chunks], pa.string())
        pos_all = blobs.positions(hashes)
        offset = 0
        for (info, counted), t in zip(group, tables, strict=True):
            n = t.num_rows
            pos = pos_all[offset:offset + n]
            offset += n
            ok = pos >= 0
            used, lost_chunks, unreadable = blobs.expand(np.unique(pos[ok]))
            fresh = used[~seen[used]]
            seen[fresh] = True
            if not counted:
                continue
            referenced[used] = True
            lost = set(lost_chunks)
            if not ok.all():
                sizes = t["size"].to_numpy()
                bad = ~ok & (sizes > 0) & t["hash"].is_valid().to_numpy(zero_copy_only=False)
                lost |= set(t["hash"].filter(pa.array(bad)).to_pylist())
            missing |= lost
            rows.append({"id": info.id, "short_id": info.short_id, "time": info.time,
                         "files": n, "logical_bytes": int(pc.sum(t["size"]).as_py() or 0),
                         "unique_blobs": len(used), "unique_bytes": int(stored[used].sum()),
                         "unique_raw_bytes": int(raw[used].sum()),
                         "new_blobs": len(fresh), "new_bytes": int(stored[fresh].sum()),
                         "new_raw_bytes": int(raw[fresh].sum()),
                         "missing_blobs": len(lost), "unreadable_lists": unreadable})
    cols = ["id", "short_id", "time", "files", "logical_bytes", "unique_blobs", "unique_bytes", "unique_raw_bytes",
            "new_blobs", "new_bytes", "new_raw_bytes", "missing_blobs", "unreadable_lists"]
    df = pd.DataFrame(rows, columns=cols)
    df["time"] = pd.to_datetime(df["time"], utc=True, format="ISO8601")
    df["stored_bytes_cumulative"] = df["new_bytes"].cumsum().astype("int64")
    df["dedup_ratio"] = (df["logical_bytes"] / df["unique_raw_bytes"].where(df["unique_raw_bytes"] > 0)).fillna(1.0)
    totals = _storage_totals(_data_listing(repo))
    logical = int(df["logical_bytes"].sum())
    overall = {
        "snapshots": len(infos), "logical_bytes": logical, "referenced_blobs": int(referenced.sum()),
        "referenced_bytes": int(stored[referenced].sum()), "referenced_raw_bytes": int(raw[referenced].sum()),
        "indexed_blobs": int(blobs.n), "indexed_bytes": int(stored.sum()),
        "unreferenced_bytes": int(stored[~referenced].sum()) if snapshots is None else None,
        **totals,
        "dedup_ratio": (logical / totals["stored_bytes"]) if totals["stored_bytes"] else None,
        "missing_blobs": len(missing), "unreadable_lists": int((blobs.unreadable & referenced).sum()),
        "lists_read": blobs.lists_read,
    }
    return DedupStats(df, overall)


def growth(repo_url: RepoLike, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Logical and stored bytes over time, one row per snapshot (oldest first).

    ``logical_bytes`` is the size of each snapshot, ``logical_bytes_cumulative``
    what keeping every snapshot as a full copy would take, ``new_bytes`` what
    the snapshot added to storage (blobs no earlier snapshot used) and
    ``stored_bytes_cumulative`` its running total; ``files_delta`` and
    ``logical_bytes_delta`` compare with the previous row.
    """
    snaps = load_snapshots(repo_url, storage_options)
    per = dedup_stats(repo_url, storage_options=storage_options).per_snapshot
    df = snaps[["id", "short_id", "time", "source", "host", "files"]].merge(
        per[["id", "logical_bytes", "unique_bytes", "new_bytes", "stored_bytes_cumulative"]], on="id", how="left")
    df["logical_bytes_cumulative"] = df["logical_bytes"].cumsum()
    df["files_delta"] = df["files"].diff().fillna(df["files"]).astype("int64")
    df["logical_bytes_delta"] = df["logical_bytes"].diff().fillna(df["logical_bytes"]).astype("int64")
    return df


# -- the figures for `keepflow stats` (no pandas) -----------------------------------------------

def repository_summary(repo_url: RepoLike, last: int = 10, storage_options: dict[str, Any] | None = None) -> dict:
    """Figures for ``keepflow stats``: snapshot facts, the index and a listing; no manifest rows,
    no chunk lists.

    ``format`` and ``encryption`` (None for format 1) say what the repository
    is. ``logical_bytes`` is the latest snapshot's size; ``logical_bytes_all``
    the sum over all snapshots (what full copies would take);
    ``stored_bytes`` the files under ``packs/`` (and format 1's
    ``objects/``), with ``packs``/``pack_bytes``/``objects``/``object_bytes``;
    ``blobs`` the distinct blobs in the index, ``blob_bytes`` their stored
    size (index ``length``), ``blob_raw_bytes`` what the data blobs hold
    before compression (format 1: ``blob_bytes``) and ``chunk_lists`` how
    many of the blobs are format 2 chunk lists; ``dedup_ratio`` =
    ``logical_bytes_all / stored_bytes`` (deduplication and compression
    together). ``growth`` covers the last ``last`` snapshots: their rows
    and, from the snapshot before the window to the latest, the change in
    files and logical bytes, the new data those runs stored (their
    ``bytes_stored``: plaintext) and what they wrote to the repository
    (``bytes_written``: format 2 compressed and encrypted, with pack headers).
    """
    repo = open_repo(repo_url, storage_options)
    snaps = snapmod.list_snapshots(repo)
    v2 = repo.version >= 2
    idx = indexmod.load_index(repo, columns=["length", "type", "raw_length"] if v2 else ["length"])
    totals = _storage_totals(_data_listing(repo))
    latest = snaps[-1] if snaps else None
    logical_all = sum(s.bytes for s in snaps)
    last = max(1, int(last))
    window = snaps[-last:]
    before = snaps[-last - 1] if len(snaps) > last else None
    growth = {
        "snapshots": len(window),
        "from": before.id if before else None,
        "to": latest.id if latest else None,
        "files_delta": (latest.files - (before.files if before else 0)) if latest else 0,
        "logical_bytes_delta": (latest.bytes - (before.bytes if before else 0)) if latest else 0,
        "stored_bytes_added": sum(s.bytes_stored for s in window),
        "written_bytes_added": sum(s.bytes_written for s in window),
        "rows": [{"id": s.id, "time": s.time, "source": s.source, "files": s.files, "bytes": s.bytes,
                  "added": s.new, "changed": s.changed, "deleted": s.deleted, "bytes_stored": s.bytes_stored,
                  "bytes_written": s.bytes_written}
                 for s in window],
    }
    blob_bytes = int(pc.sum(idx["length"]).as_py() or 0) if idx.num_rows else 0
    if v2 and idx.num_rows:
        is_list = pc.equal(idx["type"], 1)
        chunk_lists = int(pc.sum(is_list).as_py() or 0)
        blob_raw = int(pc.sum(pc.if_else(is_list, 0, idx["raw_length"])).as_py() or 0)
    else:
        chunk_lists, blob_raw = 0, blob_bytes
    return {
        "repository": repo.url,
        "id": repo.config.id,
        "format": repo.version,
        "encryption": repo.config.encryption if v2 else None,
        "snapshots": len(snaps),
        "first": snaps[0].time if snaps else None,
        "latest": latest.id if latest else None,
        "latest_time": latest.time if latest else None,
        "files": latest.files if latest else 0,
        "logical_bytes": latest.bytes if latest else 0,
        "logical_bytes_all": logical_all,
        "blobs": idx.num_rows,
        "blob_bytes": blob_bytes,
        "blob_raw_bytes": blob_raw,
        "chunk_lists": chunk_lists,
        **totals,
        "dedup_ratio": round(logical_all / totals["stored_bytes"], 3) if totals["stored_bytes"] else None,
        "growth": growth,
    }


# -- several repositories that should hold the same snapshots ---------------------------------------

def _try_open(url, storage_options: dict[str, Any] | None):
    try:
        return open_repo(url, storage_options), "ok"
    except RepositoryNotFoundError:
        return None, "empty"
    except Exception as exc:  # unreachable, foreign content, newer format: report, don't stop
        return None, f"error: {exc}"


def snapshot_presence(urls: Iterable[str], storage_options: dict[str, dict] | None = None) -> pd.DataFrame:
    """Which repository holds which snapshot: one row per snapshot id, one bool column per URL.

    ``storage_options`` maps a URL to its fsspec options. Columns ``time`` and
    ``source`` come from whichever repository holds the snapshot.
    """
    pd = _pd()
    urls = list(urls)
    seen: dict[str, SnapshotInfo] = {}
    held: dict[str, set[str]] = {}
    for url in urls:
        repo, _ = _try_open(url, (storage_options or {}).get(url))
        snaps = snapmod.list_snapshots(repo) if repo is not None else []
        held[url] = {s.id for s in snaps}
        for s in snaps:
            seen.setdefault(s.id, s)
    order = sorted(seen.values(), key=lambda i: (i.time, i.id))
    df = pd.DataFrame({"id": [s.id for s in order], "short_id": [s.short_id for s in order],
                       "time": pd.to_datetime([s.time for s in order], utc=True, format="ISO8601"),
                       "source": [s.source for s in order]})
    for url in urls:
        df[url] = [s.id in held[url] for s in order]
    return df


def replication_status(primary: str, replicas: Iterable[str],
                       storage_options: dict[str, dict] | None = None) -> pd.DataFrame:
    """What each replica lacks relative to ``primary``, one row per replica.

    Compares snapshot ids (``snapshots/``), index files (``index/``), blob
    ids (the loaded indexes: data blobs, chunks and chunk lists alike) and
    data files (``packs/`` and format 1's ``objects/`` keys with their sizes:
    a key present with another size counts as missing). ``missing_bytes`` is
    what copying the missing data files would transfer. For format 2 the key
    files under ``keys/`` are compared too (replication mirrors them, so a
    password removed on the primary stops opening the replica):
    ``missing_key_files`` and ``extra_key_files``. A replica that does not
    exist yet is ``state="empty"`` and lacks everything; one that cannot be
    read (unreachable, foreign, no password that opens it) is reported, not
    raised. Encrypted repositories need the password (replicas share the
    primary's key files), because snapshot facts and index files are
    encrypted.

    Columns: ``url, state, snapshots, missing_snapshots, missing_ids,
    extra_snapshots, missing_index_files, missing_blobs, missing_keys,
    missing_bytes, missing_key_files, extra_key_files, in_sync``.
    """
    pd = _pd()
    opts = storage_options or {}
    prim = open_repo(primary, opts.get(primary))
    p_order = [s.id for s in snapmod.list_snapshots(prim)]  # oldest first
    p_snaps = set(p_order)
    p_index = set(indexmod.list_index_names(prim))
    p_hashes = indexmod.load_index(prim, columns=["hash"])["hash"]
    p_data = _data_listing(prim)
    p_keyfiles = _data_listing(prim, ("keys",)) if prim.version >= 2 else {}
    rows = []
    for url in replicas:
        repo, state = _try_open(url, opts.get(url))
        if state.startswith("error"):
            rows.append({"url": url, "state": state})
            continue
        r_snaps = {s.id for s in snapmod.list_snapshots(repo)} if repo else set()
        r_index = set(indexmod.list_index_names(repo)) if repo else set()
        r_hashes = indexmod.load_index(repo, columns=["hash"])["hash"] if repo else pa.array([], pa.string())
        r_data = _data_listing(repo) if repo else {}
        r_keyfiles = _data_listing(repo, ("keys",)) if repo and prim.version >= 2 else {}
        lacking = [k for k, size in p_data.items() if r_data.get(k) != size]
        if len(p_hashes) and len(r_hashes):
            missing_blobs = int(pc.sum(pc.invert(pc.is_in(p_hashes, value_set=r_hashes))).as_py() or 0)
        else:
            missing_blobs = len(p_hashes)
        missing_ids = [i for i in p_order if i not in r_snaps]  # oldest first
        rows.append({
            "url": url, "state": state, "snapshots": len(r_snaps), "missing_snapshots": len(missing_ids),
            "missing_ids": missing_ids, "extra_snapshots": len(r_snaps - p_snaps),
            "missing_index_files": len(p_index - r_index), "missing_blobs": missing_blobs,
            "missing_keys": len(lacking), "missing_bytes": sum(p_data[k] for k in lacking),
            "missing_key_files": sum(1 for k, size in p_keyfiles.items() if r_keyfiles.get(k) != size),
            "extra_key_files": len(r_keyfiles.keys() - p_keyfiles.keys()),
        })
    cols = ["url", "state", "snapshots", "missing_snapshots", "missing_ids", "extra_snapshots",
            "missing_index_files", "missing_blobs", "missing_keys", "missing_bytes", "missing_key_files",
            "extra_key_files"]
    df = pd.DataFrame(rows, columns=cols)
    counts = ["snapshots", "missing_snapshots", "extra_snapshots", "missing_index_files", "missing_blobs",
              "missing_keys", "missing_bytes", "missing_key_files", "extra_key_files"]
    df[counts] = df[counts].astype("Int64")  # an unreadable replica has no counts: <NA>, not NaN floats
    df["in_sync"] = ((df["state"] == "ok") & (df["missing_snapshots"] == 0) & (df["missing_keys"] == 0)
                     & (df["missing_index_files"] == 0) & (df["missing_key_files"] == 0)
                     & (df["extra_key_files"] == 0)).fillna(False).astype(bool)
    df.attrs.update(primary=primary, primary_snapshots=len(p_snaps), primary_bytes=sum(p_data.values()))
    return df


__all__ = [
    "open_repo", "load_snapshots", "load_manifests", "read_manifests", "duckdb", "snapshots_table", "snapshot_diff",
    "changes", "churn_by_directory",
    "frequently_changed", "largest", "file_types", "dedup_stats", "DedupStats", "growth",
    "repository_summary", "snapshot_presence", "replication_status",
]
