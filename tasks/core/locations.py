"""Where each indexed blob lives, held compactly for a restore's plan.

A restore looks every file of a snapshot up in the index. Loading the index
as a table with hex ids and pack keys and hash-joining the whole manifest
with it cost ~1.6 GiB at 1M files (6 GiB at 5M). Here the index is held as
numpy columns sorted by the 32-byte binary id (first location of a repeated
id wins, as ``index.unique_hashes``): id 32 bytes, pack number 4, offset 8,
length 8, and for format 2 kind 1, seq 4, raw length 8, compressed 1: 52-66
bytes per blob, with each pack's name (and salt) held once. ``locate`` answers
for one slice of the manifest at a time (``np.searchsorted`` on the ids'
first 8 bytes, then checked whole), so the plan is built a row group at a
time (restore_plan.py).

Ids that are not canonical (64 lowercase hex digits; tests and old format 1
repositories hold a few) are kept apart in a small table and looked up there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import ids, memory
from . import index as indexmod
from .known_blobs import _is_canonical
from .repository import Repository

DIGEST = 32


class BlobLocations:
    """The index of ``repo`` as it is now, for lookups by hex id (see the module docstring)."""

    def __init__(self, repo: Repository) -> None:
        self.version = repo.version
        parts: list[dict[str, np.ndarray]] = []
        odd_parts: list[pa.Table] = []
        pack_numbers: dict[object, int] = {}
        packs: list[object] = []            # format 2: binary pack names; format 1: keys
        salts: list[bytes] = []
        for attempt in range(3):
            names = indexmod.list_index_names(repo)
            try:
                for name in names:
                    tables = (indexmod.iter_stored(repo, name) if repo.version >= 2
                              else [indexmod.read_index_files(repo, [name])])
                    for table in tables:
                        part, odd = self._columns(table, pack_numbers, packs, salts)
                        parts.append(part)
                        if odd is not None:
                            odd_parts.append(odd)
                        del table
                break
            except FileNotFoundError:       # a run merged its batch files between our listing and reading
                if attempt == 2:
                    raise
                parts, odd_parts, pack_numbers, packs, salts = [], [], {}, [], []
        columns: dict[str, np.ndarray] = {}
        for name, dtype in self._dtypes().items():    # a column at a time, its parts freed as it is joined
            pieces = [p.pop(name) for p in parts]
            columns[name] = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
            del pieces
        del parts
        # Sorted by id, first location of each id kept (stable sort: index order decides).
        order = np.argsort(columns["id"], kind="stable")
        for name in columns:
            columns[name] = columns[name][order]          # one column copied at a time
        del order
        digests = columns["id"]
        keep = np.ones(len(digests), dtype=bool)
        if len(digests) > 1:
            np.not_equal(digests[1:], digests[:-1], out=keep[1:])
        if not keep.all():
            for name in columns:
                columns[name] = columns[name][keep]
        self._cols = columns
        digests = columns["id"]
        self._keys8 = np.ascontiguousarray(digests.view(">u8").reshape(-1, 4)[:, 0]).astype(np.uint64) \
            if len(digests) else np.zeros(0, np.uint64)
        if repo.version >= 2:
            self._pack_names = pa.array(packs, ids.BINARY_ID)
            self._salts = pa.array(salts, pa.binary(32))
        else:
            self._pack_names = pa.array(packs, pa.string())
        odd = pa.concat_tables(odd_parts) if odd_parts else None
        self._odd = indexmod.unique_hashes(odd) if odd is not None and odd.num_rows else None
        memory.release()            # the index files' tables it was made from

    def __len__(self) -> int:
        return len(self._cols["id"]) + (self._odd.num_rows if self._odd is not None else 0)

    def _dtypes(self) -> dict[str, Any]:
        base = {"id": "S32", "pack": np.int32, "offset": np.int64, "length": np.int64}
        if self.version >= 2:
            base.update({"kind": np.int8, "seq": np.int32, "raw_length": np.int64, "compressed": np.bool_})
        return base

    def _columns(self, table: pa.Table, numbers: dict, packs: list, salts: list):
        """One index file's rows as numpy columns (and its non-canonical rows, format 1)."""
        odd = None
        if self.version >= 2:
            digest_col, pack_col = table["id"].combine_chunks(), table["pack"].combine_chunks()
        else:
            hashes = table["hash"].combine_chunks()
            canonical = pc.fill_null(pc.match_substring_regex(hashes, "^[0-9a-f]{64}$"), False)
            if not pc.all(canonical).as_py():
                odd = table.filter(pc.invert(canonical))
                table = table.filter(canonical)
                hashes = table["hash"].combine_chunks()
            digest_col, pack_col = ids.hex_to_binary(hashes), table["key"].combine_chunks()
        unique = pc.unique(pack_col)
        where = pc.index_in(pack_col, value_set=unique).to_numpy(zero_copy_only=False)
        new = [k for k, value in enumerate(unique.to_pylist()) if value not in numbers]
        if new and self.version >= 2:      # a pack's salt is the same on every row of it: take its first row's
            first = np.full(len(unique), -1, dtype=np.int64)
            first[where[::-1]] = np.arange(len(where) - 1, -1, -1)
            salt_of = table["salt"].take(pa.array(first[new])).to_pylist()
        for j, k in enumerate(new):
            value = unique[k].as_py()
            numbers[value] = len(packs)
            packs.append(value)
            if self.version >= 2:
                salts.append(salt_of[j])
        local = np.array([numbers[v] for v in unique.to_pylist()], dtype=np.int32)
        n = len(digest_col)
        out = {"id": _s32(digest_col),
               "pack": local[where] if n else np.zeros(0, np.int32),
               "offset": table["offset"].to_numpy().astype(np.int64),
               "length": table["length"].to_numpy().astype(np.int64)}
        if self.version >= 2:
            out.update({"kind": table["type"].to_numpy().astype(np.int8),
                        "seq": table["seq"].to_numpy().astype(np.int32),
                        "raw_length": table["raw_length"].to_numpy().astype(np.int64),
                        "compressed": table["compressed"].to_numpy(zero_copy_only=False).astype(np.bool_)})
        return out, odd

    def locate(self, hashes: pa.Array | pa.ChunkedArray) -> pa.Table:
        """The location columns of each of ``hashes`` (hex; null or unknown: null
        ``key``): ``key, offset, length`` and, format 2, ``kind, seq, salt,
        raw_length, compressed``, in the order given."""
        hashes = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
        n = len(hashes)
        wanted, canonical = _digests(hashes)
        digests = self._cols["id"]
        m = len(digests)
        if m and n:
            keys8 = np.ascontiguousarray(wanted.view(">u8").reshape(-1, 4)[:, 0]).astype(np.uint64)
            pos = np.minimum(np.searchsorted(self._keys8, keys8, side="left"), m - 1)
            hit = (digests[pos] == wanted) & canonical
            # Digests sharing their first 8 bytes (rare): the first candidate may not be it.
            again = np.flatnonzero(~hit & canonical & (self._keys8[pos] == keys8))
            if len(again):
                exact = np.minimum(np.searchsorted(digests, wanted[again]), m - 1)
                pos[again] = exact
                hit[again] = digests[exact] == wanted[again]
        else:
            pos, hit = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        absent = ~hit
        mask = pa.array(absent)
        cols = self._cols
        pack = pa.array(cols["pack"][pos] if m else np.zeros(n, np.int32))
        if self.version >= 2:
            key = ids.pack_keys_from_binary(self._pack_names.take(pack)) if len(self._pack_names) else \
                pa.nulls(n, pa.string())
        else:
            key = self._pack_names.take(pack) if len(self._pack_names) else pa.nulls(n, pa.string())

        def col(name: str, kind: pa.DataType) -> pa.Array:
            values = cols[name][pos] if m else np.zeros(n, cols[name].dtype)
            return pa.array(values, kind, mask=absent)

        out = {"key": pc.if_else(mask, pa.scalar(None, pa.string()), key) if n else pa.array([], pa.string()),
               "offset": col("offset", pa.int64()), "length": col("length", pa.int64())}
        if self.version >= 2:
            salt = self._salts.take(pack) if len(self._salts) else pa.nulls(n, pa.binary(32))
            out.update({"kind": col("kind", pa.int8()), "seq": col("seq", pa.int32()),
                        "salt": pc.if_else(mask, pa.scalar(None, pa.binary(32)), salt) if n else
                        pa.array([], pa.binary(32)),
                        "raw_length": col("raw_length", pa.int64()), "compressed": col("compressed", pa.bool_())})
        table = pa.table(out)
        if self._odd is not None and not canonical.all():
            table = self._with_odd(table, hashes, canonical)
        return table

    def _with_odd(self, table: pa.Table, hashes: pa.Array, canonical: np.ndarray) -> pa.Table:
        """Fill the rows of non-canonical ids from the small table of such index rows."""
        assert self._odd is not None
        where = pc.index_in(hashes, value_set=self._odd["hash"])
        found = pc.and_(pc.is_valid(where), pa.array(~canonical))
        if not pc.any(found).as_py():
            return table
        for name in ("key", "offset", "length"):
            values = self._odd[name].take(pc.fill_null(where, 0))
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pc.if_else(found, values, table[name]))
        return table


def _s32(binary: pa.Array) -> np.ndarray:
    """A ``fixed_size_binary(32)`` array (no nulls) as numpy ``S32``, copied out of Arrow."""
    n = len(binary)
    if not n:
        return np.zeros(0, "S32")
    data = binary.buffers()[1]
    return np.frombuffer(data, dtype="S32", count=n, offset=binary.offset * DIGEST).copy()


def _digests(hashes: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(S32 digests of ``hashes``, which of them are canonical ids); others get zeros."""
    n = len(hashes)
    if not n:
        return np.zeros(0, "S32"), np.zeros(0, dtype=bool)
    try:
        if hashes.null_count:
            raise ValueError("nulls")
        return _s32(ids.hex_to_binary(hashes)), np.ones(n, dtype=bool)
    except (ValueError, TypeError):
        pass
    out = np.zeros(n, "S32")
    canonical = np.zeros(n, dtype=bool)
    for i, h in enumerate(hashes.to_pylist()):
        d = _is_canonical(h) if h is not None else None
        if d is not None:
            out[i], canonical[i] = d, True
    return out, canonical
