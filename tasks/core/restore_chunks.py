"""Restoring format 2 content: opening blobs, and files assembled from chunks.

A file whose content id is a list blob (ARCHITECTURE.md, "### Packs", "List
blobs") is restored from its chunks. ``prepare`` (restore.py) calls
``expand_lists``: every list blob of the restore is read (range reads, in a
thread pool on object stores), authenticated and decoded, and its chunks are
joined with the index, so each batch gets a work list of chunk locations
(``chunks`` parts in the run folder, one per batch) and never needs the
index. A file whose list cannot be read or that has a chunk the index lacks
is reported, not restored.

``restore_chunked`` writes each such file to a temporary name in file order
while a small thread pool reads and opens the next chunks (zstd releases the
GIL); every chunk is authenticated, decompressed and its keyed id recomputed
before it is written, and the file is renamed into place only when all of its
chunks were good. From a repository that is not on local disk, chunks that lie
next to each other in one pack (a file's chunks are packed in file order, 12-14
per 16 MiB pack) are read with one range request of up to ``SPAN_BYTES``
instead of one each: a GET per ~8 MiB rather than per ~1.2 MiB chunk. A chunk
of such a span that does not open is read again on its own from the fallbacks.
Local repositories read one chunk at a time (a read there costs a few µs, and
smaller reads keep less in memory).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import pack, progress
from . import scratch as scratch_io
from .chunk_lists import encode_list, read_lists
from .errors import KeepflowError
from .store_v2 import chunker_for, tune_malloc

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .blob_sources import BlobSources
    from .repository import Repository
    from .restore_writer import TargetWriter

PREFETCH = 4                            # reads in flight for the file being written
SPAN_BYTES = 8 * 1024 * 1024            # remote repositories: adjacent chunks read together up to this
_CHUNK_COLUMNS = ["_file", "pos", "hash", "key", "offset", "length", "seq", "salt", "raw_length", "compressed"]


def entry_of(cols: dict, i: int) -> pack.Entry2:
    return pack.Entry2(cols["hash"][i], cols["kind"][i], cols["compressed"][i], cols["seq"][i],
                       cols["offset"][i], cols["length"][i], cols["raw_length"][i])


class BlobOpener:
    """Opens format 2 blobs of a batch's rows: plaintext, or None when the stored bytes are bad."""

    def __init__(self, sources: BlobSources, cols: dict) -> None:
        self.keys = sources.any_repo().keys
        self.cols = cols

    def open(self, i: int, stored: bytes | memoryview) -> bytes | None:
        try:
            return pack.open_blob2(self.keys, self.cols["salt"][i], entry_of(self.cols, i), stored)
        except KeepflowError:
            return None


