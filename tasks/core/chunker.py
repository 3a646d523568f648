"""Content-defined chunking for repository format 2: keyed FastCDC 2020.

ARCHITECTURE.md, "Repository format 2 (specification)", "Content-defined
chunking", is the definition; this module implements it and nothing else
(no I/O of its own, no prefect). In short: the cut points of a file are those
of FastCDC 2020 (min/avg/max 512 KiB / 1 MiB / 8 MiB, NC 2) over the secret
gear table ``G[b] = GEAR[perm[b]] XOR s``, where ``perm`` (a permutation of
the 256 byte values) and ``s`` (63 bits) come from the chunker key
``K_chunker`` through keyed BLAKE3. They are computed as ``pyfastcdc``'s
seeded chunker (``seed=s``) run over the input mapped through ``perm``
(``pyarrow.compute.take``, GIL-free); the chunks are slices of the original
bytes.

Streaming. A cut decision for a chunk that starts with ``n`` bytes left reads
at most ``min(n, max)`` bytes, and every ``n >= max`` gives the same decision
as the whole file would (the rule only distinguishes ``n > max`` from ``n ==
max`` by ``limit = max`` against ``limit = n``, which are equal). So in a
buffer that is a prefix of the file, every chunk that starts at least ``max``
bytes before the buffer's end is final; ``Chunker.cut(buf, final=False)``
returns exactly those. More is true, and ``Chunker.iter_chunks`` uses it:
with ``n < max`` bytes left, a cut the rolling hash finds *before* the end of
the buffer is final too. The hash at position ``k`` depends only on the
bytes before ``k``; the loop starts at ``even(min)`` either way; and the
masks agree at every position the short buffer looks at (``MASK_S`` below
``even(center)``: with ``n >= avg`` the centre is ``avg`` for both, with ``n <
avg`` the short buffer's loop ends at ``even(n) <= even(center)`` of the
longer one). Only a chunk that runs to the end of the buffer (the loop ran
out, ``limit = n``) may still grow, unless it is ``max`` long. So each window
carries just its last, undecided chunk into the next one. The chunks of a
stream are therefore those of ``cut(whole_file, final=True)``, whatever the
window and however ``read`` splits the data.

A ``Chunker`` holds no mutable state after construction: one instance may be
used from several threads at once (``pyfastcdc``'s ``cut_buf`` makes a fresh
iterator per call and only reads the configuration).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import blake3
import pyarrow as pa
import pyarrow.compute as pc
import pyfastcdc

if TYPE_CHECKING:
    from .compress import BytesLike

KiB, MiB = 1024, 1024 * 1024

MIN_SIZE, AVG_SIZE, MAX_SIZE, NC = 512 * KiB, MiB, 8 * MiB, 2
CHUNKER_NAME = "fastcdc2020-keyed"
DEFAULT_WINDOW = 16 * MiB
READ_STEP = MiB                      # iter_chunks asks read() for at most this much at a time

# Windows and their permuted copies (16 MiB each, a pair per window) come from Arrow's mimalloc
# pool, which keeps freed pages for the next window, whatever Arrow's default pool is. With jemalloc
# as the default (ARROW_DEFAULT_MEMORY_POOL, tasks/core/memory.use_lean_pool), which gave such
# extents back at once, every window cost fresh pages: 340k-375k minor page faults and 1.5-3 s more
# system time for the 2,000 MiB bench tree, against 79k-96k (glibc malloc, even tuned: 190k-200k).
def _window_pool():
    try:
        return pa.mimalloc_memory_pool()
    except (NotImplementedError, AttributeError):    # a pyarrow built without it: the default pool
        return None


_POOL = _window_pool()

_PERM_CONTEXT = b"keepflow 2 chunker permutation"
_SEED_CONTEXT = b"keepflow 2 chunker seed"


def _b3k(key: bytes, message: bytes, length: int) -> bytes:
    """``B3K(key, message)[length]``: the first ``length`` bytes of keyed BLAKE3's output."""
    return blake3.blake3(message, key=key).digest(length=length)


