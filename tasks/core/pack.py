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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import BlobFormatError, PackFormatError

PACK_MAGIC = b"KFPACK01"
_LENGTH = struct.Struct("<Q")
FOOTER_SIZE = _LENGTH.size + len(PACK_MAGIC)       # 16 bytes: trailer length, magic
_HASH = re.compile(r"[0-9a-f]{64}")


def encode_trailer(entries: Iterable[tuple[str, int, int]]) -> bytes:
    """The bytes appended after the blobs: JSON trailer, its length, the magic."""
    trailer = json.dumps([list(e) for e in entries], separators=(",", ":")).encode()
    return trailer + _LENGTH.pack(len(trailer)) + PACK_MAGIC


def read_trailer(fs: AbstractFileSystem, path: str, size: int | None = None) -> list[tuple[str, int, int]]:
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


# -- format 2 ---------------------------------------------------------------------------------
#
#   EncBlob_0 || ... || EncBlob_{n-1} || EncHeader || salt (32) || u32 len(EncHeader) || "KFPACK02"
#
# EncBlob_i = AEAD(K_f, N(i), payload_i, "KFPACK02" || type_i || id_i); EncHeader =
# AEAD(K_f, N_LAST, header, "KFPACK02"); header = 41-byte entries (type u8, stored
# length u32, raw length u32, id 32), padded with 0xff entries to a multiple of
# header_pad. Unencrypted repositories: the same without tags, footer magic
# "KFPACKP2" and a zero salt. ARCHITECTURE.md, "### Packs", is the specification.

from dataclasses import dataclass  # noqa: E402  (format 2's half of the module)

from . import compress, crypto  # noqa: E402

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .compress import BytesLike

PACK2_MAGIC = crypto.PACK
PACK2_PLAIN_MAGIC = b"KFPACKP2"
_ENTRY2 = struct.Struct("<BII32s")
ENTRY2_SIZE = _ENTRY2.size                      # 41
_U32 = struct.Struct("<I")
FOOTER2_SIZE = crypto.SALT_SIZE + _U32.size + 8  # 44: salt, header length, magic
TYPE_DATA, TYPE_DATA_ZSTD, TYPE_LIST, TYPE_LIST_ZSTD, TYPE_PAD = 0x00, 0x01, 0x02, 0x03, 0xFF
KIND_DATA, KIND_LIST = 0, 1                      # the index's `type` column


def header_type(kind: int, compressed: bool) -> int:
    return (TYPE_LIST if kind == KIND_LIST else TYPE_DATA) | (1 if compressed else 0)


@dataclass
class Entry2:
    """One blob of a format 2 pack, as its header (and the index) describe it."""

    id: str                 # hex
    kind: int               # KIND_DATA or KIND_LIST
    compressed: bool
    seq: int                # its number in the pack: its nonce
    offset: int             # where its stored bytes start
    length: int             # stored length (payload + tag when encrypted)
    raw_length: int         # plaintext length after decompression


def blob_aad(htype: int, blob_id: bytes) -> bytes:
    return PACK2_MAGIC + bytes([htype]) + blob_id


