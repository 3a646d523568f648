"""The set of blob ids a backup run already has: the index plus this run's writes.

``KnownBlobs`` is shared by the batches of one run in one process; the
per-process cache ``known_blobs(repo, run_id)`` loads it from the index once
per run and process (a Dask worker runs many batches of one run).

How it stays small. Blob ids are BLAKE3-256 digests written as 64 hex
characters. A Python set of 1M such strings costs about 147 MB (a 113-byte
str object plus a set slot each); here the index's ids are held as one sorted
``bytes`` object of 32-byte binary digests (32 MB per million, seen by numpy
as an ``S32`` array for the bulk work) plus a directory: for the top ``bits``
bits of a digest, the position of the first digest with that prefix, so a
bucket holds 2-4 digests on average (1-2 bytes per blob). One lookup is
``bytes.fromhex``, two directory reads and one ``bytes.find`` within the
bucket: 0.8-1.2 µs per lookup in 1M ids on the shared 2-core machine
(mostly cache misses in the 32 MB), against 0.35-0.45 µs for the set of
strings and 2.3-3.7 µs for a scalar ``np.searchsorted``; 1M lookups of a
first backup cost well under a second more than the set did. Bulk questions (which of these
million hashes are known?) are answered vectorised: hex columns from Arrow
are decoded with one ``binascii.unhexlify`` over their string buffer, then
compared by the digests' first 8 bytes (``searchsorted`` on uint64) and
checked whole.

Hashes this run adds go to a small Python set first; once it holds more than
an eighth of the sorted part (at least 65,536), it is folded in (a stable
sort of two sorted runs is a merge: 0.14 s for 1.1M). So a first backup of
1M files never holds more than ~65k-125k id strings. Strings that are not
canonical ids (64 lowercase hex digits; tests use others) live in their own
set, so the answers are exactly those of a plain set of strings.

Lookups in the common case take no lock: the sorted part is replaced as one
immutable object, and readers look at the run's set before the sorted part
while a fold publishes the new sorted part before it empties the run's set,
so a hash is never missing in between.
"""

from __future__ import annotations

import array
import binascii
import mmap
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import memory

if TYPE_CHECKING:
    from .repository import Repository
    from .store import PackWriter

DIGEST = 32
HEX = 2 * DIGEST
# Fold the run's additions into the sorted part once they exceed
# max(FOLD_MIN, len(sorted) // FOLD_DIVISOR).
FOLD_MIN = 65_536
FOLD_DIVISOR = 8
# A set smaller than this is not worth a shared file (1 MiB of digests).
SHARE_MIN = 32_768
# Bulk questions are answered this many hashes at a time (bounded temporaries).
BULK_CHUNK = 262_144


def _is_canonical(h: str) -> bytes | None:
    """The 32-byte digest of a canonical id (64 lowercase hex digits), else None."""
    if len(h) != HEX:
        return None
    try:
        d = bytes.fromhex(h)
    except ValueError:
        return None
    # fromhex also takes upper case and spaces: only the exact lowercase form is an id here.
    return d if len(d) == DIGEST and d.hex() == h else None


