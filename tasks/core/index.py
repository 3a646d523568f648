"""The blob index: where each blob lives (hash -> key, offset, length).

Readers never guess locations; they look blobs up here, so a blob stored
whole in ``objects/`` is simply ``offset 0, length size``.

Each batch of a backup writes its own index file as soon as its packs are
stored (``index/<run>-b<batch>.parquet``), so a run that dies half-way leaves
its stored blobs findable and the next run does not store them again. When
the run commits, its batch files are merged into one ``index/<run>.parquet``
written before the batch files are removed; a reader that lists the folder in
between sees the same entries twice, which is harmless (duplicates are
dropped on load, the first location wins).

Existence checks use the index, never a HEAD request per blob (dvc's
``oids_exist`` trade-off, decided once: the index is always small next to the
data it describes, about 120 bytes per blob).
"""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.compute as pc

from . import parquet_io, storage
from .errors import UnindexedBlobsError
from .store import INDEX_SCHEMA, KnownBlobs

# How many of the affected files an UnindexedBlobsError names.
NAMED_FILES = 10


def list_index_names(repo) -> list[str]:
    files = storage.list_files(repo.fs, repo.path("index"))
    return sorted(f["name"].rsplit("/", 1)[-1] for f in files if f["name"].endswith(".parquet"))


def load_index(repo, columns=None, unique: bool = True) -> pa.Table:
    """All index entries, one row per hash (every location with ``unique=False``)."""
    for attempt in range(3):
        names = list_index_names(repo)
        try:
            table = parquet_io.read_tables(repo.fs, [repo.path("index", n) for n in names], INDEX_SCHEMA)
            break
        except FileNotFoundError:
            # A run merged its batch files between our listing and reading.
            if attempt == 2:
                raise
    if table.num_rows == 0 or not unique:
        return table.select(columns) if columns else table
    table = unique_hashes(table)
    return table.select(columns) if columns else table


def unique_hashes(table: pa.Table) -> pa.Table:
    hashes = table["hash"]
    if pc.count_distinct(hashes).as_py() == table.num_rows:
        return table
    # Keep the first row of each hash, in table order. ``first`` holds row
    # *positions*: take those rows (sorted), never ``sort_indices(first)``,
    # which are positions within ``first`` and would keep the first k rows of
    # the table, duplicates included, and drop the last unique hashes.
    indices = pa.table({"hash": hashes, "i": pa.array(range(table.num_rows), pa.int64())})
    first = indices.group_by("hash", use_threads=False).aggregate([("i", "min")])["i_min"]
    return table.take(pc.take(first, pc.sort_indices(first)))


def not_indexed(hashes: pa.Array | pa.ChunkedArray, indexed: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The distinct non-null ``hashes`` that ``indexed`` does not contain."""
    wanted = pc.drop_null(pc.unique(hashes))
    return wanted.filter(pc.invert(pc.is_in(wanted, value_set=indexed)))


def require_indexed(repo, entries: pa.Table, what: str) -> None:
    """The commit guard: every file hash in ``entries`` (path, type, hash) is in the index.

    Reads the index as it is now (every index file, the run's merged file
    included), so it checks what a reader will see after the commit, not what
    the writer believes it stored. Raises UnindexedBlobsError naming the files.
    """
    files = entries.filter(pc.equal(entries["type"], "file"))
    if files.num_rows == 0:
        return
    indexed = load_index(repo, columns=["hash"], unique=False)["hash"]
    absent = not_indexed(files["hash"], indexed)
    if len(absent) == 0:
        return
    hit = files.filter(pc.is_in(files["hash"], value_set=absent))
    paths = hit["path"].to_pylist()
    named = ", ".join(paths[:NAMED_FILES]) + (f" and {len(paths) - NAMED_FILES} more" if len(paths) > NAMED_FILES else "")
    raise UnindexedBlobsError(what=what, count=len(absent), files=len(paths), paths=named, url=repo.url)


def write_index(repo, table: pa.Table, name: str) -> str | None:
    if table.num_rows == 0:
        return None
    path = repo.path("index", f"{name}.parquet")
    parquet_io.write_table_once(repo.fs, path, table.cast(INDEX_SCHEMA))
    return path


def merge_run_index(repo, run_id: str) -> int:
    """Merge ``<run>-b*.parquet`` into ``<run>.parquet``; returns entries merged."""
    prefix = f"{run_id}-b"
    parts = [n for n in list_index_names(repo) if n.startswith(prefix)]
    if not parts:
        return 0
    table = parquet_io.read_tables(repo.fs, [repo.path("index", n) for n in parts], INDEX_SCHEMA)
    write_index(repo, table, run_id)
    for n in parts:
        try:
            repo.fs.rm_file(repo.path("index", n))
        except FileNotFoundError:
            pass
    return table.num_rows


# The per-process known-blob caches, keyed by (repository URL, run id), newest
# last. A run drops its entry when it commits or fails (forget_run; on a Dask
# cluster the flow asks every worker to). A worker whose flow process was
# killed never hears that, so a process keeps at most CACHED_RUNS entries and
# drops the least recently used: a long-lived worker cannot fill up with
# dead runs' sets, and a live run that lost its entry only reloads the index.
CACHED_RUNS = 4
_known_cache: dict[tuple[str, str], KnownBlobs] = {}
_cache_lock = threading.Lock()


def known_blobs(repo, run_id: str) -> KnownBlobs:
    """The run's shared KnownBlobs, loaded from the index once per process."""
    key = (repo.url, run_id)
    with _cache_lock:
        known = _known_cache.pop(key, None)
        if known is None:
            hashes = load_index(repo, columns=["hash"])["hash"].to_pylist()
            known = KnownBlobs(hashes)
        _known_cache[key] = known                  # most recently used last
        while len(_known_cache) > CACHED_RUNS:
            del _known_cache[next(iter(_known_cache))]
    return known


def forget_run(repo_url: str, run_id: str) -> None:
    with _cache_lock:
        _known_cache.pop((repo_url, run_id), None)


def cached_runs() -> list[tuple[str, str]]:
    """(repository URL, run id) of the runs whose known-blob set this process holds."""
    with _cache_lock:
        return list(_known_cache)
