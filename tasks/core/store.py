"""Storing file contents: hash, deduplicate, pack small blobs, store large ones whole.

One call to ``store_batch`` handles one batch of files (bounded in count and
bytes by the caller). For each file:

* small files (below the repository's threshold) are read whole into memory,
  hashed with BLAKE3, and, unless the hash is already known (in the index or
  earlier in this run), appended to the open pack. A pack is flushed when it
  reaches the pack size; its name is the BLAKE3 of its bytes, so a retried
  batch that produces the same pack writes nothing new. Each pack ends with a
  small JSON trailer listing its blobs, so the index could be rebuilt from the
  packs alone if it were ever lost;
* large files are streamed: to a local repository in one pass (read, hash and
  write to a temporary file, then link it to ``objects/<ab>/<hash>``); to a
  remote one in two passes (hash first so a known blob is never uploaded, then
  upload while hashing again and compare, so a file that changed in between is
  caught).

A file that vanished, cannot be read, or changed while it was read (its
``fstat`` before and after the read differ, or the byte count differs) is
reported in ``skipped`` and left out; it never aborts the batch.

The index rows for everything written are returned; the caller writes them
(write order: blobs, then index, then manifest).
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3
import pyarrow as pa

from . import pack, progress, storage
from .errors import RepositoryWriteError
from .manifest import clamp_ns, shown
from .pack import encode_trailer

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .known_blobs import KnownBlobs
    from .repository import Repository
    from .store_v2 import ChunkedStore

INDEX_SCHEMA = pa.schema([("hash", pa.string()), ("key", pa.string()),
                          ("offset", pa.int64()), ("length", pa.int64())])
# Format 2's index rows in memory: format 1's columns (ids as hex, the pack's
# key) plus what opening a blob needs. index.py converts them to and from the
# stored form (binary ids, ARCHITECTURE.md "### Index files").
INDEX2_SCHEMA = pa.schema([("hash", pa.string()), ("key", pa.string()), ("offset", pa.int64()),
                           ("length", pa.int64()), ("type", pa.int8()), ("seq", pa.int32()),
                           ("salt", pa.binary(32)), ("raw_length", pa.int64()), ("compressed", pa.bool_())])
V2_COLUMNS = ("type", "seq", "salt", "raw_length", "compressed")
CHUNK = 4 * 1024 * 1024
# Files at least this big are hashed with several threads (blake3 scales well).
PARALLEL_HASH_MIN = 64 * 1024 * 1024


@dataclass
class BatchResult:
    rows: list[int] = field(default_factory=list)       # row numbers in the plan
    hashes: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    ctimes: list[int | None] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index_rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in INDEX2_SCHEMA.names})
    bytes_read: int = 0
    bytes_stored: int = 0      # plaintext bytes of the new blobs (file contents, chunks)
    bytes_written: int = 0     # bytes written to the repository (format 2: packs, compressed and encrypted)
    blobs_stored: int = 0
    packs_written: int = 0
    objects_written: int = 0

    def index_table(self, version: int = 1) -> pa.Table:
        if version >= 2:
            return pa.table(self.index_rows, schema=INDEX2_SCHEMA)
        return pa.table({c: self.index_rows[c] for c in INDEX_SCHEMA.names}, schema=INDEX_SCHEMA)

    def result_table(self) -> pa.Table:
        return pa.table({"row": pa.array(self.rows, pa.int64()), "hash": pa.array(self.hashes, pa.string()),
                         "size": pa.array(self.sizes, pa.int64()), "mtime_ns": pa.array(self.mtimes, pa.int64()),
                         "ctime_ns": pa.array(self.ctimes, pa.int64())})


class ChangedWhileReading(Exception):
    pass


# errno values that mean the *destination* is the problem during a local copy.
_DEST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


# Format 2 packs are sealed (salt, AES-GCM, header, name) and written on these threads
# while the batch goes on reading and chunking: the write waits for the disk
# (storage.make_durable), and BLAKE3 and the write release the GIL. Each writer has at
# most one pack in flight, so a batch holds at most two packs per writer.
PACK_THREADS = 2
_pack_pool: ThreadPoolExecutor | None = None


def _pack_threads() -> ThreadPoolExecutor:
    global _pack_pool
    if _pack_pool is None:
        _pack_pool = ThreadPoolExecutor(PACK_THREADS, thread_name_prefix="keepflow-pack")
    return _pack_pool


def _forget_pack_threads() -> None:       # a forked child has none of its parent's threads
    global _pack_pool
    _pack_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pack_threads)


class PackWriter:
    """Concatenates small blobs (format 2: also chunks, or chunk lists) and writes full packs write-once.

    Format 2 hands each full pack to a pack thread and goes on; ``flush``
    writes the open pack and returns once every pack is written and its index
    rows are in the result (a failed write raises there, or at the next full
    pack). ``abandon`` waits for a pack in flight without asking how it went.
    """

    def __init__(self, repo: Repository, result: BatchResult, dry_run: bool = False,
                 kind: int = pack.KIND_DATA) -> None:
        self.repo, self.result, self.dry_run, self.kind = repo, result, dry_run, kind
        self.v2 = repo.version >= 2
        self.chunked: ChunkedStore | None = None     # format 2's store of files (store_batch sets it)
        self.buffer = bytearray()
        self.entries: list[tuple[str, int, int]] = []
        self.blobs: list[tuple] = []     # format 2: (id, kind, payload, compressed, raw length)
        self.size = 0
        self.claimed: set[str] = set()   # hashes this batch has packed (see KnownBlobs)
        self._writing: Future | None = None      # format 2: the pack on a pack thread

    def add(self, blob_hash: str, data: bytes | bytearray | memoryview, compressed: bool = False,
            raw_length: int | None = None) -> None:
        if self.v2:
            self.blobs.append((blob_hash, self.kind, data, compressed, len(data) if raw_length is None else raw_length))
            self.size += len(data)
            if self.size >= self.repo.config.pack_size:
                self._send_v2()
            return
        self.entries.append((blob_hash, len(self.buffer), len(data)))
        self.buffer += data
        if len(self.buffer) >= self.repo.config.pack_size:
            self.flush()

    def flush(self) -> None:
        if self.v2:
            self._send_v2()
            self._settle_v2()
            return
        if not self.entries:
            return
        self.buffer += encode_trailer(self.entries)
        key = self.repo.pack_key(blake3.blake3(self.buffer).hexdigest())
        if not self.dry_run:
            # Local writes take the bytearray as is (no 16 MiB copy).
            data = self.buffer if self.repo.is_local else bytes(self.buffer)
            try:
                storage.write_once(self.repo.fs, self.repo.path(key), data)
            except Exception as exc:
                raise storage.write_failure(f"cannot write {key} to {self.repo.url}: {exc}", exc) from exc
        rows = self.result.index_rows
        for blob_hash, offset, length in self.entries:
            rows["hash"].append(blob_hash)
            rows["key"].append(key)
            rows["offset"].append(offset)
            rows["length"].append(length)
        self.result.packs_written += 1
        self.result.bytes_written += len(self.buffer)
        self.buffer = bytearray()
        self.entries = []

    def abandon(self) -> None:
        """The batch failed: let a pack in flight finish (its blobs stay unindexed), raise nothing."""
        writing, self._writing = self._writing, None
        if writing is not None:
            try:
                writing.result()
            except BaseException:
                pass

    def _send_v2(self) -> None:
        if not self.blobs:
            return
        self._settle_v2()                      # one pack in flight per writer
        blobs, self.blobs, self.size = self.blobs, [], 0
        self._writing = _pack_threads().submit(self._write_v2, blobs)

    def _settle_v2(self) -> None:
        if self._writing is None:
            return
        writing, self._writing = self._writing, None
        key, salt, entries, nbytes = writing.result()
        rows = self.result.index_rows
        for e in entries:
            rows["hash"].append(e.id)
            rows["key"].append(key)
            rows["offset"].append(e.offset)
            rows["length"].append(e.length)
            rows["type"].append(e.kind)
            rows["seq"].append(e.seq)
            rows["salt"].append(salt)
            rows["raw_length"].append(e.raw_length)
            rows["compressed"].append(e.compressed)
        self.result.packs_written += 1
        self.result.bytes_written += nbytes

    def _write_v2(self, blobs: list[tuple]) -> tuple[str, bytes, list, int]:
        """Seal and write one pack (on a pack thread); (key, salt, entries, bytes written)."""
        parts, salt, entries = pack.encode_pack2(self.repo.keys, blobs, self.repo.config.header_pad)
        hasher = blake3.blake3()
        for part in parts:
            hasher.update(part)
        key = self.repo.pack_key(hasher.hexdigest())
        if not self.dry_run:
            try:
                storage.write_once_parts(self.repo.fs, self.repo.path(key), parts)
            except Exception as exc:
                raise storage.write_failure(f"cannot write {key} to {self.repo.url}: {exc}", exc) from exc
        return key, salt, entries, sum(len(p) for p in parts)


def store_batch(repo: Repository, source_fs: AbstractFileSystem, source_root: str, paths: list[str], rows: list[int],
                known: KnownBlobs, dry_run: bool = False, compression: str | None = None) -> BatchResult:
    """Store one batch; ``compression`` (format 2) overrides the repository's default mode."""
    result = BatchResult()
    packer = PackWriter(repo, result, dry_run)
    writers = [packer]
    if repo.version >= 2:
        from .store_v2 import ChunkedStore

        chunked = ChunkedStore(repo, packer, PackWriter(repo, result, dry_run, kind=pack.KIND_LIST),
                               known, result, compression or repo.config.compression or "auto")
        packer.chunked = chunked
        writers.append(chunked.lists)
    try:
        _store_files(repo, source_fs, source_root, paths, rows, known, packer, result, dry_run)
        for w in writers:
            w.flush()
    except BaseException:
        for w in writers:
            w.abandon()
            known.settle(w, stored=False)    # a retry must store these blobs itself
        raise
    known.add(result.index_rows["hash"])
    for w in writers:
        known.settle(w, stored=True)
    return result


