"""Storing one file in a format 2 repository: keyed ids, zstd, content-defined chunks.

A file below ``small_file_threshold`` is one data blob: read whole, its keyed
id computed, and (unless known) compressed and added to the batch's data
pack. A larger file is cut into chunks (chunker.py) while it is read in
windows; each chunk is a data blob like a small file, and the file's content
is its *list blob* (chunk id || u32 length per chunk) in the batch's list
pack, or the chunk itself when the file is a single chunk (ARCHITECTURE.md,
"### Ids", "### Content-defined chunking").

Chunks are hashed and compressed in a small thread pool (BLAKE3 and zstd
release the GIL; ``cryptography``'s AES-GCM does not, so a full pack is
encrypted and written by ``PackWriter`` on its pack thread), at most ``IN_FLIGHT`` chunks ahead of
the reader, so memory stays around ``window + IN_FLIGHT * 8 MiB``. A local
file is read with ``os.readv`` straight into the chunker's window (one copy
per byte, by the kernel, GIL released); a worker hashes and compresses a view
of the window and copies only a chunk stored raw (a compressed one is the
compressor's output). A file
that changes while it is read (size, mtime or inode differ between the
``fstat`` before and after, or the byte count differs) raises
``ChangedWhileReading``: its chunks already packed are stored but nothing
references them (prune collects them).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from . import compress, storage
from .chunk_lists import encode_list
from .chunker import Chunker
from .manifest import clamp_ns
from .store import ChangedWhileReading, _same_stat

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .known_blobs import KnownBlobs
    from .repository import Repository
    from .store import BatchResult, PackWriter

HASH_THREADS = 2
IN_FLIGHT = 4
READ_STEP = 4 * 1024 * 1024

_pool: ThreadPoolExecutor | None = None

# glibc malloc, tuned once a process stores or restores large files. By default a
# block of 128 KiB or more is mmapped and unmapped again, and the free top of the heap
# is trimmed past a threshold that adapts to what was freed last; chunks, zstd output,
# ciphertexts and packs (0.5-24 MiB each) then keep coming back as fresh pages: 350k to
# 620k minor page faults and 2-5 s of system time for the 2,000 MiB bench tree. With
# every block below 32 MiB from the heap and 64 MiB kept before trimming, 45k-50k
# (bench/RESULTS.md, "Format 2 against restic"). KEEPFLOW_MALLOC_TUNING=0 leaves malloc
# alone; other C libraries (musl) have no mallopt and are left alone too.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024    # glibc's largest (HEAP_MAX_SIZE / 2 on 64 bits)
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
_malloc_tuned = False


def tune_malloc() -> bool:
    """Apply the malloc settings above (once per process); True when they are in force."""
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("KEEPFLOW_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return _malloc_tuned
    _malloc_tuned = True                      # tried once, whatever the outcome
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="keepflow-chunk")
    return _pool


_chunkers: dict[bytes, Chunker] = {}


def chunker_for(repo: Repository) -> Chunker:
    key = repo.keys.chunker
    if key not in _chunkers:
        assert repo.config.chunker is not None      # format 2's keepflow.json always has it
        _chunkers[key] = Chunker.from_config(key, repo.config.chunker)
    return _chunkers[key]


class ChunkedStore:
    """Stores files of one batch into ``data`` (chunks, small files) and ``lists`` (chunk lists)."""

    def __init__(self, repo: Repository, data: PackWriter, lists: PackWriter, known: KnownBlobs, result: BatchResult,
                 mode: str) -> None:
        self.repo, self.data, self.lists, self.known, self.result = repo, data, lists, known, result
        self.mode = mode
        self.levels = repo.config.zstd_levels
        self.keys = repo.keys

    # -- one file --------------------------------------------------------------------------
    def store_file(self, fs: AbstractFileSystem, path: str, local: bool,
                   threshold: int) -> tuple[str | None, int, int, int]:
        if not local:
            return self._store_remote(fs, path, threshold)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            before = os.fstat(fd)
            if before.st_size < threshold:
                data = _read_exactly(fd, before.st_size)
                after = os.fstat(fd)
                if len(data) != before.st_size or not _same_stat(before, after):
                    raise ChangedWhileReading()
                content = self.store_small(data)
            else:
                content, nbytes = self.store_stream(readinto=lambda view: os.readv(fd, [view]))
                after = os.fstat(fd)
                if nbytes != before.st_size or not _same_stat(before, after):
                    raise ChangedWhileReading()
            return content, before.st_size, clamp_ns(before.st_mtime_ns), clamp_ns(before.st_ctime_ns)
        finally:
            os.close(fd)

    def _store_remote(self, fs: AbstractFileSystem, path: str, threshold: int):
        info = fs.info(path)
        size = int(info.get("size") or 0)
        mtime = storage.info_mtime_ns(info)
        if size < threshold:
            data = fs.cat_file(path)
            if len(data) != size:
                raise ChangedWhileReading()
            return self.store_small(data), size, mtime, None
        with fs.open(path, "rb") as f:
            content, nbytes = self.store_stream(f.read)
        if nbytes != size:
            raise ChangedWhileReading()
        return content, size, mtime, None

    def store_small(self, data: bytes) -> str:
        self.result.bytes_read += len(data)
        blob_id = self.keys.blob_id(data)
        if not self.known.contains_or_claim(blob_id, self.data):
            payload, compressed = compress.compress(data, self.mode, self.levels)
            self.data.add(blob_id, payload, compressed, len(data))
            self.result.blobs_stored += 1
            self.result.bytes_stored += len(data)
        return blob_id

    def store_stream(self, read: Callable[[int], bytes] | None = None, *,
                     readinto: Callable[[memoryview], int] | None = None) -> tuple[str, int]:
        """Chunk, hash, compress and pack a stream (``read`` or ``readinto``, as
        ``Chunker.iter_chunks`` takes them); (content id, bytes read)."""
        tune_malloc()
        chunker = chunker_for(self.repo)
        pool = _threads()
        pending: deque = deque()
        chunks: list[tuple[str, int]] = []
        nbytes = 0

        def prepare(chunk):
            # ``chunk`` is a view of the chunker's window; only a payload stored raw is copied
            # (the pack keeps it until it is flushed, the window need not live that long).
            blob_id = self.keys.blob_id(chunk)
            if self.known.contains(blob_id):
                return blob_id, len(chunk), None, False
            payload, compressed = compress.compress(chunk, self.mode, self.levels)
            return blob_id, len(chunk), payload if compressed else bytes(chunk), compressed

        def settle_one() -> None:
            blob_id, n, payload, compressed = pending.popleft().result()
            chunks.append((blob_id, n))
            if payload is not None and not self.known.contains_or_claim(blob_id, self.data):
                self.data.add(blob_id, payload, compressed, n)
                self.result.blobs_stored += 1
                self.result.bytes_stored += n

        try:
            for chunk in chunker.iter_chunks(read, readinto=readinto):
                nbytes += len(chunk)
                pending.append(pool.submit(prepare, chunk))
                while len(pending) > IN_FLIGHT:
                    settle_one()
            while pending:
                settle_one()
        finally:
            for f in pending:
                f.cancel()
        self.result.bytes_read += nbytes
        if len(chunks) == 1:
            return chunks[0][0], nbytes
        listing = encode_list(chunks)
        list_id = self.keys.list_id(listing)
        if not self.known.contains_or_claim(list_id, self.lists):
            self.lists.add(list_id, listing, False, len(listing))
            self.result.blobs_stored += 1
        return list_id, nbytes


def _read_exactly(fd: int, size: int) -> bytes:
    """What ``fd`` holds, read expecting ``size`` bytes: one ``os.read`` of ``size + 1`` normally.

    A file that grew since its ``fstat`` returns ``size + 1`` bytes (and its
    size differs in the ``fstat`` after), one that shrank returns fewer; short
    reads are legal, so reading goes on while fewer than ``size`` came back.
    Exactly ``size`` bytes end the reading without asking for the end of file
    again: were there more, the file changed, and the size or mtime of the
    ``fstat`` after the read says so (the caller compares them).
    """
    data = os.read(fd, size + 1)
    while len(data) < size:
        more = os.read(fd, size + 1 - len(data))
        if not more:
            break
        data += more
    return data

