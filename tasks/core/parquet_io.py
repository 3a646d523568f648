"""Reading and writing Parquet on any fsspec filesystem.

Manifests and index files are small Parquet files that must be written
write-once and read fast, often many at a time. Local paths go straight to
pyarrow's native filesystem (multi-threaded, no Python in the read path);
other filesystems are wrapped with ``FSSpecHandler`` so pyarrow can issue its
own range reads (footer first, then only the column chunks asked for).
"""

from __future__ import annotations

import io
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage


def arrow_filesystem(fs) -> pafs.FileSystem:
    if storage.is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def table_to_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


def write_table_once(fs, path: str, table: pa.Table) -> bool:
    return storage.write_once(fs, path, table_to_bytes(table))


def read_table(fs, path: str, columns: Sequence[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns, filesystem=arrow_filesystem(fs))


def read_tables(fs, paths: Iterable[str], schema: pa.Schema,
                columns: Sequence[str] | None = None) -> pa.Table:
    """Read many Parquet files with one dataset scan (parallel, column-pruned)."""
    paths = list(paths)
    if not paths:
        cols = columns or schema.names
        return schema.empty_table().select(cols)
    dataset = ds.dataset(paths, schema=schema, format="parquet", filesystem=arrow_filesystem(fs))
    return dataset.to_table(columns=list(columns) if columns else None)


def read_key_value_metadata(fs, path: str) -> dict[bytes, bytes]:
    """Footer metadata only: no row is read."""
    if storage.is_local(fs):
        return pq.read_schema(path).metadata or {}
    with fs.open(path, "rb") as f:
        return pq.read_schema(f).metadata or {}