def expand_lists(repo: Repository, located: pa.Table, idx: pa.Table | Callable[[pa.ChunkedArray], pa.Table],
                 fallbacks: Sequence[Callable[[], Repository | None]] = ()) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(located without unrestorable files, chunk work table, unrestorable files).

    ``located`` holds the files with their index rows (format 2 columns);
    ``idx`` is the index table, or a function giving the location columns of
    hashes (``locations.BlobLocations.locate``);
    the chunk table's ``_file`` is the row number in the returned ``located``.
    A list that cannot be read or opened from ``repo`` is read from each of
    ``fallbacks`` (callables returning an opened replica, or None) in turn.
    """
    is_list = pc.equal(located["kind"], 1)
    if not pc.any(is_list).as_py():
        return located, empty_chunks(), located.slice(0, 0)
    list_rows = np.flatnonzero(is_list.to_numpy(zero_copy_only=False))
    rows = located.take(pa.array(list_rows))
    lists = read_lists(repo, rows)
    for open_replica in fallbacks:
        failed = [k for k, chunks in enumerate(lists) if chunks is None]
        if not failed:
            break
        replica = open_replica()
        if replica is None:
            continue
        for k, chunks in zip(failed, read_lists(replica, rows.take(pa.array(failed))), strict=True):
            lists[k] = chunks
    bad = np.zeros(located.num_rows, dtype=bool)
    files, positions, hashes = [], [], []
    for row, chunks in zip(list_rows, lists, strict=True):
        if chunks is None:
            bad[row] = True
            continue
        pos = 0
        for cid, n in chunks:
            files.append(int(row))
            positions.append(pos)
            hashes.append(cid)
            pos += n
    table = pa.table({"_file": pa.array(files, pa.int64()), "pos": pa.array(positions, pa.int64()),
                      "hash": pa.array(hashes, pa.string())})
    if callable(idx):
        joined = table
        where = idx(table["hash"])
        for name in ("key", "offset", "length", "seq", "salt", "raw_length", "compressed"):
            joined = joined.append_column(name, where[name])
    else:
        table = table.append_column("_order", pa.array(np.arange(table.num_rows), pa.int64()))
        joined = table.join(idx.select(["hash", "key", "offset", "length", "seq", "salt", "raw_length",
                                        "compressed"]), keys="hash", join_type="left outer").sort_by("_order")
    unindexed = pc.is_null(joined["key"])
    if pc.any(unindexed).as_py():
        bad[np.unique(joined.filter(unindexed)["_file"].to_numpy())] = True
    keep = ~bad
    new_number = np.cumsum(keep) - 1
    chunks = joined.filter(pa.array(keep[joined["_file"].to_numpy()]))
    chunks = chunks.set_column(0, "_file", pa.array(new_number[chunks["_file"].to_numpy()], pa.int64()))
    return located.filter(pa.array(keep)), chunks.select(_CHUNK_COLUMNS), located.filter(pa.array(bad))


def empty_chunks() -> pa.Table:
    return pa.table({"_file": pa.array([], pa.int64()), "pos": pa.array([], pa.int64()),
                     "hash": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                     "offset": pa.array([], pa.int64()), "length": pa.array([], pa.int64()),
                     "seq": pa.array([], pa.int32()), "salt": pa.array([], pa.binary(32)),
                     "raw_length": pa.array([], pa.int64()), "compressed": pa.array([], pa.bool_())})


def write_chunk_parts(scratch: str, chunks: pa.Table, batches: list[tuple[int, int]]) -> None:
    files = chunks["_file"]
    for number, (a, b) in enumerate(batches):
        mine = chunks.filter(pc.and_(pc.greater_equal(files, a), pc.less(files, b)))
        mine = mine.set_column(0, "_file", pc.subtract(mine["_file"], a))
        scratch_io.write_part(scratch, "chunks", number, mine)


def content_id_function(repo: Repository) -> Callable[[AbstractFileSystem, str, bool], str]:
    """fn(fs, path, local) -> the format 2 content id of a file at the target (for --overwrite if-changed)."""
    keys, threshold = repo.keys, repo.config.small_file_threshold

    def content_id(fs: AbstractFileSystem, path: str, local: bool) -> str:
        with open(path, "rb") if local else fs.open(path, "rb") as f:
            head = f.read(threshold)
            if len(head) < threshold:
                return keys.blob_id(head)
            first = [head]

            def read(n):
                return first.pop() if first else f.read(n)

            chunks = [(keys.blob_id(c), len(c)) for c in chunker_for(repo).iter_chunks(read)]
        if len(chunks) == 1:
            return chunks[0][0]
        return keys.list_id(encode_list(chunks))

    return content_id


_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(PREFETCH, thread_name_prefix="keepflow-restore")
    return _pool


def restore_chunked(plan: dict, batch_no: int, sources: BlobSources, cols: dict, rows: list[int], by_hash: dict,
                    writer: TargetWriter) -> None:
    """Write the batch's chunked files ``rows`` (and their duplicates in ``by_hash``)."""
    tune_malloc()       # chunks and their plaintexts churn through malloc as in backup (store_v2.py)
    table = scratch_io.read_part(plan["scratch"], "chunks", batch_no)
    ccols = {c: table[c].to_pylist() for c in _CHUNK_COLUMNS}
    ccols["kind"] = [pack.KIND_DATA] * table.num_rows
    starts: dict[int, list[int]] = {}
    for k, f in enumerate(ccols["_file"]):
        starts.setdefault(f, []).append(k)
    keys = sources.any_repo().keys
    for i in rows:
        paths = [j for j in by_hash[cols["hash"][i]] if writer.pending(j)]
        if not paths:
            continue
        problem = _write_chunked(writer, sources, keys, cols, paths[0], ccols, starts.get(i, []))
        if problem:
            for j in paths:
                writer.result.errors.append((cols["path"][j], problem))
            continue
        for j in paths[1:]:
            writer.copy_from(cols, paths[0], j)