def derive_permutation(key: bytes) -> bytes:
    """``perm``: Fisher-Yates over ``X = B3K(K_chunker, "keepflow 2 chunker permutation")[2048]``.

    Starting from the identity, for i = 255 down to 1: r = u64 little-endian of
    X[8i : 8i+8], j = r mod (i+1), swap perm[i] and perm[j]. Returned as the
    256 bytes perm[0], ..., perm[255].
    """
    x = _b3k(key, _PERM_CONTEXT, 256 * 8)
    perm = list(range(256))
    for i in range(255, 0, -1):
        j = int.from_bytes(x[8 * i: 8 * i + 8], "little") % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return bytes(perm)


def derive_seed(key: bytes) -> int:
    """``s = u64(B3K(K_chunker, "keepflow 2 chunker seed")[8]) >> 1`` (below 2^63, as pyfastcdc needs)."""
    return int.from_bytes(_b3k(key, _SEED_CONTEXT, 8), "little") >> 1


def _byte_view(buf) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")            # contiguous buffers of any item type, as bytes
    return view


class Chunker:
    """Keyed FastCDC 2020 over one repository's chunker key.

    ``key`` is ``K_chunker`` (32 bytes). The sizes default to the format's
    512 KiB / 1 MiB / 8 MiB, NC 2; other values (within pyfastcdc's bounds:
    min 64 B-1 MiB, avg a power of two 256 B-4 MiB, max 1 KiB-16 MiB) are for
    tests, and for a repository whose ``chunker`` config says so.
    """

    def __init__(self, key: bytes, *, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE,
                 max_size: int = MAX_SIZE, nc: int = NC) -> None:
        key = bytes(key)
        if len(key) != 32:
            raise ValueError(f"the chunker key must be 32 bytes, got {len(key)}")
        if avg_size <= 0 or avg_size & (avg_size - 1):
            raise ValueError(f"avg_size must be a power of two, got {avg_size}")
        self.min_size, self.avg_size, self.max_size, self.nc = min_size, avg_size, max_size, nc
        self.perm = derive_permutation(key)
        self.seed = derive_seed(key)
        # pyfastcdc checks the bounds (and min <= avg <= max, 0 <= nc <= 3).
        self._cdc = pyfastcdc.FastCDC(avg_size, min_size=min_size, max_size=max_size,
                                      normalized_chunking=nc, seed=self.seed)  # type: ignore[arg-type]  # 0-3, checked there
        self._lut = pa.array(list(self.perm), type=pa.uint8())

    @classmethod
    def from_config(cls, key: bytes, config: dict) -> Chunker:
        """From the repository config's ``chunker`` object (``{"name", "min", "avg", "max", "nc"}``)."""
        if config.get("name") != CHUNKER_NAME:
            raise ValueError(f"unknown chunker {config.get('name')!r} (this keepflow knows {CHUNKER_NAME!r})")
        return cls(key, min_size=int(config["min"]), avg_size=int(config["avg"]),
                   max_size=int(config["max"]), nc=int(config["nc"]))

    @property
    def min_window(self) -> int:
        """The smallest window ``iter_chunks`` uses: twice ``max``, so each window reads at least ``max`` new bytes."""
        return 2 * self.max_size

    def permute(self, buf: BytesLike) -> memoryview:
        """``perm`` applied to every byte of ``buf``: a new read-only buffer (pyarrow take, GIL-free)."""
        view = _byte_view(buf)
        n = len(view)
        if n == 0:
            return memoryview(b"")
        idx = pa.Array.from_buffers(pa.uint8(), n, [None, pa.py_buffer(view)])
        out = pc.take(self._lut, idx)
        return memoryview(out.buffers()[1]).cast("B")[:n]   # pyarrow exports it as signed "b"

    def cut(self, buf: BytesLike, final: bool) -> list[int]:
        """The lengths of the chunks ``buf`` starts with, in order.

        ``final=True``: ``buf`` is the whole file (or its whole rest); every
        byte is in a returned chunk. ``final=False``: ``buf`` is a prefix of
        the rest of the file; only the chunks that start at least ``max``
        bytes before the end of ``buf`` are returned (those cannot depend on
        what follows). Cut again at ``sum(lengths)`` with more data appended.
        """
        view = _byte_view(buf)
        n = len(view)
        last_start = n if final else n - self.max_size   # a chunk may start at offsets <= last_start
        if n == 0 or last_start < 0:
            return []
        lengths: list[int] = []
        offset = 0
        for chunk in self._cdc.cut_buf(self.permute(view)):
            length = chunk.length
            lengths.append(length)
            offset += length
            if offset > last_start:
                break
        return lengths

    def iter_chunks(self, read: Callable[[int], bytes] | None = None, window: int = DEFAULT_WINDOW, *,
                    readinto: Callable[[memoryview], int] | None = None) -> Iterator[memoryview]:
        """The chunks of a stream, in order, as read-only memoryviews.

        Give exactly one of ``read`` and ``readinto``: ``read(n)`` returns up
        to ``n`` bytes, ``b""`` at the end (a file's ``read``); ``readinto(mv)``
        fills up to ``len(mv)`` bytes of the writable memoryview ``mv`` and
        returns how many, 0 at the end (``lambda mv: os.readv(fd, [mv])``: the
        kernel copies straight into the window, one copy per byte and no
        temporary ``bytes``). ``read`` is asked for at most ``READ_STEP`` at a
        time, ``readinto`` for the rest of the window at once.

        Each window holds the undecided last chunk of the previous one (less
        than ``max`` bytes; see "Streaming" above) followed by new data,
        ``window`` bytes in all (at least ``min_window``). A window is one
        buffer from Arrow's mimalloc pool (``_POOL``: no zero-filling, freed
        pages reused for the next window), so a chunk the caller keeps is a view that keeps
        its window alive and never changes under it. Every byte is permuted
        once, except those of each window's undecided last chunk, which are
        permuted again with the next window (one partial chunk per window, not
        ``max`` bytes). Memory: the window and its permuted copy while it is
        cut, plus the windows of whatever yielded chunks the caller still
        holds. An empty stream yields nothing. The chunks equal those of
        ``cut(all the bytes, final=True)``.
        """
        if (read is None) == (readinto is None):
            raise TypeError("iter_chunks needs exactly one of read and readinto")
        window = max(int(window), self.min_window)
        max_size = self.max_size
        tail = memoryview(b"")
        while True:
            win = pa.allocate_buffer(window, memory_pool=_POOL)
            mv = memoryview(win).cast("B")   # pyarrow exports signed "b"
            filled = len(tail)
            mv[:filled] = tail
            tail = memoryview(b"")           # let go of the previous window (the caller may still view it)
            eof = False
            while filled < window:
                if readinto is not None:
                    want = window - filled
                    got = readinto(mv[filled:])
                else:
                    assert read is not None
                    want = min(window - filled, READ_STEP)
                    piece = read(want)
                    got = len(piece)
                    if got <= want:
                        mv[filled: filled + got] = piece
                if not got:
                    eof = True
                    break
                if got > want:
                    raise ValueError(f"read({want}) returned {got} bytes")
                filled += got
            if not filled:
                return
            view = mv[:filled].toreadonly()
            del mv
            offset = 0
            for chunk in self._cdc.cut_buf(self._permute_window(win, filled)):
                length = chunk.length
                # Only the chunk that runs to the end of the window can still change: a cut the
                # rolling hash found inside the window, or one at max, is the whole stream's cut.
                if not eof and offset + length == filled and length < max_size:
                    break
                yield view[offset: offset + length]
                offset += length
            if eof:
                return
            tail = view[offset:]

    def _permute_window(self, win: pa.Buffer, n: int) -> memoryview:
        idx = pa.Array.from_buffers(pa.uint8(), n, [None, win])
        out = pc.take(self._lut, idx, memory_pool=_POOL)
        return memoryview(out.buffers()[1]).cast("B")[:n]