def _store_files(repo: Repository, source_fs: AbstractFileSystem, source_root, paths, rows, known: KnownBlobs,
                 packer: PackWriter, result, dry_run) -> None:
    threshold = repo.config.small_file_threshold
    local_source = storage.is_local(source_fs)
    for row, rel in zip(rows, paths, strict=True):
        full = os.path.join(source_root, rel) if local_source else storage.join(source_root, rel)
        try:
            if packer.chunked is not None:          # format 2 (store_batch gives its packer one)
                blob_hash, size, mtime, ctime = packer.chunked.store_file(source_fs, full, local_source, threshold)
            elif local_source:
                blob_hash, size, mtime, ctime = _store_local_file(repo, full, threshold, known, packer, result, dry_run)
            else:
                blob_hash, size, mtime, ctime = _store_remote_file(repo, source_fs, full, threshold, known, packer,
                                                                   result, dry_run)
        except RepositoryWriteError:
            raise
        except FileNotFoundError:
            result.skipped.append((shown(rel), "vanished before it could be read"))
            continue
        except ChangedWhileReading:
            result.skipped.append((shown(rel), "changed while it was read"))
            continue
        except IsADirectoryError:
            result.skipped.append((shown(rel), "became a folder while it was read"))
            continue
        except OSError as exc:
            result.skipped.append((shown(rel), f"cannot read: {exc.strerror or exc}"))
            continue
        progress.advance("store", 1, size)
        result.rows.append(row)
        result.hashes.append(blob_hash)
        result.sizes.append(size)
        result.mtimes.append(mtime)
        result.ctimes.append(ctime)


