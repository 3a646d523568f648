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


def cut_ranges(sizes, max_files: int, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` ranges over ``sizes``, each with at most
    ``max_files`` entries and about ``max_bytes`` (a single bigger entry gets a
    range of its own). Used to cut a work list into batch task runs."""
    ranges: list[tuple[int, int]] = []
    start, count, total = 0, 0, 0
    for i, size in enumerate(sizes):
        size = int(size)
        if count and (count >= max_files or total + size > max_bytes):
            ranges.append((start, i))
            start, count, total = i, 0, 0
        count += 1
        total += size
    if count:
        ranges.append((start, len(sizes)))
    return ranges


def write_parts(folder: str, prefix: str, table: pa.Table, ranges: list[tuple[int, int]]) -> None:
    for number, (start, end) in enumerate(ranges):
        pq.write_table(table.slice(start, end - start), part_path(folder, prefix, number), compression="none")


def read_part(folder: str, prefix: str, number: int, columns=None) -> pa.Table:
    return pq.ParquetFile(part_path(folder, prefix, number)).read(columns=columns)


def write(folder: str, name: str, table: pa.Table) -> None:
    pq.write_table(table, os.path.join(folder, f"{name}.parquet"), compression="none")


def read(folder: str, name: str, columns=None) -> pa.Table:
    return pq.ParquetFile(os.path.join(folder, f"{name}.parquet")).read(columns=columns)
