"""The local scratch folder a flow run shares between its tasks.

Task parameters stay small (Prefect records them): a planning task writes the
work list here as Parquet, one file per batch, and each batch task reads only
its own file. The folder lives on the machine running the flow (thread pool);
it is removed when the run commits.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq


def part_path(folder: str, prefix: str, number: int) -> str:
    return os.path.join(folder, f"{prefix}-{number:05d}.parquet")


def write_parts(folder: str, prefix: str, table: pa.Table, ranges: list[tuple[int, int]]) -> None:
    for number, (start, end) in enumerate(ranges):
        pq.write_table(table.slice(start, end - start), part_path(folder, prefix, number), compression="none")


def read_part(folder: str, prefix: str, number: int, columns=None) -> pa.Table:
    return pq.ParquetFile(part_path(folder, prefix, number)).read(columns=columns)


def write(folder: str, name: str, table: pa.Table) -> None:
    pq.write_table(table, os.path.join(folder, f"{name}.parquet"), compression="none")


def read(folder: str, name: str, columns=None) -> pa.Table:
    return pq.ParquetFile(os.path.join(folder, f"{name}.parquet")).read(columns=columns)
