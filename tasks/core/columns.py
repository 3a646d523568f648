"""Arrow columns that cost nothing per row: all-null columns as shared chunks.

Most optional manifest columns (``mtime_ns_exact``, ``rdev``, ``xattrs``,
``path_bytes``, ...) are null for every entry of an ordinary tree, yet
``pa.nulls(n, type)`` and the Parquet reader allocate 4-16 bytes per row for
them: 48 bytes per file for the seven optional columns, a quarter of a
manifest table in memory. Here an all-null column is a chunked array whose
chunks are slices of one preallocated null array per type, so a million
rows of nulls cost one 64Ki-row array, shared by every table of the process.
Arrow arrays are immutable, so sharing is safe; anything that writes them
(Parquet) reads them like any other nulls.
"""

from __future__ import annotations

import threading

import pyarrow as pa

NULL_CHUNK = 65536

_shared: dict[pa.DataType, pa.Array] = {}
_lock = threading.Lock()


def nulls(kind: pa.DataType, n: int) -> pa.ChunkedArray:
    """``n`` nulls of ``kind``, as slices of one shared array."""
    chunk = _shared.get(kind)
    if chunk is None:
        with _lock:
            chunk = _shared.setdefault(kind, pa.nulls(NULL_CHUNK, kind))
    pieces = [chunk] * (n // NULL_CHUNK)
    if n % NULL_CHUNK or not pieces:
        pieces.append(chunk.slice(0, n % NULL_CHUNK))
    return pa.chunked_array(pieces, kind)


def share_nulls(table: pa.Table) -> pa.Table:
    """``table`` with every all-null column replaced by shared nulls (no copy of the others)."""
    n = table.num_rows
    for i, column in enumerate(table.columns):
        if n and column.null_count == n and not _is_shared(column):
            table = table.set_column(i, table.schema.field(i), nulls(column.type, n))
    return table


def _is_shared(column: pa.ChunkedArray) -> bool:
    chunk = _shared.get(column.type)
    if chunk is None or column.num_chunks == 0:
        return False
    first = column.chunk(0)
    return first.buffers()[0] is not None and first.buffers()[0].address == chunk.buffers()[0].address


def lower_bound(values: pa.ChunkedArray | pa.Array, key: str, lo: int = 0) -> int:
    """The first row at or after ``lo`` whose value is not below ``key``, in a
    column sorted ascending (binary search: log2(n) lookups).

    Python compares str by code point, Arrow sorts UTF-8 bytes: the same order.
    """
    hi = len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid].as_py() < key:
            lo = mid + 1
        else:
            hi = mid
    return lo