def _store_small(data: bytes, known: KnownBlobs, packer: PackWriter, result: BatchResult) -> str:
    """Hash a small file's bytes and pack them unless the blob is known."""
    result.bytes_read += len(data)
    blob_hash = blake3.blake3(data).hexdigest()
    if not known.contains_or_claim(blob_hash, packer):
        packer.add(blob_hash, data)
        result.bytes_stored += len(data)
        result.blobs_stored += 1
    return blob_hash


def _same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns and a.st_ino == b.st_ino


def _store_local_file(repo: Repository, path: str, threshold, known: KnownBlobs, packer: PackWriter, result, dry_run):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        before = os.fstat(fd)
        if before.st_size < threshold:
            data = os.read(fd, before.st_size + 1)
            while len(data) <= before.st_size:  # short reads are legal
                more = os.read(fd, before.st_size + 1 - len(data))
                if not more:
                    break
                data += more
            after = os.fstat(fd)
            if len(data) != before.st_size or not _same_stat(before, after):
                raise ChangedWhileReading()
            blob_hash = _store_small(data, known, packer, result)
        else:
            blob_hash = _store_large_local(repo, fd, before, known, result, dry_run)
            after = os.fstat(fd)
            if not _same_stat(before, after):
                raise ChangedWhileReading()
        # Clamped like the scan's mtime_ns (manifest.py); the exact value stays in the plan.
        return blob_hash, before.st_size, clamp_ns(before.st_mtime_ns), clamp_ns(before.st_ctime_ns)
    finally:
        os.close(fd)


