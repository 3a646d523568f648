"""Blob ids between their two forms: 64-character hex strings (in memory, the CLI,
JSON) and 32-byte binaries (format 2's stored index and manifests).

Vectorised over Arrow buffers: one ``binascii`` call per array, never a Python
object per id.
"""

from __future__ import annotations

import binascii

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID_BYTES = 32
HEX_CHARS = 64
BINARY_ID = pa.binary(ID_BYTES)


def _one_chunk(arr):
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def hex_to_binary(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``fixed_size_binary(32)`` from an array of 64-character hex strings (nulls stay null)."""
    arr = _one_chunk(arr)
    n = len(arr)
    if n == 0:
        return pa.array([], BINARY_ID)
    valid = arr.is_valid()
    if arr.null_count:
        arr = pc.fill_null(arr, "0" * HEX_CHARS)
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    lengths = pc.utf8_length(arr)
    if pc.min(lengths).as_py() != HEX_CHARS or pc.max(lengths).as_py() != HEX_CHARS:
        raise ValueError("an id is not 64 hex characters")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = memoryview(arr.buffers()[2])[offsets[0]: offsets[-1]]
    raw = binascii.unhexlify(data)
    out = pa.FixedSizeBinaryArray.from_buffers(BINARY_ID, n, [None, pa.py_buffer(raw)])
    if not pc.all(valid).as_py():
        out = pc.if_else(valid, out, pa.scalar(None, BINARY_ID))
    return out


def binary_to_hex(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Hex strings from ``fixed_size_binary(32)`` (nulls stay null)."""
    arr = _one_chunk(arr)
    n = len(arr)
    if n == 0:
        return pa.array([], pa.string())
    valid = arr.is_valid() if arr.null_count else None
    data = memoryview(arr.buffers()[1])[arr.offset * ID_BYTES: (arr.offset + n) * ID_BYTES]
    text = binascii.hexlify(data)
    if n * HEX_CHARS < 2 ** 31:
        offsets: np.ndarray = np.arange(0, n * HEX_CHARS + 1, HEX_CHARS, dtype=np.int32)
        out = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
    else:
        offsets = np.arange(0, n * HEX_CHARS + 1, HEX_CHARS, dtype=np.int64)
        out = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text)).cast(pa.string())
    if valid is not None:
        out = pc.if_else(valid, out, pa.scalar(None, pa.string()))
    return out


def pack_keys_from_binary(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``packs/<ab>/<hex>`` keys from binary pack names."""
    hexes = binary_to_hex(arr)
    return pc.binary_join_element_wise("packs", pc.utf8_slice_codeunits(hexes, 0, 2), hexes, "/")


def pack_names_from_keys(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Binary pack names from ``packs/<ab>/<hex>`` keys."""
    return hex_to_binary(pc.utf8_slice_codeunits(_one_chunk(keys), len("packs/ab/")))
