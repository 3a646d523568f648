"""Putting verified content in place at a restore target.

Decides per file under the overwrite policy (``if-changed`` hashes an
existing file of the same size), writes local files through descriptors
(create under a temporary name, write, set mode, owner and mtime on the open
descriptor, close, rename over the final name), streams large blobs while
hashing them, and copies a file already restored when several paths share a
blob. Remote targets (any fsspec URL) get the content only.

Temporary names are ``.kf-tmp-<writer>-<token>-<n>`` in the destination
folder: ``<writer>`` names the process (liveness.py), ``<token>`` the writer
object, ``<n>`` counts. They are created owner-only (0600): until the file's
own mode is applied, and if a crash stops us before, a restored secret is
readable by nobody else. A restore that was killed leaves such names behind;
the next restore into the same folders removes them before it writes
(``remove_stale_temporaries``): at once when their writer is known gone, after
an hour when it ran on another host. Only names matching keepflow's patterns
exactly, and only files and symlinks, are ever touched.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from . import liveness, progress, storage, xattrs

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

CHUNK = 4 * 1024 * 1024
# Files at least this big are written sparse (holes for zero blocks); the
# check costs one memcmp per block, and smaller files rarely have holes.
SPARSE_MIN = 1024 * 1024
HOLE_BLOCK = 64 * 1024
_ZEROS = bytes(CHUNK)
_ZERO_BLOCK = bytes(HOLE_BLOCK)
PROGRESS_EVERY = 64
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# A new file already belongs to us: chown only when the owner differs.
_OWN_IDS = (os.geteuid(), os.getegid()) if IS_ROOT else None


@dataclass
class RestoreBatchResult:
    written: int = 0
    identical: int = 0
    kept: int = 0                # existing files left alone (--overwrite never)
    bytes_written: int = 0
    bytes_read: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)   # blobs read per repository URL


class TargetWriter:
    """Puts verified content in place under the overwrite policy."""

    def __init__(self, fs: AbstractFileSystem, root: str, overwrite: str, dry_run: bool, fresh: bool = False,
                 sparse: bool = True) -> None:
        self.fs, self.root, self.overwrite, self.dry_run = fs, root, overwrite, dry_run
        self.local = storage.is_local(fs)
        self.sparse = sparse and self.local
        self.result = RestoreBatchResult()
        self._decided: dict[int, bool] = {}
        self._token, self._counter = new_token(), 0
        self._prefix = root.rstrip("/") + "/" if root.rstrip("/") else "/"
        self._unreported = [0, 0]          # progress is reported every PROGRESS_EVERY files
        # Nothing can be in the way in a folder that did not exist before
        # this restore: skip the per-file look at the target.
        self.fresh = fresh
        # How a file's content id is computed to compare it with the
        # snapshot's (format 1: plain BLAKE3; format 2 sets a keyed one).
        self.content_id: Callable[[AbstractFileSystem, str, bool], str] | None = None

    def dest(self, cols: dict[str, list[Any]], j: int) -> str:
        # Manifest paths are relative POSIX paths: plain concatenation is enough.
        raw = cols["path_bytes"][j] if self.local and "path_bytes" in cols else None
        return self._prefix + (cols["path"][j] if raw is None else os.fsdecode(raw))

    def wants(self, cols: dict[str, list[Any]], j: int) -> bool:
        """Decide once whether file ``j`` must be written."""
        if j in self._decided:
            return self._decided[j]
        decision = self._decide(cols, j)
        self._decided[j] = decision
        return decision

    def pending(self, j: int) -> bool:
        return self._decided.get(j, False)

    def _decide(self, cols: dict[str, list[Any]], j: int) -> bool:
        if self.overwrite == "always" or self.fresh:
            return True
        dest = self.dest(cols, j)
        try:
            if self.local:
                st = os.lstat(dest)
                exists, is_file, size = True, stat.S_ISREG(st.st_mode), st.st_size
            else:
                info = self.fs.info(dest)
                exists, is_file, size = True, info.get("type") == "file", int(info.get("size") or 0)
        except FileNotFoundError:
            return True
        except OSError:
            return True
        if not exists:
            return True
        if self.overwrite == "never":
            self.result.kept += 1
            return False
        if is_file and size == cols["size"][j] and self._hash_of(dest) == cols["hash"][j]:
            self.result.identical += 1
            if self.local and not self.dry_run:
                _apply_meta(dest, cols, j)
            return False
        return True

    def _hash_of(self, dest) -> str | None:
        if self.content_id is not None:
            try:
                return self.content_id(self.fs, dest, self.local)
            except (OSError, ValueError):
                return None
        try:
            h = blake3.blake3()
            if self.local:
                h.update_mmap(dest)
            else:
                with self.fs.open(dest, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
            return h.hexdigest()
        except (OSError, ValueError):
            return None

    def write_bytes(self, cols: dict[str, list[Any]], j: int, data: bytes | memoryview) -> None:
        dest = self.dest(cols, j)
        try:
            if self.sparse and len(data) >= SPARSE_MIN:
                # A format 2 file of one chunk (1-8 MiB) is a single blob: holes too.
                tmp = self._tmp_name(dest)
                out = self._create_local(tmp, len(data))
                try:
                    with out:
                        out.write(data)
                except BaseException:
                    self._discard(tmp)
                    raise
                self._finish_local(tmp, dest, cols, j)
            elif self.local:
                # Descriptor-based calls: one path lookup for the create, one
                # for the rename; mode, owner and mtime are set on the open fd.
                # Six syscalls a file (open, write, fchmod, futimens, close,
                # rename); the kernel's part (the new inode and its folder
                # entries) is most of a small file's restore.
                tmp = self._tmp_name(dest)
                fd = os.open(tmp, _CREATE, 0o600)
                try:
                    n = os.write(fd, data)
                    if n < len(data):           # a short write (a signal, a full disk on the way)
                        view = memoryview(data)[n:]
                        while view:
                            view = view[os.write(fd, view):]
                    _apply_meta_fd(fd, cols, j)
                except BaseException:
                    os.close(fd)
                    self._discard(tmp)
                    raise
                os.close(fd)
                self._put_in_place(tmp, dest)
            else:
                self.fs.pipe_file(dest, bytes(data))
        except OSError as exc:
            self.result.errors.append((cols["path"][j], f"cannot write: {exc.strerror or exc}"))
            return
        self.result.written += 1
        self.result.bytes_written += len(data)
        self._progress(len(data))

    def _progress(self, nbytes: int) -> None:
        pending = self._unreported
        pending[0] += 1
        pending[1] += nbytes
        if pending[0] >= PROGRESS_EVERY:
            self.flush_progress()

    def flush_progress(self) -> None:
        if self._unreported[0]:
            progress.advance("restore", *self._unreported)
            self._unreported = [0, 0]

    def _tmp_name(self, dest: str) -> str:
        self._counter += 1
        return temp_name(dest.rpartition("/")[0], self._token, self._counter)

    def _put_in_place(self, tmp: str, dest: str) -> None:
        try:
            os.replace(tmp, dest)
        except OSError:
            self._discard(tmp)
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise IsADirectoryError(21, "a folder is in the way", dest) from None
            raise

    def write_stream(self, cols: dict[str, list[Any]], j: int, src_fs: AbstractFileSystem, src_path: str,
                     expected: str) -> bool:
        dest = self.dest(cols, j)
        hasher = blake3.blake3()
        tmp = self._tmp_name(dest)
        out = self._create_local(tmp, cols["size"][j]) if self.local else self.fs.open(tmp, "wb")
        written = 0
        try:
            with src_fs.open(src_path, "rb") as src, out:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
        except BaseException:
            self._discard(tmp)
            raise
        self.result.bytes_read += written
        if hasher.hexdigest() != expected:
            self._discard(tmp)
            return False
        try:
            if self.local:
                self._finish_local(tmp, dest, cols, j)
            else:
                self.fs.mv(tmp, dest)
        except OSError as exc:
            self._discard(tmp)
            self.result.errors.append((cols["path"][j], f"cannot write: {exc.strerror or exc}"))
            return True
        self.result.written += 1
        self.result.bytes_written += written
        progress.advance("restore", 1, written)
        return True

    def copy_from(self, cols: dict[str, list[Any]], src_j: int, j: int) -> None:
        src, dest = self.dest(cols, src_j), self.dest(cols, j)
        try:
            if self.local:
                tmp = self._tmp_name(dest)
                with open(src, "rb") as fsrc, self._create_local(tmp, cols["size"][j]) as fdst:
                    shutil.copyfileobj(fsrc, fdst, CHUNK)
                self._finish_local(tmp, dest, cols, j)
            else:
                self.fs.copy(src, dest)
        except OSError as exc:
            self.result.errors.append((cols["path"][j], f"cannot write: {exc.strerror or exc}"))
            return
        self.result.written += 1
        self.result.bytes_written += cols["size"][j]

    def _create_local(self, tmp: str, size: int):
        if self.sparse and size >= SPARSE_MIN:
            return SparseFile(tmp)
        return _create_private(tmp)

    def _finish_local(self, tmp, dest, cols: dict[str, list[Any]], j: int):
        try:
            _apply_meta(tmp, cols, j)
        except BaseException:
            self._discard(tmp)
            raise
        self._put_in_place(tmp, dest)

    def _discard(self, tmp) -> None:
        try:
            if self.local:
                os.unlink(tmp)
            else:
                self.fs.rm_file(tmp)
        except OSError:
            pass


class SparseFile:
    """A new owner-only file that leaves holes where whole blocks are zeros.

    Written sequentially: each ``HOLE_BLOCK`` of zeros is skipped with a seek
    instead of written, and ``close`` sets the final size (a trailing run of
    zeros is a hole too). A 1 GiB file that was sparse in the source stays
    small on disk; its content reads back the same, which restore has
    verified by hash before the file gets its real name.
    """

    def __init__(self, tmp: str) -> None:
        self._f = _create_private(tmp)
        self._size = 0

    def write(self, data: bytes) -> int:
        # bytes == bytes is one memcmp (~13 GB/s here); memoryview == memoryview
        # compares item by item (~0.4 GB/s), so compare bytes.
        data = data if isinstance(data, bytes) else bytes(data)
        n = len(data)
        if n <= CHUNK and data == _ZEROS[:n]:
            self._f.seek(n, os.SEEK_CUR)        # a whole chunk of zeros: one seek
        else:
            for start in range(0, n, HOLE_BLOCK):
                block = data[start:start + HOLE_BLOCK]
                if block == _ZERO_BLOCK[:len(block)]:
                    self._f.seek(len(block), os.SEEK_CUR)
                else:
                    self._f.write(block)
        self._size += n
        return n

    def close(self) -> None:
        try:
            self._f.truncate(self._size)
        finally:
            self._f.close()

    def __enter__(self) -> SparseFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def _create_private(tmp: str):
    """A new file object for ``tmp``, owner-only, never following a symlink there."""
    fd = os.open(tmp, _CREATE, 0o600)
    return os.fdopen(fd, "wb")


# -- temporary names ---------------------------------------------------------------

def new_token() -> str:
    """``<writer>-<8 hex>``: unique per TargetWriter (batches run in threads of one process)."""
    return f"{liveness.this_process().tag()}-{uuid.uuid4().hex[:8]}"


def temp_name(folder: str, token: str, n: int) -> str:
    # Not derived from the file's name: that may already be 255 bytes long.
    return f"{folder}/.kf-tmp-{token}-{n}"


_TEMP_RE = re.compile(
    rf"^\.kf-tmp-(?P<writer>{liveness.TAG_PATTERN.pattern})-[0-9a-f]{{8}}-\d+$"
    # written by earlier versions: files, symlinks (finish), remote targets
    r"|^\.kf-tmp-[0-9a-f]{8}-\d+$|^\.kf-tmp-[0-9a-f]{12}$|^.+\.kf-tmp-[0-9a-f]{32}$")


def temp_writer(name: str) -> tuple[bool, liveness.ProcessId | None]:
    """(is this one of keepflow's temporary names, the process that wrote it if named)."""
    m = _TEMP_RE.match(name)
    if m is None:
        return False, None
    writer = m["writer"]
    return True, liveness.parse_tag(writer) if writer else None


def remove_stale_temporaries(fs: AbstractFileSystem, root: str, folders: Iterable[str],
                             now: float | None = None) -> list[str]:
    """Remove keepflow's stale temporary files in ``folders`` (relative to
    ``root``; "" is the root) of a restore target; returns their paths.

    Local targets: one ``scandir`` per folder. Object stores are skipped: a
    write there is one PUT or a multipart upload that stays invisible until
    it completes, so an interrupted one leaves no object. Other remote
    targets (SFTP, ...): one listing of the target.
    """
    now = time.time() if now is None else now
    removed = []
    if storage.is_local(fs):
        for folder in sorted(set(folders)):
            path = os.path.join(root, folder) if folder else root
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for entry in entries:
                if ".kf-tmp-" not in entry.name:
                    continue
                ours, writer = temp_writer(entry.name)
                if not ours:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                        continue
                    if liveness.stale(writer, st.st_mtime, now):
                        os.unlink(entry.path)
                        removed.append(entry.path)
                except OSError:
                    continue
        return removed
    if storage.is_object_store(fs):
        return removed
    wanted = {storage.join(root, f) if f else root for f in folders}
    try:
        listing = storage.list_files(fs, root)
    except OSError:
        return removed        # the batches will meet the same problem and report it per file
    for info in listing:
        name = info["name"]
        parent, _, base = name.rpartition("/")
        ours, writer = temp_writer(base)
        if not ours or parent not in wanted or info.get("type") not in (None, "file", "link"):
            continue
        if liveness.stale(writer, storage.info_mtime_ns(info) / 1e9 or now, now):
            try:
                fs.rm_file(name)
                removed.append(name)
            except OSError:
                continue
    return removed


def exact_mtime(mtime_ns: int, exact: int | str | None) -> int:
    """The entry's true mtime: ``mtime_ns_exact`` when the manifest had to clamp ``mtime_ns``."""
    return mtime_ns if exact is None else int(exact)


def _set_xattrs(where, cols: dict[str, list[Any]], j: int) -> None:
    """Extended attributes of file ``j`` (after chown: it clears security.capability).

    A failure fails this file (an OSError the writer reports), never the batch.
    """
    failures = xattrs.apply(where, cols["xattrs"][j]) if "xattrs" in cols else []
    if failures:
        raise OSError(0, "; ".join(failures))


def _apply_meta_fd(fd, cols: dict[str, list[Any]], j: int) -> None:
    if IS_ROOT:
        uid, gid = cols["uid"][j], cols["gid"][j]
        if uid is not None and (uid, gid) != _OWN_IDS:
            try:
                os.fchown(fd, uid, gid)
            except OSError:
                pass
    os.fchmod(fd, stat.S_IMODE(cols["mode"][j]))
    attrs = cols.get("xattrs")
    if attrs is not None and attrs[j]:
        _set_xattrs(fd, cols, j)
    mtime = exact_mtime(cols["mtime_ns"][j], cols["mtime_ns_exact"][j])
    os.utime(fd, ns=(mtime, mtime))


def _apply_meta(path: str, cols: dict[str, list[Any]], j: int) -> None:
    if IS_ROOT and cols["uid"][j] is not None:
        try:
            os.chown(path, cols["uid"][j], cols["gid"][j])
        except OSError:
            pass
    os.chmod(path, stat.S_IMODE(cols["mode"][j]))
    _set_xattrs(path, cols, j)
    mtime = exact_mtime(cols["mtime_ns"][j], cols["mtime_ns_exact"][j])
    os.utime(path, ns=(mtime, mtime))