def _store_large_local(repo: Repository, fd, st, known: KnownBlobs, result, dry_run) -> str:
    if dry_run or not repo.is_local:
        # Hash first (cheap, and a known blob is never uploaded), then upload.
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if st.st_size >= PARALLEL_HASH_MIN else 1)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                hasher.update(chunk)
                result.bytes_read += len(chunk)
        blob_hash = hasher.hexdigest()
        if known.contains(blob_hash) or dry_run:
            if not known.contains(blob_hash):
                _record_object(result, repo, blob_hash, st.st_size)
            return blob_hash
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            _upload_verified(repo, f, blob_hash, st.st_size, source_changed=lambda: _changed(fd, st))
        _record_object(result, repo, blob_hash, st.st_size)
        known.add([blob_hash])
        return blob_hash
    # Local repository: the kernel copies the file to a temporary name
    # (copy_file_range: no trip through Python buffers), then we hash the
    # *copy*, so the name always matches what is stored; a change of the
    # source meanwhile is caught by the caller's fstat comparison.
    tmp_dir = repo.path("tmp")
    os.makedirs(tmp_dir, exist_ok=True)
    from .liveness import repo_tmp_name  # names the writer: a dead one's copy goes at the next backup
    tmp = os.path.join(tmp_dir, repo_tmp_name())
    try:
        try:
            result.bytes_read += _kernel_copy(fd, tmp, st.st_size)
        except OSError as exc:
            if exc.errno in _DEST_ERRNOS or (exc.filename and str(exc.filename).startswith(tmp_dir)):
                raise storage.write_failure(f"cannot write to {repo.url}: {exc.strerror or exc}", exc) from exc
            raise
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if st.st_size >= PARALLEL_HASH_MIN else 1)
        blob_hash = hasher.update_mmap(tmp).hexdigest() if st.st_size else hasher.hexdigest()
        if known.contains(blob_hash):
            os.unlink(tmp)
            return blob_hash
        final = repo.path(repo.object_key(blob_hash))
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            storage.publish_local_tmp(tmp, final)
        except OSError as exc:
            raise storage.write_failure(f"cannot write {final}: {exc.strerror or exc}", exc) from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _record_object(result, repo, blob_hash, st.st_size)
    known.add([blob_hash])
    return blob_hash


