"""Spooled temporary copies of repository files that are too large to hold twice in memory.

A format 2 manifest or merged index file (tens of MiB at 1M files) is read by
copying it block by block into a spooled temporary file (memory up to
``SPOOL_BYTES``, then an unlinked local file) while its BLAKE3 is computed,
and decrypted block by block into a second one, given out only after the tag
verified. Each file kind keeps its own layout (where the tag and salt are)
and its own error; this module only moves the bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import blake3

if TYPE_CHECKING:               # crypto (cryptography) is imported by the functions that need it
    from .crypto import Subkeys

SPOOL_BYTES = 16 * 1024 * 1024
BLOCK_BYTES = 4 * 1024 * 1024      # what one pass over a spooled file reads at a time


def blocks(f: Any, size: int = 0) -> Iterator[bytes]:
    """``f`` read from where it is, ``size`` bytes (default ``BLOCK_BYTES``) at a time."""
    while block := f.read(size or BLOCK_BYTES):
        yield block


def hashed_copy(fs: Any, path: str) -> tuple[Any, str]:
    """``(spooled copy of the file at path, positioned at its end; BLAKE3 hex of its bytes)``;
    the caller closes the copy."""
    raw = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (the caller's)
    try:
        digest = blake3.blake3()
        with fs.open(path, "rb") as f:
            for block in blocks(f):
                digest.update(block)
                raw.write(block)
    except BaseException:
        raw.close()
        raise
    return raw, digest.hexdigest()


def decrypted(keys: Subkeys, magic: bytes, salt: bytes, raw: Any, length: int, tag: bytes) -> Any:
    """The plaintext of ``AEAD(K_f, N(0), ...)`` whose ciphertext is the first ``length`` bytes
    of ``raw``, in a spooled file at 0, given only once ``tag`` verified
    (crypto.AuthenticationFailed otherwise); the caller closes it."""
    from . import crypto

    dec = crypto.stream_decryptor(keys, magic, salt, 0)
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (the caller's)
    try:
        raw.seek(0)
        left = length
        while left:
            block = raw.read(min(BLOCK_BYTES, left))
            left -= len(block)
            out.write(dec.update(block))
        out.write(crypto.finish_decrypt(dec, tag))
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out
