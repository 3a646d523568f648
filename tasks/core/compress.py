"""Blob compression for repository format 2: one zstd frame per data blob.

ARCHITECTURE.md, "Repository format 2 (specification)", "Compression", is the
definition. ``compress`` picks the level from the mode, compresses with a
fresh compressor (the module-level function) and keeps the result only when
it saves at least 1/32 of the input, else the input is stored raw; the
caller records which in the blob's header and index row, with the raw
length. ``decompress`` takes that raw length as the truth: it never sizes
anything from the frame's own content-size field, stops after ``raw_length
+ 1`` bytes of output, and reports any other length, a damaged frame or
bytes after the frame as ``CorruptBlob``.

Frames are written with zstd's content checksum (XXH64 of the plaintext, 4
bytes per frame), so a damaged payload is caught by zstd itself even where
no AEAD tag or blob id check runs first; any RFC 8878 reader accepts frames
with or without it.

The zstd binding is the Python 3.14 ``compression.zstd`` API: the standard
library on 3.14+, ``backports.zstd`` before. Both release the GIL while they
compress and decompress. Every function is safe to call from several threads
at once: a compressor is kept per thread and level (making one costs ~80 µs,
nine times the compression of a 4 KiB file; measured in bench/RESULTS.md,
"Format 2 against restic"), and ends every frame it starts within one call
(``FLUSH_FRAME``), so the frames are those of the one-shot ``zstd.compress``
byte for byte. A decompressor reads exactly one frame, so one is made per call.
"""

from __future__ import annotations

import sys
import threading
from typing import TypeAlias

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

# What the blob functions take and give: bytes, or a view of them (no copies).
BytesLike: TypeAlias = "bytes | bytearray | memoryview"

MODES = ("auto", "off", "fastest", "max")
LEVELS = {"fastest": 1, "auto": 3, "max": 9}     # the repository config's default "zstd_levels"

_LEVEL = zstd.CompressionParameter.compression_level
_CHECKSUM = zstd.CompressionParameter.checksum_flag
_FLUSH_FRAME = zstd.ZstdCompressor.FLUSH_FRAME
_local = threading.local()          # .compressors: {level: ZstdCompressor}, one set per thread


def _compressor(level: int):
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstd.ZstdCompressor(options={_LEVEL: level, _CHECKSUM: 1})
    return c


class CorruptBlob(ValueError):
    """A compressed payload that does not decompress to exactly its recorded raw length."""


def level_for(mode: str, levels: dict | None = None) -> int | None:
    """The zstd level of ``mode`` (``None`` for ``off``), from ``levels`` (the config's ``zstd_levels``)."""
    if mode not in MODES:
        raise ValueError(f"unknown compression mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "off":
        return None
    table = LEVELS if levels is None else levels
    try:
        return int(table[mode])
    except KeyError:
        raise ValueError(f"no zstd level for compression mode {mode!r} in {table!r}") from None


def compress(data: BytesLike, mode: str, levels: dict | None = None) -> tuple[BytesLike, bool]:
    """``(payload, compressed)`` for one blob's plaintext ``data`` (any bytes-like object).

    ``compressed`` is True when ``payload`` is one zstd frame, which happens
    only when it is at most ``len(data) - len(data) // 32`` bytes; otherwise
    ``payload`` is ``data`` itself (not copied). Mode ``off`` and empty
    input are always stored raw.
    """
    level = level_for(mode, levels)
    raw_length = memoryview(data).nbytes
    if level is None or raw_length == 0:
        return data, False
    c = _compressor(level)
    try:
        z = c.compress(data, mode=_FLUSH_FRAME)
    except BaseException:
        _local.compressors.pop(level, None)     # it may be left inside a frame: never reuse it
        raise
    if len(z) <= raw_length - raw_length // 32:
        return z, True
    return data, False


def decompress(payload: BytesLike, raw_length: int) -> bytes:
    """The plaintext of one compressed blob: exactly ``raw_length`` bytes, or ``CorruptBlob``.

    ``payload`` must be exactly one zstd frame (nothing after it). At most
    ``raw_length + 1`` bytes are ever produced, whatever the frame claims.
    """
    if not isinstance(raw_length, int) or raw_length < 0:
        raise ValueError(f"raw_length must be a non-negative int, got {raw_length!r}")
    d = zstd.ZstdDecompressor()              # one per call: a decompressor is never shared
    try:
        out = d.decompress(payload, max_length=raw_length + 1)
    except zstd.ZstdError as exc:
        raise CorruptBlob(f"bad zstd frame: {exc}") from None
    if len(out) != raw_length:
        raise CorruptBlob(f"decompressed to {len(out)}{'+' if len(out) > raw_length else ''} bytes, "
                          f"expected {raw_length}")
    if not d.eof:
        raise CorruptBlob("the zstd frame is truncated or longer than the recorded raw length")
    if d.unused_data:
        raise CorruptBlob(f"{len(d.unused_data)} bytes after the zstd frame")
    return out