def _kernel_copy(fd: int, dest: str, size: int) -> int:
    """Copy ``fd`` (from offset 0) into a new file ``dest``; returns bytes copied."""
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise storage.write_failure(f"cannot create {dest}: {exc.strerror or exc}", exc) from exc
    copied = 0
    try:
        try:
            while True:
                n = os.copy_file_range(fd, out, max(size - copied, CHUNK), copied, copied)
                if n == 0:
                    break
                copied += n
        except OSError:
            # Not supported between these filesystems: plain read/write.
            os.lseek(fd, copied, os.SEEK_SET)
            os.lseek(out, copied, os.SEEK_SET)
            while chunk := os.read(fd, CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                copied += len(chunk)
    finally:
        os.close(out)
    return copied


def _upload_verified(repo: Repository, fileobj, blob_hash: str, size: int, source_changed=None) -> None:
    """Upload ``fileobj`` as the object ``blob_hash``, hashing it again while sending.

    Object stores publish a (multipart) upload atomically when it completes,
    so the final name is written directly, create-only where the provider
    has it (``storage.create_only``): a refusal means another writer stored
    the same blob first. Other filesystems get a temporary name and a
    rename. A content mismatch (the source changed since it was hashed)
    abandons the upload and skips the file; under the final name nothing of
    ours was published, and whatever is there belongs to another writer.
    """
    fs = repo.fs
    final = repo.path(repo.object_key(blob_hash))
    direct = storage.is_object_store(fs)
    try:
        if fs.exists(final):
            return
        target = final if direct else storage.tmp_name(final)
        hasher = blake3.blake3()
        with fs.open(target, "xb" if direct and storage.create_only(fs, final) else "wb") as out:
            while chunk := fileobj.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
            if hasher.hexdigest() != blob_hash or (source_changed and source_changed()):
                # Abandon the upload: for object stores, discard before it completes.
                if direct:
                    storage.discard_upload(out)
                mismatch = True
            else:
                mismatch = False
    except ChangedWhileReading:
        raise
    except Exception as exc:
        if direct and storage.is_exists_error(exc):
            return
        raise storage.write_failure(f"cannot upload {repo.object_key(blob_hash)} to {repo.url}: {exc}", exc) from exc
    if mismatch:
        try:
            if not direct and fs.exists(target):
                fs.rm_file(target)
        except Exception:
            pass
        raise ChangedWhileReading()
    if not direct:
        try:
            if hasattr(fs, "rename_noreplace"):
                fs.rename_noreplace(target, final)
            else:
                fs.mv(target, final)
        except Exception as exc:
            # Refused because another writer published the same blob first: theirs stays.
            if hasattr(fs, "rename_noreplace") and _exists_quietly(fs, final):
                _remove_quietly(fs, target)
                return
            raise storage.write_failure(f"cannot publish {final}: {exc}", exc) from exc


def _exists_quietly(fs: AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except Exception:
        return False


def _remove_quietly(fs: AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except Exception:
        pass     # a .tmp- name: gc removes it


def _changed(fd: int, st: os.stat_result) -> bool:
    return not _same_stat(st, os.fstat(fd))


def _record_object(result: BatchResult, repo: Repository, blob_hash: str, size: int) -> None:
    rows = result.index_rows
    rows["hash"].append(blob_hash)
    rows["key"].append(repo.object_key(blob_hash))
    rows["offset"].append(0)
    rows["length"].append(size)
    result.bytes_stored += size
    result.bytes_written += size
    result.blobs_stored += 1
    result.objects_written += 1


def _store_remote_file(repo: Repository, fs: AbstractFileSystem, path: str, threshold, known: KnownBlobs,
                       packer: PackWriter, result, dry_run):
    info = fs.info(path)
    size = int(info.get("size") or 0)
    mtime = storage.info_mtime_ns(info)
    if size < threshold:
        data = fs.cat_file(path)
        if len(data) != size:
            raise ChangedWhileReading()
        return _store_small(data, known, packer, result), size, mtime, None
    hasher = blake3.blake3()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            result.bytes_read += len(chunk)
    blob_hash = hasher.hexdigest()
    if not known.contains(blob_hash):
        if not dry_run:
            with fs.open(path, "rb") as f:
                _upload_verified(repo, f, blob_hash, size)
        _record_object(result, repo, blob_hash, size)
        known.add([blob_hash])
    return blob_hash, size, mtime, None
