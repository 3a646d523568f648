"""Storing one file in a format 2 repository: keyed ids, zstd, content-defined chunks.

A file below ``small_file_threshold`` is one data blob: read whole, its keyed
id computed, and (unless known) compressed and added to the batch's data
pack. A larger file is cut into chunks (chunker.py) while it is read in
windows; each chunk is a data blob like a small file, and the file's content
is its *list blob* (chunk id || u32 length per chunk) in the batch's list
pack, or the chunk itself when the file is a single chunk (ARCHITECTURE.md,
"### Ids", "### Content-defined chunking").

Chunks are hashed and compressed in a small thread pool (BLAKE3 and zstd
release the GIL; ``cryptography``'s AES-GCM does not, so encryption happens at
pack flush in the batch's own thread), at most ``IN_FLIGHT`` chunks ahead of
the reader, so memory stays around ``window + IN_FLIGHT * 8 MiB``. A file
that changes while it is read (size, mtime or inode differ between the
``fstat`` before and after, or the byte count differs) raises
``ChangedWhileReading``: its chunks already packed are stored but nothing
references them (prune collects them).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from . import compress, storage
from .chunk_lists import encode_list
from .chunker import Chunker
from .manifest import clamp_ns

if TYPE_CHECKING:
    from .store import PackWriter

HASH_THREADS = 2
IN_FLIGHT = 4
READ_STEP = 4 * 1024 * 1024

_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="keepflow-chunk")
    return _pool


_chunkers: dict[bytes, Chunker] = {}


def chunker_for(repo) -> Chunker:
    key = repo.keys.chunker
    if key not in _chunkers:
        _chunkers[key] = Chunker.from_config(key, repo.config.chunker)
    return _chunkers[key]


class ChunkedStore:
    """Stores files of one batch into ``data`` (chunks, small files) and ``lists`` (chunk lists)."""

    def __init__(self, repo, data: PackWriter, lists: PackWriter, known, result, mode: str):
        self.repo, self.data, self.lists, self.known, self.result = repo, data, lists, known, result
        self.mode = mode
        self.levels = repo.config.zstd_levels
        self.keys = repo.keys

    # -- one file --------------------------------------------------------------------------
    def store_file(self, fs, path: str, local: bool, threshold: int):
        from .store import ChangedWhileReading, _same_stat

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
                content, nbytes = self.store_stream(lambda n: os.read(fd, n))
                after = os.fstat(fd)
                if nbytes != before.st_size or not _same_stat(before, after):
                    raise ChangedWhileReading()
            return content, before.st_size, clamp_ns(before.st_mtime_ns), clamp_ns(before.st_ctime_ns)
        finally:
            os.close(fd)

    def _store_remote(self, fs, path: str, threshold: int):
        from .store import ChangedWhileReading

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

    def store_stream(self, read) -> tuple[str, int]:
        """Chunk, hash, compress and pack what ``read`` returns; (content id, bytes read)."""
        chunker = chunker_for(self.repo)
        pool = _threads()
        pending: deque = deque()
        chunks: list[tuple[str, int]] = []
        nbytes = 0

        def prepare(chunk):
            blob_id = self.keys.blob_id(chunk)
            if self.known.contains(blob_id):
                return blob_id, len(chunk), None, False
            payload, compressed = compress.compress(chunk, self.mode, self.levels)
            return blob_id, len(chunk), payload, compressed

        def settle_one():
            blob_id, n, payload, compressed = pending.popleft().result()
            chunks.append((blob_id, n))
            if payload is not None and not self.known.contains_or_claim(blob_id, self.data):
                self.data.add(blob_id, payload, compressed, n)
                self.result.blobs_stored += 1
                self.result.bytes_stored += n

        try:
            for chunk in chunker.iter_chunks(read):
                nbytes += len(chunk)
                # The chunk is a view of the reader's window: the thread gets its own copy.
                pending.append(pool.submit(prepare, bytes(chunk)))
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
    data = os.read(fd, size + 1)
    while len(data) <= size:  # short reads are legal
        more = os.read(fd, size + 1 - len(data))
        if not more:
            break
        data += more
    return data

