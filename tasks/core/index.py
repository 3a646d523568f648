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

import pyarrow as pa
import pyarrow.compute as pc

from . import parquet_io, storage
from .errors import UnindexedBlobsError
from .known_blobs import CACHED_RUNS, KnownBlobs, cached_runs, forget_run, known_blobs  # noqa: F401  (re-exported)
from .store import INDEX_SCHEMA

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
