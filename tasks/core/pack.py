"""The pack format: many small blobs in one stored object, and the trailer that lists them.

A pack (``packs/<ab>/<name>``) is, in this order::

    blob 0 | blob 1 | ... | blob n-1 | trailer | u64 trailer length (little-endian) | b"KFPACK01"

The trailer is compact JSON, ``[[hash, offset, length], ...]``, one entry per
blob in the order they were appended; offsets count from the start of the
pack. The pack's name is the BLAKE3 of all its bytes, trailer included.

Readers of backups never need the trailer: they find blobs through the index
(hash -> key, offset, length). The trailer exists so the index can be rebuilt
from the packs alone (``keepflow repair index``). Reading it costs two range
reads whatever the pack's size (restic reads its pack headers the same way):
the last 16 bytes (length and magic), then exactly the trailer before them.
Every entry is checked against the data area (``0 <= offset``, ``offset +
length <= size - 16 - trailer length``), so a damaged or foreign file is
reported as "not a pack", never turned into index rows that point outside it.

``PackWriter`` in store.py writes packs with ``encode_trailer``; this module
is the only one that knows the trailer's layout.
"""

from __future__ import annotations

import json
import re
import struct

from .errors import PackFormatError

PACK_MAGIC = b"KFPACK01"
_LENGTH = struct.Struct("<Q")
FOOTER_SIZE = _LENGTH.size + len(PACK_MAGIC)       # 16 bytes: trailer length, magic
_HASH = re.compile(r"[0-9a-f]{64}")


def encode_trailer(entries) -> bytes:
    """The bytes appended after the blobs: JSON trailer, its length, the magic."""
    trailer = json.dumps([list(e) for e in entries], separators=(",", ":")).encode()
    return trailer + _LENGTH.pack(len(trailer)) + PACK_MAGIC


def read_trailer(fs, path: str, size: int | None = None) -> list[tuple[str, int, int]]:
    """The ``(hash, offset, length)`` entries of the pack at ``path``, from its tail only.

    ``size`` saves a metadata request when the caller has it from a listing.
    Raises ``PackFormatError`` for a file that is not a well-formed pack.
    """
    if size is None:
        size = int(fs.size(path))
    if size < FOOTER_SIZE:
        raise PackFormatError(key=path, reason=f"{size} bytes, shorter than the {FOOTER_SIZE}-byte pack footer")
    footer = fs.cat_file(path, start=size - FOOTER_SIZE, end=size)
    length = _trailer_length(footer, size, path)
    trailer = fs.cat_file(path, start=size - FOOTER_SIZE - length, end=size - FOOTER_SIZE)
    return _entries(trailer, size - FOOTER_SIZE - length, path)


def trailer_from_bytes(data: bytes | memoryview, where: str) -> list[tuple[str, int, int]]:
    """The same as ``read_trailer`` for a pack already read whole (``where`` names it in errors)."""
    size = len(data)
    if size < FOOTER_SIZE:
        raise PackFormatError(key=where, reason=f"{size} bytes, shorter than the {FOOTER_SIZE}-byte pack footer")
    length = _trailer_length(bytes(data[size - FOOTER_SIZE:]), size, where)
    start = size - FOOTER_SIZE - length
    return _entries(bytes(data[start: size - FOOTER_SIZE]), start, where)


def _trailer_length(footer: bytes, size: int, where: str) -> int:
    if len(footer) != FOOTER_SIZE:
        raise PackFormatError(key=where, reason=f"read {len(footer)} footer bytes, expected {FOOTER_SIZE}")
    if footer[_LENGTH.size:] != PACK_MAGIC:
        raise PackFormatError(key=where, reason=f"it does not end with {PACK_MAGIC.decode()}")
    (length,) = _LENGTH.unpack(footer[:_LENGTH.size])
    if length < 2 or length > size - FOOTER_SIZE:   # "[]" is the shortest trailer
        raise PackFormatError(key=where, reason=f"trailer length {length} does not fit in {size} bytes")
    return length


def _entries(trailer: bytes, data_end: int, where: str) -> list[tuple[str, int, int]]:
    try:
        raw = json.loads(trailer)
    except ValueError as exc:   # UnicodeDecodeError is a ValueError too
        raise PackFormatError(key=where, reason=f"trailer is not JSON ({exc})") from None
    if not isinstance(raw, list):
        raise PackFormatError(key=where, reason="trailer is not a list of [hash, offset, length]")
    entries = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and _HASH.fullmatch(item[0]) and all(type(v) is int for v in item[1:])):
            raise PackFormatError(key=where, reason=f"trailer entry {str(item)[:100]} is not [hash, offset, length]")
        blob, offset, length = item
        if offset < 0 or length < 0 or offset + length > data_end:
            raise PackFormatError(key=where, reason=f"blob {blob[:16]} at {offset}+{length} lies outside the "
                                                    f"{data_end} data bytes")
        entries.append((blob, offset, length))
    return entries