def _fetch(sources, keys, ccols, k):
    key, off, length = ccols["key"][k], ccols["offset"][k], ccols["length"][k]
    entry = entry_of(ccols, k)

    def check(stored):
        try:
            return pack.open_blob2(keys, ccols["salt"][k], entry, stored)
        except KeepflowError:
            return None

    try:
        plain = check(sources.primary_range(key, off, off + length))
    except OSError:
        plain = None
    if plain is not None:
        sources.count(sources.primary_url)
        return plain, length, None
    plain, problem = sources.from_fallbacks(key, off, length, ccols["hash"][k], check=check)
    return plain, length, problem


def _spans(ccols, rows: list[int], limit: int):
    """``rows`` (chunks in file order) cut into runs that lie next to each other in one pack,
    each at most ``limit`` stored bytes (a chunk alone may be more); ``limit`` 0: one chunk each."""
    span: list[int] = []
    size = end = 0
    key = None
    for k in rows:
        length, offset = ccols["length"][k], ccols["offset"][k]
        if span and (not limit or ccols["key"][k] != key or offset != end or size + length > limit):
            yield span
            span, size = [], 0
        span.append(k)
        key, end, size = ccols["key"][k], offset + length, size + length
    if span:
        yield span


def _fetch_span(sources, keys, ccols, span: list[int]) -> list:
    """[(plaintext or None, stored length, problem)] for the chunks of ``span``, in order; one
    range read from the primary, then each chunk that does not open from the fallbacks."""
    if len(span) == 1:
        return [_fetch(sources, keys, ccols, span[0])]
    key = ccols["key"][span[0]]
    start = ccols["offset"][span[0]]
    stop = ccols["offset"][span[-1]] + ccols["length"][span[-1]]
    try:
        data = sources.primary_range(key, start, stop)
    except OSError:
        data = None
    if data is None or len(data) != stop - start:
        return [_fetch(sources, keys, ccols, k) for k in span]
    view, out = memoryview(data), []
    for k in span:
        off, length = ccols["offset"][k], ccols["length"][k]
        entry = entry_of(ccols, k)

        def check(stored, k=k, entry=entry):
            try:
                return pack.open_blob2(keys, ccols["salt"][k], entry, stored)
            except KeepflowError:
                return None

        plain = check(view[off - start: off - start + length])
        if plain is not None:
            sources.count(sources.primary_url)
            out.append((plain, length, None))
            continue
        plain, problem = sources.from_fallbacks(key, off, length, ccols["hash"][k], check=check)
        out.append((plain, length, problem))
        if plain is None:
            break                       # the file cannot be restored: nothing after it is needed
    return out


def _write_chunked(writer, sources, keys, cols: dict[str, list[Any]], j: int, ccols,
                   chunk_rows: list[int]) -> str | None:
    dest = writer.dest(cols, j)
    tmp = writer._tmp_name(dest)
    pool = _threads()
    pending: deque = deque()
    primary = sources.repo(sources.primary_url)
    todo = _spans(ccols, chunk_rows, 0 if primary is None or primary.is_local else SPAN_BYTES)
    written = read = 0
    try:
        out = writer._create_local(tmp, cols["size"][j]) if writer.local else writer.fs.open(tmp, "wb")
    except OSError as exc:
        return f"cannot write: {exc.strerror or exc}"
    problem = None
    try:
        with out:
            for span in todo:
                pending.append(pool.submit(_fetch_span, sources, keys, ccols, span))
                if len(pending) >= PREFETCH:
                    break
            while pending and problem is None:
                # problem is read after the loop: the span's first failure ends the file.
                for plain, stored, problem in pending.popleft().result():  # noqa: B007
                    if plain is None:
                        break
                    out.write(plain)
                    written += len(plain)
                    read += stored
                if problem is None:
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.append(pool.submit(_fetch_span, sources, keys, ccols, nxt))
    except OSError as exc:
        problem = f"cannot write: {exc.strerror or exc}"
    except BaseException:
        writer._discard(tmp)
        raise
    finally:
        for f in pending:
            f.cancel()
    writer.result.bytes_read += read
    if problem is None and written != cols["size"][j]:
        problem = f"its chunks hold {written} bytes, the snapshot says {cols['size'][j]}"
    if problem is not None:
        writer._discard(tmp)
        return problem
    try:
        if writer.local:
            writer._finish_local(tmp, dest, cols, j)
        else:
            writer.fs.mv(tmp, dest)
    except OSError as exc:
        writer._discard(tmp)
        return f"cannot write: {exc.strerror or exc}"
    writer.result.written += 1
    writer.result.bytes_written += written
    progress.advance("restore", 1, written)
    return None



