"""Format 2's list blobs: a chunked file's chunks, in file order (ARCHITECTURE.md, "List blobs").

One 36-byte entry per chunk: ``chunk id (32) || raw length (u32)``. The list
blob's id (keyed with ``K_list_id``) is the file's content id. ``read_lists``
reads the list blobs of some index rows (range reads; a thread pool on object
stores), authenticated and decoded, for restore, verify and prune.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from . import pack
from .errors import KeepflowError

if TYPE_CHECKING:
    from .repository import Repository

LIST_ENTRY = struct.Struct("<32sI")    # chunk id, raw length


def encode_list(chunks: list[tuple[str, int]]) -> bytes:
    return b"".join(LIST_ENTRY.pack(bytes.fromhex(cid), n) for cid, n in chunks)


def decode_list(data: bytes) -> list[tuple[str, int]]:
    """[(chunk id hex, raw length), ...]; ValueError when ``data`` is not a list blob."""
    if len(data) % LIST_ENTRY.size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {LIST_ENTRY.size}-byte entries")
    return [(cid.hex(), n) for cid, n in LIST_ENTRY.iter_unpack(data)]


def read_lists(repo: Repository, rows: pa.Table) -> list[list[tuple[str, int]] | None]:
    """The chunk lists of the index ``rows`` (hash, key, offset, length, type/kind, seq, salt,
    raw_length, compressed), in order; None for a list that cannot be read or opened."""
    kind = "kind" if "kind" in rows.column_names else "type"
    cols = {c: rows[c].to_pylist() for c in ("hash", "key", "offset", "length", "seq", "salt", "raw_length",
                                             "compressed")}
    cols["kind"] = rows[kind].to_pylist()

    def one(k):
        entry = pack.Entry2(cols["hash"][k], cols["kind"][k], cols["compressed"][k], cols["seq"][k],
                            cols["offset"][k], cols["length"][k], cols["raw_length"][k])
        try:
            stored = repo.fs.cat_file(repo.path(cols["key"][k]), start=entry.offset, end=entry.offset + entry.length)
            return decode_list(pack.open_blob2(repo.keys, cols["salt"][k], entry, stored))
        except (KeepflowError, OSError, ValueError):
            return None

    n = rows.num_rows
    if repo.is_local or n < 4:
        return [one(k) for k in range(n)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(n)))