def encode_pack2(keys: crypto.Subkeys, blobs: Sequence[tuple[str, int, BytesLike, bool, int]],
                 header_pad: int = 128) -> tuple[list[BytesLike], bytes, list[Entry2]]:
    """A format 2 pack from ``blobs`` [(id hex, kind, payload, compressed, raw_length), ...].

    Returns the pack's parts (to write concatenated, without joining them in
    memory twice), its salt and its entries. The salt is deterministic (a
    retried batch packing the same blobs writes the same bytes).
    """
    n = len(blobs)
    padded = -(-max(n, 1) // header_pad) * header_pad
    tag = crypto.TAG_SIZE if keys.encrypted else 0
    entries, header, offset = [], bytearray(), 0
    for seq, (hid, kind, payload, compressed, raw_length) in enumerate(blobs):
        stored = len(payload) + tag
        htype = header_type(kind, compressed)
        header += _ENTRY2.pack(htype, stored, raw_length, bytes.fromhex(hid))
        entries.append(Entry2(hid, kind, compressed, seq, offset, stored, raw_length))
        offset += stored
    header += _ENTRY2.pack(TYPE_PAD, 0, 0, bytes(32)) * (padded - n)
    if not keys.encrypted:
        salt = bytes(crypto.SALT_SIZE)
        parts = [p for (_, _, p, _, _) in blobs]
        parts += [bytes(header), salt + _U32.pack(len(header)) + PACK2_PLAIN_MAGIC]
        return parts, salt, entries
    salt = keys.deterministic_salt(PACK2_MAGIC, header, *(p for (_, _, p, _, _) in blobs))
    cipher = keys.cipher(PACK2_MAGIC, salt)
    parts = []
    for (hid, kind, payload, compressed, _), e in zip(blobs, entries, strict=True):
        aad = blob_aad(header_type(kind, compressed), bytes.fromhex(hid))
        parts.append(crypto.encrypt(cipher, e.seq, payload, aad))
    enc_header = cipher.encrypt(crypto.N_LAST, bytes(header), PACK2_MAGIC)
    parts += [enc_header, salt + _U32.pack(len(enc_header)) + PACK2_MAGIC]
    return parts, salt, entries


def read_header2(keys: crypto.Subkeys, fs: AbstractFileSystem, path: str,
                 size: int | None = None) -> tuple[bytes, list[Entry2]]:
    """(salt, entries) of the format 2 pack at ``path`` from its tail: two range reads."""
    if size is None:
        size = int(fs.size(path))
    if size < FOOTER2_SIZE:
        raise PackFormatError(key=path, reason=f"{size} bytes, shorter than the {FOOTER2_SIZE}-byte pack footer")
    footer = fs.cat_file(path, start=size - FOOTER2_SIZE, end=size)
    salt, hlen = _footer2(keys, footer, size, path)
    enc_header = fs.cat_file(path, start=size - FOOTER2_SIZE - hlen, end=size - FOOTER2_SIZE)
    return salt, _entries2(keys, salt, enc_header, size - FOOTER2_SIZE - hlen, path)


def header2_from_bytes(keys: crypto.Subkeys, data: bytes, where: str) -> tuple[bytes, list[Entry2]]:
    size = len(data)
    if size < FOOTER2_SIZE:
        raise PackFormatError(key=where, reason=f"{size} bytes, shorter than the {FOOTER2_SIZE}-byte pack footer")
    salt, hlen = _footer2(keys, bytes(data[size - FOOTER2_SIZE:]), size, where)
    start = size - FOOTER2_SIZE - hlen
    return salt, _entries2(keys, salt, bytes(data[start: size - FOOTER2_SIZE]), start, where)


def well_formed_footer2(footer: bytes, size: int) -> bool:
    """The footer check ``verify --ciphertext-only`` can make without a key."""
    if len(footer) != FOOTER2_SIZE or footer[-8:] not in (PACK2_MAGIC, PACK2_PLAIN_MAGIC):
        return False
    (hlen,) = _U32.unpack(footer[crypto.SALT_SIZE: crypto.SALT_SIZE + 4])
    tag = crypto.TAG_SIZE if footer[-8:] == PACK2_MAGIC else 0
    return hlen <= size - FOOTER2_SIZE and (hlen - tag) % ENTRY2_SIZE == 0 and hlen > tag


def _footer2(keys, footer: bytes, size: int, where: str) -> tuple[bytes, int]:
    magic = PACK2_MAGIC if keys.encrypted else PACK2_PLAIN_MAGIC
    if len(footer) != FOOTER2_SIZE:
        raise PackFormatError(key=where, reason=f"read {len(footer)} footer bytes, expected {FOOTER2_SIZE}")
    if footer[-8:] != magic:
        raise PackFormatError(key=where, reason=f"it does not end with {magic.decode()}")
    salt = footer[: crypto.SALT_SIZE]
    (hlen,) = _U32.unpack(footer[crypto.SALT_SIZE: crypto.SALT_SIZE + 4])
    tag = crypto.TAG_SIZE if keys.encrypted else 0
    if hlen > size - FOOTER2_SIZE or hlen <= tag or (hlen - tag) % ENTRY2_SIZE:
        raise PackFormatError(key=where, reason=f"header length {hlen} does not fit in {size} bytes")
    return salt, hlen


def _entries2(keys, salt: bytes, enc_header: bytes, data_end: int, where: str) -> list[Entry2]:
    if keys.encrypted:
        try:
            header = crypto.decrypt(keys.cipher(PACK2_MAGIC, salt), 0, enc_header, PACK2_MAGIC,
                                    nonce_bytes=crypto.N_LAST)
        except crypto.AuthenticationFailed:
            raise PackFormatError(key=where, reason="its header does not authenticate (damaged, or not this "
                                                    "repository's)") from None
    else:
        header = enc_header
    entries, offset, padding = [], 0, False
    for seq in range(len(header) // ENTRY2_SIZE):
        htype, stored, raw_length, bid = _ENTRY2.unpack_from(header, seq * ENTRY2_SIZE)
        if htype == TYPE_PAD:
            padding = True
            continue
        if padding or htype not in (TYPE_DATA, TYPE_DATA_ZSTD, TYPE_LIST, TYPE_LIST_ZSTD):
            raise PackFormatError(key=where, reason=f"header entry {seq} has type {htype:#x}")
        entries.append(Entry2(bid.hex(), KIND_LIST if htype & TYPE_LIST else KIND_DATA, bool(htype & 1), seq,
                              offset, stored, raw_length))
        offset += stored
    if offset != data_end:
        raise PackFormatError(key=where, reason=f"its header's lengths add up to {offset}, not the {data_end} "
                                                "data bytes")
    return entries


def open_blob2(keys: crypto.Subkeys, salt: bytes, entry: Entry2, stored: bytes | memoryview) -> bytes:
    """A blob's plaintext from its stored bytes, authenticated, decompressed and its id checked.

    Raises ``PackFormatError`` (a subclass of KeepflowError) naming the blob for anything wrong.
    """
    if len(stored) != entry.length:
        raise BlobFormatError(key=f"blob {entry.id[:16]}", reason=f"read {len(stored)} of its {entry.length} bytes")
    if keys.encrypted:
        try:
            # a memoryview is read in place (crypto.decrypt): no copy of the stored bytes
            payload: bytes | memoryview = crypto.decrypt(
                keys.cipher(PACK2_MAGIC, salt), entry.seq, stored,
                blob_aad(header_type(entry.kind, entry.compressed), bytes.fromhex(entry.id)))
        except crypto.AuthenticationFailed:
            raise BlobFormatError(key=f"blob {entry.id[:16]}", reason="does not authenticate") from None
    else:
        payload = stored
    if entry.compressed:
        try:
            plain = compress.decompress(payload, entry.raw_length)
        except ValueError as exc:
            raise BlobFormatError(key=f"blob {entry.id[:16]}", reason=f"does not decompress ({exc})") from None
    else:
        plain = bytes(payload) if isinstance(payload, memoryview) else payload
        if len(plain) != entry.raw_length:
            raise BlobFormatError(key=f"blob {entry.id[:16]}",
                                  reason=f"{len(plain)} bytes, expected {entry.raw_length}")
    expected = keys.list_id(plain) if entry.kind == KIND_LIST else keys.blob_id(plain)
    if expected != entry.id:
        raise BlobFormatError(key=f"blob {entry.id[:16]}", reason="its content does not match its id")
    return plain