class _Sorted:
    """Sorted, unique 32-byte digests and their prefix directory (immutable once built)."""

    __slots__ = ("raw", "digests", "directory", "shift")

    def __init__(self, raw: bytearray | mmap.mmap) -> None:
        # ``raw``: sorted, unique 32-byte digests, concatenated (``_sorted_buffer``), or a read-only
        # map of a file of them (``share``); kept as it is, its ``find`` serves the scalar lookups.
        self.raw = raw
        self.digests = np.frombuffer(raw, dtype="S32") if raw else np.zeros(0, "S32")
        n = len(self.digests)
        bits = max(0, min(24, n.bit_length() - 2))     # 2-4 digests per bucket on average
        self.shift = 32 - bits
        if bits:
            prefixes = np.frombuffer(raw, dtype=">u4")[::DIGEST // 4].astype(np.int64) >> self.shift
            bounds = np.searchsorted(prefixes, np.arange((1 << bits) + 1, dtype=np.int64), side="left")
        else:
            bounds = np.array([0, n], dtype=np.int64)
        wide = n >= 2**32
        self.directory = array.array("Q" if wide else "I")
        self.directory.frombytes(bounds.astype(np.uint64 if wide else np.uint32).tobytes())

    def __len__(self) -> int:
        return len(self.digests)

    def has(self, d: bytes) -> bool:
        p = int.from_bytes(d[:4], "big") >> self.shift
        lo, hi = self.directory[p] * DIGEST, self.directory[p + 1] * DIGEST
        pos = self.raw.find(d, lo, hi)
        while pos != -1 and pos % DIGEST:            # a match across two digests: look further
            pos = self.raw.find(d, pos + 1, hi)
        return pos != -1

    def has_many(self, digests: np.ndarray) -> np.ndarray:
        """A bool per digest (dtype S32) of ``digests``."""
        n = len(self.digests)
        if n == 0 or len(digests) == 0:
            return np.zeros(len(digests), dtype=bool)
        keys = np.ascontiguousarray(self.digests.view(">u8").reshape(n, 4)[:, 0]).astype(np.uint64)
        wanted = np.ascontiguousarray(digests).view(">u8").reshape(len(digests), 4)[:, 0].astype(np.uint64)
        pos = np.minimum(np.searchsorted(keys, wanted, side="left"), n - 1)
        hit = self.digests[pos] == digests
        # Different digests sharing their first 8 bytes (about n^2 / 2^65: rare even
        # at 100M blobs): the first candidate was not the one; search those exactly.
        again = np.flatnonzero(~hit & (keys[pos] == wanted))
        if len(again):
            exact = np.minimum(np.searchsorted(self.digests, digests[again]), n - 1)
            hit[again] = self.digests[exact] == digests[again]
        return hit


def _digests_of(values) -> tuple[bytearray, set[str]]:
    """(32-byte digests of the canonical ids in ``values``, concatenated; the other strings).

    ``values``: an Arrow array or chunked array, of hex strings (decoded
    vectorised) or of ``fixed_size_binary(32)`` ids (format 2's stored index:
    copied as they are), straight into one buffer (no copy per chunk); or any
    iterable of str.
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        out, odd, at = bytearray(DIGEST * sum(len(c) for c in chunks)), set(), 0
        for chunk in chunks:
            if pa.types.is_fixed_size_binary(chunk.type) and chunk.type.byte_width == DIGEST:
                at = _copy_into(chunk, out, at)
                continue
            at, others = _decode_into(chunk, out, at)
            odd |= others
        del out[at:]
        return out, odd
    out, odd = bytearray(), set()
    for h in values:
        d = _is_canonical(h)
        if d is None:
            odd.add(h)
        else:
            out += d
    return out, odd


def _copy_into(chunk: pa.Array, out: bytearray, at: int) -> int:
    """Write the binary ids of one ``fixed_size_binary(32)`` array into ``out`` at byte
    ``at`` (nulls left out); returns the end in ``out``."""
    if chunk.null_count:
        chunk = chunk.drop_null()
    n = len(chunk)
    if n:
        data = chunk.buffers()[1]
        out[at:at + DIGEST * n] = memoryview(data)[chunk.offset * DIGEST:(chunk.offset + n) * DIGEST]
    return at + DIGEST * n


def _decode_chunk(chunk: pa.Array) -> tuple[np.ndarray, set[str]]:
    """One Arrow string array of hex ids to S32 digests (see ``_decode_into``)."""
    out = bytearray(DIGEST * len(chunk))
    at, odd = _decode_into(chunk, out, 0)
    del out[at:]
    return (np.frombuffer(out, dtype="S32") if out else np.zeros(0, "S32")), odd


def _decode_into(chunk: pa.Array, out: bytearray, at: int) -> tuple[int, set[str]]:
    """Write the digests of one Arrow string array of hex ids into ``out`` at byte ``at``:
    one unhexlify over its string buffer. Returns (the end in ``out``, the strings that
    are not canonical ids)."""
    if pa.types.is_large_string(chunk.type) or pa.types.is_string_view(chunk.type):
        chunk = chunk.cast(pa.string())
    n = len(chunk)
    if n == 0:
        return at, set()
    if chunk.null_count == 0:
        lengths = pc.min_max(pc.binary_length(chunk))
        if lengths["min"].as_py() == HEX and lengths["max"].as_py() == HEX:
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=n + 1, offset=chunk.offset * 4)
            if _unhexlify_canonical(memoryview(chunk.buffers()[2])[offsets[0]:offsets[-1]], out, at):
                return at + DIGEST * n, set()
    # Some values are not canonical ids (nulls, other lengths, upper case): per row, rare.
    canonical = pc.fill_null(pc.match_substring_regex(chunk, "^[0-9a-f]{64}$"), False)
    good = chunk.filter(canonical)
    others = set(chunk.filter(pc.and_(pc.invert(canonical), pc.is_valid(chunk))).to_pylist())
    if len(good):
        at, _ = _decode_into(good, out, at)
    return at, others


def _unhexlify_canonical(text: memoryview, out: bytearray, at: int, step: int = 1 << 22) -> bool:
    """Decode lowercase hex ``text`` into ``out`` from byte ``at``; False (``out`` partly
    written) if it holds anything else.

    In 4 MiB steps (small temporaries). unhexlify also takes upper case, so
    each step must read back the same; the comparison is between ``bytes``:
    ``bytes == memoryview`` of an Arrow buffer (format 'b') compares element
    by element and took 49 s for the 1M ids of one no-change backup.
    """
    for start in range(0, len(text), step):
        piece = bytes(text[start:start + step])
        try:
            decoded = binascii.unhexlify(piece)
        except binascii.Error:
            return False
        if binascii.hexlify(decoded) != piece:
            return False
        out[at + start // 2:at + start // 2 + len(decoded)] = decoded
    return True


def _sorted_buffer(raw: bytearray) -> bytearray:
    """``raw`` (concatenated 32-byte digests) sorted and without repeats, in place:
    no second copy of the digests (a stable sort of two sorted runs, as a fold
    gives it, is a linear merge)."""
    n = len(raw) // DIGEST
    if n < 2:
        return raw
    digests = np.frombuffer(raw, dtype="S32")
    digests.sort(kind="stable")
    keep = np.empty(n, dtype=bool)
    keep[0] = True
    np.not_equal(digests[1:], digests[:-1], out=keep[1:])
    if keep.all():
        return raw
    unique = digests[keep].tobytes()            # repeats: only after duplicated index rows
    del digests
    return bytearray(unique)


class KnownBlobs:
    """The set of blob hashes already stored: the index plus this run's writes.

    Shared by the batches of one run in one process (threads). Two sets, both
    guarded by one lock:

    * ``stored``: in the index, or written by a batch of this run that has
      finished (its index file follows before the commit); held compactly
      (see the module docstring);
    * ``claims``: hash -> the pack writer that will hold it. A batch claims a
      hash before packing it, so a batch running at the same time that meets
      the same content (licences, empty ``__init__.py``: common in real trees)
      does not pack it a second time. When the claiming batch finishes, its
      claims become ``stored``; when it fails, ``release`` drops them so a
      retry (or another batch) stores the data again. Relying on a claim is
      safe: the flow commits only after every batch finished, and the commit
      guard (backup.commit) checks that every hash the manifest references is
      indexed.

    Duplicates that still happen (a retry of a batch whose first pack did land,
    two processes, large files hashed at the same moment) only cost space: the
    index keeps the first location of each hash.
    """

    def __init__(self, hashes: Iterable[str] | pa.Array | pa.ChunkedArray = ()) -> None:
        digests, odd = _digests_of(hashes)
        self._sorted = _Sorted(_sorted_buffer(digests))
        self._added: set[str] = set()      # canonical ids stored during the run, not folded yet
        self._odd: set[str] = odd          # anything else: kept as strings for ever
        self._claims: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added) + len(self._odd)

    def _has(self, blob_hash: str) -> bool:
        # The run's set first, the sorted part second: see the module docstring.
        if blob_hash in self._added or blob_hash in self._odd:
            return True
        d = _is_canonical(blob_hash)
        return d is not None and self._sorted.has(d)

    def contains(self, blob_hash: str) -> bool:
        return self._has(blob_hash)

    def contains_many(self, hashes: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
        """Vectorised ``contains`` over an Arrow string column (null -> False)."""
        if isinstance(hashes, pa.Array):
            hashes = pa.chunked_array([hashes])
        out = []
        sorted_part, extra = self._sorted, list(self._added | self._odd)
        for chunk in hashes.chunks:
            for start in range(0, len(chunk), BULK_CHUNK):
                piece = chunk.slice(start, BULK_CHUNK)
                hit = np.zeros(len(piece), dtype=bool)
                canonical = pc.fill_null(pc.equal(pc.binary_length(piece), HEX), False)
                rows = np.flatnonzero(canonical.to_numpy(zero_copy_only=False))
                if len(rows):
                    digests, odd = _decode_chunk(piece.take(pa.array(rows)))
                    if not odd:
                        hit[rows] = sorted_part.has_many(digests)
                    else:                       # 64 characters but not lowercase hex: per row
                        hit[rows] = [self._sorted_has_str(h) for h in piece.take(pa.array(rows)).to_pylist()]
                if extra:
                    hit |= pc.fill_null(pc.is_in(piece, value_set=pa.array(extra, pa.string())),
                                        False).to_numpy(zero_copy_only=False)
                out.append(pa.array(hit))
        return pa.chunked_array(out, pa.bool_())

    def _sorted_has_str(self, h: str) -> bool:
        d = _is_canonical(h)
        return d is not None and self._sorted.has(d)

    def contains_or_claim(self, blob_hash: str, packer: PackWriter) -> bool:
        """True when the blob is stored or claimed by any batch; else claim it for ``packer``."""
        if self._has(blob_hash):             # the common case needs no lock
            return True
        with self._lock:
            if self._has(blob_hash) or blob_hash in self._claims:
                return True
            self._claims[blob_hash] = id(packer)
        packer.claimed.add(blob_hash)
        return False

    def add(self, hashes: Iterable[str] | pa.Array | pa.ChunkedArray) -> None:
        with self._lock:
            self._add_locked(hashes)

    def _add_locked(self, hashes) -> None:
        for h in hashes:
            if h in self._added or h in self._odd:
                continue
            d = _is_canonical(h)
            if d is None:
                self._odd.add(h)
            elif not self._sorted.has(d):
                self._added.add(h)
        if len(self._added) > max(FOLD_MIN, len(self._sorted) // FOLD_DIVISOR):
            self._fold()

    def _fold(self) -> None:
        """Move the run's additions into the sorted part (under the lock)."""
        new, _ = _digests_of(self._added)
        np.frombuffer(new, dtype="S32").sort()
        self._sorted = _Sorted(_sorted_buffer(_joined(self._sorted.raw, new)))     # published first ...
        self._added = set()                                 # ... then the run's set goes

    def settle(self, packer: PackWriter, stored: bool) -> None:
        """The batch of ``packer`` ended: its claims become stored, or are released."""
        with self._lock:
            for blob_hash in packer.claimed:
                if self._claims.get(blob_hash) == id(packer):
                    del self._claims[blob_hash]
            if stored:
                self._add_locked(packer.claimed)
        packer.claimed = set()


def _joined(raw: bytearray | mmap.mmap, new: bytearray) -> bytearray:
    """``raw`` (a bytearray, or a shared read-only mmap) followed by ``new``, in a new bytearray."""
    out = bytearray(len(raw) + len(new))
    out[:len(raw)] = raw
    out[len(raw):] = new
    return out


# -- one copy for the processes of a run ---------------------------------------------------------
#
# A run's batch processes (batch_processes.py) each need the known-blob set; each loading it from the
# index would hold its own copy (32 bytes per blob: 160 MB each for 5M blobs, on top of the flow
# process's). Instead the plan writes the sorted digests the flow process loaded once to a local
# file of the run folder, and every process of the run maps that file read-only: the page cache
# holds one copy, shared by all of them (bench/RESULTS.md, "One known-blob set per run").

def share(known: KnownBlobs, path: str) -> bool:
    """Write ``known``'s sorted digests to the new local file ``path`` and map them back in place
    of ``known``'s own copy; False (nothing written) when there is nothing worth sharing."""
    with known._lock:
        if known._odd or known._added or len(known._sorted) < SHARE_MIN:
            return False
        raw = known._sorted.raw
        with open(path, "xb") as f:
            f.write(raw)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(mapped) != len(raw) or mapped[-DIGEST:] != raw[-DIGEST:]:
            mapped.close()
            raise OSError(f"{path} does not hold the known-blob set just written to it")
        known._sorted = _Sorted(mapped)
    return True


def attach(path: str, count: int) -> KnownBlobs | None:
    """The known-blob set another process of this run shared at ``path`` (``count`` digests), mapped
    read-only; None when the file is not there or not of that size (the caller loads the index)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != count * DIGEST or count == 0:
                return None
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError:
        return None
    known = KnownBlobs()
    known._sorted = _Sorted(mapped)
    return known


def indexed_now(repo: Repository) -> KnownBlobs:
    """Every blob id in the index as a reader sees it now (every index file read
    again, nothing cached): what the commit guard checks a manifest against.
    Format 2 reads the stored binary ids and copies them in (``index.load_ids``)."""
    from .index import load_ids  # index imports this module
    return KnownBlobs(load_ids(repo))


# The per-process known-blob caches, keyed by (repository URL, run id), newest
# last. A run drops its entry when it commits or fails (forget_run; on a Dask
# cluster the flow asks every worker to). A worker whose flow process was
# killed never hears that, so a process keeps at most CACHED_RUNS entries and
# drops the least recently used: a long-lived worker cannot fill up with
# dead runs' sets, and a live run that lost its entry only reloads the index.
CACHED_RUNS = 4
_known_cache: dict[tuple[str, str], KnownBlobs] = {}
_cache_lock = threading.Lock()


def known_blobs(repo: Repository, run_id: str, shared: tuple[str, int] | None = None) -> KnownBlobs:
    """The run's shared KnownBlobs, loaded once per process: from ``shared`` (the local file and digest
    count ``share`` wrote for the run, when this process can read it), else from the index."""
    key = (repo.url, run_id)
    with _cache_lock:
        known = _known_cache.pop(key, None)
        if known is None and shared is not None:
            known = attach(*shared)
        if known is None:
            # Every location (unique=False): deduplicating is the sort's job here,
            # cheaper than load_index's group-by over the strings.
            known = indexed_now(repo)
            memory.release()               # the index table it was made from
        _known_cache[key] = known                  # most recently used last
        while len(_known_cache) > CACHED_RUNS:
            del _known_cache[next(iter(_known_cache))]
    return known


def forget_run(repo_url: str, run_id: str) -> None:
    with _cache_lock:
        _known_cache.pop((repo_url, run_id), None)


def cached_runs() -> list[tuple[str, str]]:
    """(repository URL, run id) of the runs whose known-blob set this process holds."""
    with _cache_lock:
        return list(_known_cache)
