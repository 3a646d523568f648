"""The few calls keepflow makes to storage, in one place.

fsspec is our backend (restic's tiny backend interface, but provided by the
fsspec implementations): a URL or plain path becomes ``(fs, root)`` and every
other module goes through the helpers here, so that the write-once rule and
error classification live in one file.

Write-once: repository data is never rewritten. How that is made atomic
depends on the backend:

* local disk: write to a temporary name in the same folder, then ``os.link``
  it to the final name; ``link`` fails if the name exists, so a concurrent
  writer can never be overwritten and a crash never leaves a half-written
  file under the real name;
* SFTP: temporary name then ``rename`` (SFTP v3 rename refuses to replace);
* S3 and Azure Blob: a conditional create (``If-None-Match: *`` on the PUT,
  on completing a multipart upload, on committing a block list): the server
  refuses to replace an existing name, so of two writers on different
  machines exactly one wins and the other is told so (412/409 -> False).
  Azure has always honoured it; AWS S3 since August 2024; other S3 servers
  are probed once per filesystem instance and bucket (``create_only``),
  because some ignore the header and would silently replace;
* other object stores (GCS, memory), and S3 servers that ignore the header:
  check existence, then PUT (a PUT itself is atomic). Two writers can then
  both "win" the same name; for content-hash names they wrote the same
  bytes, and gc's grace period is the second line of defence for the rest.

Providers differ where keepflow cannot afford it, so this module evens them
out: SFTP (sshfs) gets a small subclass that honours byte ranges in
``cat_file``, creates parent folders when a file is opened for writing (as
object stores do), and renames without replacing; remote endpoints are
probed once per process so an unreachable host fails in seconds, not after
a minute of library retries; and every provider's failures become one
``StorageError`` line that names the provider and the fix
(``describe_error``).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from . import liveness
from .errors import RepositoryFullError, RepositoryWriteError, StorageError, UsageError

if TYPE_CHECKING:
    from _typeshed import SupportsRead
    from fsspec import AbstractFileSystem

LOCAL_PROTOCOLS = {"file", "local"}


def is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Return ``(fs, root)`` for a URL or plain path.

    A plain path means local disk and is made absolute, so that the same
    repository is reached from any working directory. Remote endpoints are
    checked for reachability (one TCP connect per endpoint and process).
    """
    if not url:
        raise UsageError("empty location; give a path or a URL such as s3://bucket/repo")
    if "://" not in url and not url.startswith("memory:"):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(url))
    scheme = url.split("://", 1)[0].lower()
    from .storage_config import merged

    options = merged(url, storage_options)   # ~/.config/keepflow/storage.toml, then explicit options
    try:
        if scheme in SFTP_SCHEMES:
            _probe(url, scheme, options)
            fs, root = _open_sftp(url, options)
        else:
            fs, root = url_to_fs(url, **options)
            if scheme in AZURE_SCHEMES:
                _shorten_azure_backoff(fs)
            _probe(url, scheme, options, fs)
    except (ImportError, ValueError) as exc:
        raise UsageError(
            f"unknown or unavailable storage scheme {scheme!r} in {url}: {exc}; "
            "use a local path or an fsspec URL whose package is installed"
        ) from None
    except StorageError:
        raise
    except Exception as exc:
        if is_storage_failure(exc):
            raise describe_error(url, exc) from None
        raise
    return fs, root.rstrip("/") or root


# -- SFTP -------------------------------------------------------------------------

SFTP_SCHEMES = {"sftp", "ssh"}
_sftp_class = None


def _sftp_filesystem_class():
    """sshfs's SSHFileSystem with the three fixes keepflow needs (built once)."""
    global _sftp_class
    if _sftp_class is not None:
        return _sftp_class
    from fsspec.asyn import sync_wrapper
    from sshfs import SSHFileSystem

    class KeepflowSFTPFileSystem(SSHFileSystem):
        """SSHFileSystem that honours ranges, creates parents on write, renames with and without replacing."""

        async def _cat_file(self, path: str, start=None, end=None, **kwargs):
            if start is None and end is None:
                return await super()._cat_file(path, **kwargs)
            path = self._strip_protocol(path)
            async with self._pool.get() as channel, channel.open(path, "rb") as f:
                if (start is not None and start < 0) or (end is not None and end < 0):
                    size = (await channel.stat(path)).size
                    start = size + start if start is not None and start < 0 else start
                    end = size + end if end is not None and end < 0 else end
                start = start or 0
                if start:
                    await f.seek(start)
                if end is None:
                    return await f.read()
                return await f.read(max(0, end - start))

        def _open(self, path: str, mode: str = "rb", *args, **kwargs):
            if any(m in mode for m in "wax"):
                parent = self._parent(path)
                if parent:
                    self.makedirs(parent, exist_ok=True)
            return super()._open(path, mode, *args, **kwargs)

        async def _rename_noreplace(self, src, dst):
            """SFTP v3 rename: the server refuses to replace an existing name.

            OpenSSH refuses with a bare SSH_FX_FAILURE, which sshfs leaves as an
            asyncssh error: make it an OSError, so callers can check whether the
            name is now taken (a racing writer won) and say False.
            """
            from asyncssh.sftp import SFTPError, SFTPNoSuchFile, SFTPPermissionDenied

            async with self._pool.get() as channel:
                try:
                    await channel.rename(src, dst)
                except SFTPNoSuchFile as exc:
                    raise FileNotFoundError(errno.ENOENT, f"{src}: {exc.reason}") from exc
                except SFTPPermissionDenied as exc:
                    raise PermissionError(errno.EACCES, f"{dst}: {exc.reason}") from exc
                except SFTPError as exc:
                    raise OSError(errno.EIO, f"cannot rename {src} to {dst}: {exc.reason}") from exc

        rename_noreplace = sync_wrapper(_rename_noreplace)

        async def _rename_replace(self, src, dst) -> None:
            """OpenSSH's posix-rename extension: replaces ``dst`` atomically (rename(2) on the server)."""
            async with self._pool.get() as channel:
                await channel.posix_rename(src, dst)

        rename_replace = sync_wrapper(_rename_replace)

    _sftp_class = KeepflowSFTPFileSystem
    return _sftp_class


def _open_sftp(url: str, options: dict):
    """Open (or reuse) an SFTP connection; a cached one whose connection dropped is replaced.

    fsspec caches filesystem instances, and an sshfs instance keeps one SSH
    connection: after the server restarted, every later call (a Prefect
    retry included) would fail on the dead connection without this check.
    """
    cls = _sftp_filesystem_class()
    kwargs = cls._get_kwargs_from_urls(url)
    kwargs.update(options)
    fs = cls(**kwargs)
    client = getattr(fs, "_client", None)
    if client is not None and getattr(client, "is_closed", lambda: False)():
        cls._cache.pop(getattr(fs, "_fs_token", None), None)
        fs = cls(**kwargs)
    return fs, cls._strip_protocol(url)


# -- Azure -----------------------------------------------------------------------

AZURE_INITIAL_BACKOFF = 1     # seconds; the SDK's default is 15 (then +3, +9, +27)
AZURE_INCREMENT_BASE = 2


def _shorten_azure_backoff(fs: AbstractFileSystem) -> None:
    """Retry sooner than the Azure SDK's default (15 s, 18 s, 24 s: over a minute).

    adlfs gives no way to pass a retry policy, so the SDK's own policy object
    is adjusted in place: the same three retries, after about 1, 3 and 5 s.
    A provider that is down is then reported in seconds and Prefect's task
    retries (which can wait longer) take over.
    """
    try:
        policy = fs.service_client._config.retry_policy
    except AttributeError:
        return
    if getattr(policy, "initial_backoff", None) == 15 and getattr(policy, "increment_base", None) == 3:
        policy.initial_backoff = AZURE_INITIAL_BACKOFF
        policy.increment_base = AZURE_INCREMENT_BASE


# -- reachability ---------------------------------------------------------------

_reachable: set[tuple[str, int]] = set()
_reachable_lock = threading.Lock()
PROBE_TIMEOUT = 5.0


def _endpoint(url: str, scheme: str, options: dict, fs: AbstractFileSystem | None = None) -> tuple[str, int] | None:
    """The host and port a remote URL talks to, when it can be known cheaply."""
    if scheme in SFTP_SCHEMES:
        parts = urlsplit(url)
        return (parts.hostname, parts.port or 22) if parts.hostname else None
    endpoint = None
    if scheme in S3_SCHEMES:
        endpoint = ((options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    elif scheme in AZURE_SCHEMES:
        conn = options.get("connection_string") or getattr(fs, "connection_string", None) \
            or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn:
            fields = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
            endpoint = fields.get("BlobEndpoint")
        endpoint = endpoint or options.get("account_url") or getattr(fs, "account_url", None)
    if not endpoint:
        return None  # the provider's default public endpoint: not probed
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _probe(url: str, scheme: str, options: dict, fs: AbstractFileSystem | None = None) -> None:
    """Fail in seconds when the endpoint does not accept connections.

    Without this an unreachable endpoint costs the libraries' own retries
    (about a minute for Azure). One TCP connect per endpoint per process.
    """
    target = _endpoint(url, scheme, options, fs)
    if target is None or target in _reachable:
        return
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        raise describe_error(url, ConnectionError(f"cannot connect to {target[0]}:{target[1]}: "
                                                  f"{exc.strerror or exc}")) from None
    with _reachable_lock:
        _reachable.add(target)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if root else "/".join(parts)


def write_once(fs: AbstractFileSystem, path: str, data: bytes | bytearray) -> bool:
    """Write ``data`` at ``path`` unless something is already there.

    Returns True when this call created the object. See the module docstring
    for how each backend makes this atomic. A full disk raises
    RepositoryFullError (never retried, its own exit code).
    """
    try:
        return _write_once(fs, path, data)
    except OSError as exc:
        if is_no_space(exc):
            raise write_failure(f"cannot write {path}: {exc}", exc) from exc
        raise


def _write_once(fs: AbstractFileSystem, path: str, data: bytes | bytearray) -> bool:
    if is_local(fs):
        return _local_write_once(path, data)
    if is_object_store(fs) and create_only(fs, path):
        # No HEAD first: the server decides, in the PUT itself.
        return _create_object(fs, path, data)
    if fs.exists(path):
        return False
    parent = path.rsplit("/", 1)[0]
    if parent and not is_object_store(fs):   # object stores have no folders to create
        fs.makedirs(parent, exist_ok=True)
    if hasattr(fs, "rename_noreplace"):   # SFTP: temporary name, then a rename that never replaces
        tmp = tmp_name(path)
        fs.pipe_file(tmp, data)
        try:
            fs.rename_noreplace(tmp, path)
        except OSError:
            fs.rm_file(tmp)
            if fs.exists(path):
                return False
            raise
        return True
    fs.pipe_file(path, data)
    return True


def write_stream_once(fs: AbstractFileSystem, path: str, fileobj: SupportsRead[bytes],
                      chunk: int = 8 * 1024 * 1024) -> bool:
    """``write_once`` for content too big to hold in memory: copy ``fileobj`` in chunks.

    Same atomicity rules: local disk and SFTP write a temporary name and
    publish it without replacing; object stores complete a multipart upload
    atomically, so they are written under the final name (create-only where
    the provider has it, see ``create_only``).
    """
    try:
        return _write_stream_once(fs, path, fileobj, chunk)
    except OSError as exc:
        if is_no_space(exc):
            raise write_failure(f"cannot write {path}: {exc}", exc) from exc
        raise


def _write_stream_once(fs: AbstractFileSystem, path: str, fileobj: SupportsRead[bytes], chunk: int) -> bool:
    def copy(out) -> None:
        while block := fileobj.read(chunk):
            out.write(block)

    if is_local(fs):
        if os.path.exists(path):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as out:
                copy(out)
                out.flush()
                make_durable(out.fileno(), out.tell())
        except BaseException:       # a partial copy after a full disk would hold the space
            _unlink_quietly(tmp)
            raise
        return publish_local_tmp(tmp, path)
    if is_object_store(fs):
        return _stream_object_once(fs, path, fileobj, chunk)
    if fs.exists(path):
        return False
    if not hasattr(fs, "rename_noreplace"):
        with fs.open(path, "wb") as out:
            copy(out)
        return True
    tmp = tmp_name(path)
    with fs.open(tmp, "wb") as out:
        copy(out)
    try:
        fs.rename_noreplace(tmp, path)
    except OSError:
        fs.rm_file(tmp)
        if fs.exists(path):
            return False
        raise
    return True


def replace_atomically(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path``, replacing it, so that a reader sees the old bytes or the new, never a part.

    For the few files keepflow rewrites (a lease's refresh). A plain
    ``pipe_file`` on local disk or SFTP truncates, then writes: a reader in
    between gets an empty file (measured: 15% of reads of a lease refreshed
    every 2 ms). Object stores: a PUT is atomic. Local disk: a temporary name,
    then ``os.replace``; SFTP: a temporary name, then OpenSSH's posix-rename.
    """
    if is_local(fs):
        tmp = _write_local_tmp(path, data, durable=False)     # a lease: a liveness hint, rewritten often
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return
    if hasattr(fs, "rename_replace"):
        tmp = tmp_name(path)
        fs.pipe_file(tmp, data)
        try:
            fs.rename_replace(tmp, path)
            return
        except BaseException as exc:
            try:
                fs.rm_file(tmp)
            except Exception:
                pass
            if "SFTPOpUnsupported" not in _names(exc):
                raise
            # A server without the extension: a plain rewrite beats no refresh.
    fs.pipe_file(path, data)


def _local_write_once(path: str, data: bytes | bytearray) -> bool:
    if os.path.exists(path):
        return False
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return publish_local_tmp(_write_local_tmp(path, data), path)


def write_once_parts(fs: AbstractFileSystem, path: str, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
    """``write_once`` of the concatenation of ``parts`` (a format 2 pack's blobs, header, footer).

    Local disk writes the parts with ``os.writev`` into the temporary file, never
    joining them: the join copied every 16 MiB pack once more, into fresh pages
    (bench.format2_profile stages: join + write 2.49, writev 2.33 ms of CPU per
    MiB at load 5.6). Elsewhere the parts are joined for the one PUT (or upload)
    the backends make anyway.
    """
    if not is_local(fs):
        return write_once(fs, path, b"".join(parts))
    try:
        if os.path.exists(path):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tmp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)     # as open(tmp, "wb")
            try:
                _writev_all(fd, parts)
                make_durable(fd, sum(len(p) for p in parts))
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return publish_local_tmp(tmp, path)
    except OSError as exc:
        if is_no_space(exc):
            raise write_failure(f"cannot write {path}: {exc}", exc) from exc
        raise


_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16


def _writev_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write every byte of ``parts`` in order: at most ``_IOV_MAX`` buffers a call, short writes resumed."""
    views = [memoryview(p) for p in parts if len(p)]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i: i + _IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while n:
            size = len(views[i])
            if n < size:
                views[i] = views[i][n:]
                break
            n -= size
            i += 1


def _write_local_tmp(path: str, data: bytes | bytearray, durable: bool = True) -> str:
    """Write ``data`` under a new temporary name beside ``path``; returns that name.

    ``durable``: on the disk before the caller publishes it (``make_durable``).
    On failure the partial copy is removed: after a full disk it would hold the space.
    """
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                make_durable(f.fileno(), len(data))
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


DROP_FROM_CACHE_BYTES = 1024 * 1024
_fdatasync = getattr(os, "fdatasync", os.fsync)      # macOS has no fdatasync


def make_durable(fd: int, size: int) -> None:
    """Put a written repository file on the disk before its name is published; drop a large one from the cache.

    Durable: a snapshot's manifest is written last and must never name a pack or
    index file that a power cut took back (restic syncs the files of a local
    repository too). Dropped from the page cache once the disk has it (files of
    ``DROP_FROM_CACHE_BYTES`` or more: packs, large index files): a backup never
    reads back what it wrote, and a page cache that keeps growing costs fresh pages;
    on a VM each one is a host page fault. Writing the 2,000 MiB bench tree's packs
    cost 7-8 s of system time buffered, 1 s synced and dropped (bench/RESULTS.md,
    "Pack writes"); the sync itself waits for the disk, not the CPU.
    """
    _fdatasync(fd)
    if size >= DROP_FROM_CACHE_BYTES and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- create-only writes on object stores -----------------------------------------

# AWS answers 409 ConditionalRequestConflict when a racing write on the same
# name is still in flight and documents "retry": the retry then gets 412
# (the other writer won) or succeeds (it failed).
CONFLICT_RETRIES = 3
_AZURE_BLOB_SCHEMES = {"az", "abfs", "abfss"}      # not "adl": Data Lake Gen1 has no conditional create
_create_only_lock = threading.Lock()


def create_only(fs: AbstractFileSystem, path: str) -> bool:
    """True when ``fs`` itself refuses to replace an existing object at ``path``.

    Azure Blob: always (conditional headers are part of the Blob API, and the
    SDK's default upload relies on them). AWS S3: always (conditional writes
    since August 2024). Any other S3 endpoint is probed, because S3 servers
    differ: SeaweedFS before 3.97 accepted ``If-None-Match: *`` and replaced
    the object anyway. The answer is kept per filesystem instance and bucket,
    so a process probes once (fsspec caches instances).
    """
    protocols = _protocols(fs)
    if protocols & _AZURE_BLOB_SCHEMES:
        return True
    if not protocols & S3_SCHEMES:
        return False
    bucket = path.split("/", 1)[0]
    known = fs.__dict__.setdefault("_keepflow_create_only", {})
    if bucket not in known:
        with _create_only_lock:
            if bucket not in known:
                known[bucket] = _is_aws_endpoint(fs) or _probe_create_only(fs, path)
    return known[bucket]


def _is_aws_endpoint(fs: AbstractFileSystem) -> bool:
    try:
        host = urlsplit(fs.s3.meta.endpoint_url).hostname or ""
    except Exception:
        return False
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _probe_create_only(fs: AbstractFileSystem, path: str) -> bool:
    """Create a throwaway name beside ``path`` twice: the second must be refused.

    A ``.tmp-`` name, so listings skip it and, should the removal fail, the
    next gc removes it. Three requests, once per process and bucket.
    """
    probe = tmp_name(path)
    try:
        try:
            fs.pipe_file(probe, b"probe", mode="create")
        except Exception as exc:
            if is_storage_failure(exc) and classify(exc) == "other":
                return False          # the header is rejected (501 NotImplemented and the like)
            raise
        try:
            fs.pipe_file(probe, b"probe", mode="create")
        except Exception as exc:
            if is_exists_error(exc):
                return True
            if is_storage_failure(exc) and classify(exc) == "other":
                return False
            raise
        return False                  # accepted twice: the header is ignored
    finally:
        try:
            fs.rm_file(probe)
        except Exception:
            pass


def is_exists_error(exc: BaseException) -> bool:
    """True when a create-only write was refused because the name is taken.

    S3 answers 412 PreconditionFailed; s3fs makes that a FileExistsError only
    when the reply names the condition (AWS does, SeaweedFS 4.48 does not:
    then it is an OSError(EINVAL) caused by the ClientError). Azure answers
    409 BlobAlreadyExists (adlfs: FileExistsError) or 412 ConditionNotMet.
    """
    for e in _exception_chain(exc):
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response and (     # botocore ClientError
                response["Error"].get("Code") == "PreconditionFailed"
                or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
            return True
        if getattr(e, "error_code", None) in ("BlobAlreadyExists", "ConditionNotMet"):
            return True
    return False


def _is_create_conflict(exc: BaseException) -> bool:
    for e in _exception_chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response and (
                response["Error"].get("Code") == "ConditionalRequestConflict"
                or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 409):
            return True
    return False


def _create_object(fs: AbstractFileSystem, path: str, data: bytes | bytearray) -> bool:
    """One conditional PUT: True if it created ``path``, False if the name was taken."""
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as exc:
            if is_exists_error(exc):
                return False
            if attempt < CONFLICT_RETRIES and _is_create_conflict(exc):
                time.sleep(0.1 * 2 ** attempt)
                continue
            raise
    raise AssertionError("unreachable")


def _stream_object_once(fs: AbstractFileSystem, path: str, fileobj, chunk: int) -> bool:
    """``write_stream_once`` on an object store: one multipart upload under the final name.

    The existence check first is only a shortcut (it saves uploading
    gigabytes that would be refused at the end); where the provider has it,
    the upload completes create-only and a refusal aborts it, so no parts
    are left behind. Content that fits in one chunk is a single PUT (s3fs
    would write an empty file with a plain, unconditional PUT).
    """
    if fs.exists(path):
        return False
    first = fileobj.read(chunk)
    second = fileobj.read(chunk)
    if not second:
        return write_once(fs, path, first)
    strong = create_only(fs, path)
    out = fs.open(path, "xb" if strong else "wb")
    try:
        out.write(first)
        out.write(second)
        while block := fileobj.read(chunk):
            out.write(block)
    except BaseException:
        discard_upload(out)
        raise
    try:
        out.close()
    except Exception as exc:
        discard_upload(out)
        if strong and is_exists_error(exc):
            return False
        raise
    return True


def discard_upload(out: Any) -> None:
    """Abandon an upload that must not complete (s3fs aborts its multipart upload)."""
    try:
        if hasattr(out, "discard"):
            out.discard()
    except Exception:
        pass
    try:
        out.closed = True     # never commit it later (close() or the garbage collector)
    except AttributeError:
        pass


NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_no_space(exc: BaseException) -> bool:
    """True when a full disk or an exhausted quota is anywhere in the cause chain."""
    return any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in _exception_chain(exc))


def write_failure(message: str, exc: BaseException) -> RepositoryWriteError:
    """The error for a failed repository write: RepositoryFullError when space ran out."""
    if is_no_space(exc):
        return RepositoryFullError(f"{message.split(': ', 1)[0]}: no space left on the repository's storage; "
                                   "free some space (or move the repository), then run again: "
                                   "what was stored so far is kept and reused")
    return RepositoryWriteError(message)


def publish_local_tmp(tmp: str, path: str) -> bool:
    """Give a fully written temporary file its final name, never replacing."""
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    finally:
        os.unlink(tmp)
    return created


OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "az", "abfs", "abfss", "adl", "gs", "gcs"}


def is_object_store(fs: AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & OBJECT_STORE_PROTOCOLS)


def _protocols(fs: AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def list_files(fs: AbstractFileSystem, folder: str) -> list[dict]:
    """All files below ``folder`` with their info dicts; missing folder -> []."""
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return []
    return [dict(info, name=name) for name, info in found.items() if info.get("type") != "directory"]


def info_mtime_ns(info: dict) -> int:
    """One normaliser for the different fsspec ``info`` dicts (dvc's Meta.from_info idea)."""
    for key in ("mtime", "LastModified", "last_modified", "modified", "created", "creation_time"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            return int(value.timestamp() * 1e9)
        if isinstance(value, str):
            try:
                return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
        return int(float(value) * 1e9)
    return 0


def tmp_name(path: str) -> str:
    """A temporary name beside ``path`` that names its writer (host, pid, start, boot).

    A rerun on the same host can then remove a dead writer's partial copy at
    once (``stale_temporaries``) instead of an hour later: after killed
    replicates, such copies held up to a GiB each on the replica.
    """
    return f"{path}.tmp-{liveness.this_process().tag()}-{uuid.uuid4().hex[:8]}"


_TMP_WRITER = re.compile(rf"\.tmp-({liveness.TAG_PATTERN.pattern})-[0-9a-f]{{8}}$")


def stale_temporaries(fs: AbstractFileSystem, root: str, folders: Iterable[str], older_than_s: float) -> list[str]:
    """Temporary files (``.tmp-`` names, and everything in ``tmp/``) left by
    writes that were interrupted, never data: those older than ``older_than_s``,
    and at once those whose writer (named by ``tmp_name``) is known to be gone."""
    import time

    now = time.time()
    limit_ns = (now - older_than_s) * 1e9
    found = []
    for folder in folders:
        for info in list_files(fs, join(root, folder)):
            name = info["name"]
            base = name.rsplit("/", 1)[-1]
            if folder != "tmp" and ".tmp-" not in base:
                continue
            mtime_ns = info_mtime_ns(info)
            m = _TMP_WRITER.search(base)
            writer = liveness.parse_tag(m.group(1)) if m else None
            if (writer is not None and liveness.gone(writer)) or 0 < mtime_ns < limit_ns:
                found.append(name)
    return found


# -- errors ------------------------------------------------------------------------

S3_SCHEMES = {"s3", "s3a"}
AZURE_SCHEMES = {"az", "abfs", "abfss", "adl"}
PROVIDER_NAMES = {**{s: "S3" for s in S3_SCHEMES}, **{s: "Azure Blob" for s in AZURE_SCHEMES},
                  **{s: "SFTP" for s in SFTP_SCHEMES}, "gs": "Google Cloud Storage", "gcs": "Google Cloud Storage",
                  "memory": "memory", "file": "local disk", "local": "local disk"}

CREDENTIAL_FIXES = {
    "S3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass key/secret in the storage options",
    "Azure Blob": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY), "
                  "or pass connection_string or account_name/account_key in the storage options",
    "SFTP": "check the user in the URL and that your SSH key (~/.ssh/id_*, ssh-agent, or client_keys in the "
            "storage options) is in the server's authorized_keys",
}
ENDPOINT_FIXES = {
    "S3": "check the endpoint (AWS_ENDPOINT_URL or client_kwargs.endpoint_url) and that the service is running",
    "Azure Blob": "check BlobEndpoint in the connection string (or account_url) and that the service is running",
    "SFTP": "check the host and port in the URL and that the SSH server is running",
}


def provider_name(url: str) -> str:
    if "://" not in url:
        return "memory" if url.startswith("memory:") else "local disk"
    scheme = url.split("://", 1)[0].lower()
    return PROVIDER_NAMES.get(scheme, scheme)


def _container(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""


def _exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for e in _exception_chain(exc) for cls in type(e).__mro__}


def _first_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.strip().splitlines()[:1]) if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


_CONNECTION_NAMES = {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                     "ServiceRequestError", "gaierror", "ConnectionLost", "ServerDisconnectedError",
                     "ClientOSError", "TimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                     "SFTPNoConnection", "SFTPConnectionLost", "DisconnectError"}
_AUTH_NAMES = {"ClientAuthenticationError", "PermissionDenied", "NoCredentialsError", "PartialCredentialsError",
               "CredentialRetrievalError"}
_AUTH_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationFailure", "AuthenticationFailed",
               "InvalidAuthenticationInfo", "Forbidden", "AccessDenied", "Permission denied", "403")
_NO_CONTAINER = ("NoSuchBucket", "ContainerNotFound", "specified bucket does not exist",
                 "specified container does not exist")


def classify(exc: BaseException) -> str:
    """``credentials``, ``unreachable``, ``no-container``, ``not-found``, ``permission`` or ``other``."""
    names = _names(exc)
    text = " ".join(f"{type(e).__name__} {e} {getattr(e, 'error_code', '') or ''}" for e in _exception_chain(exc))
    if any(code in text for code in _NO_CONTAINER):
        return "no-container"
    if names & _AUTH_NAMES:
        return "credentials"
    if names & _CONNECTION_NAMES and "PermissionError" not in names:
        return "unreachable"
    status = getattr(exc, "status_code", None)
    if isinstance(exc, PermissionError) or status in (401, 403) or (
            "HttpResponseError" in names and any(code in text for code in _AUTH_CODES)):
        return "permission"
    if isinstance(exc, FileNotFoundError) or "ResourceNotFoundError" in names:
        return "not-found"
    return "other"


def is_storage_failure(exc: BaseException) -> bool:
    """True for errors a storage library raises (as opposed to keepflow bugs)."""
    if isinstance(exc, OSError):
        return True
    names = _names(exc)
    return bool(names & ({"BotoCoreError", "ClientError", "AzureError", "Error"} | _CONNECTION_NAMES
                         | _AUTH_NAMES)) and type(exc).__module__.split(".")[0] in {
        "botocore", "aiobotocore", "s3fs", "azure", "adlfs", "asyncssh", "sshfs", "aiohttp", "socket", "builtins"}


def list_keys(fs: AbstractFileSystem, root: str, folder: str) -> dict[str, int]:
    """Keys below ``root/folder`` relative to ``root``, with their sizes.

    Names with ``.tmp-`` are writes in progress (or left by a crash), not data.
    """
    prefix = root.rstrip("/") + "/"
    out: dict[str, int] = {}
    for info in list_files(fs, join(root, folder)):
        name = info["name"]
        rel = name[len(prefix):] if name.startswith(prefix) else name
        if ".tmp-" not in rel:
            out[rel] = int(info.get("size") or 0)
    return out


def describe_error(url: str, exc: BaseException) -> StorageError:
    """Turn a storage library's error into a one-line StorageError naming the provider and the fix."""
    provider = provider_name(url)
    detail = _first_line(str(exc)) or type(exc).__name__
    kind = classify(exc)
    if kind == "no-container":
        what = "bucket" if provider == "S3" else "container"
        name = _container(url)
        tool = f"`aws s3 mb s3://{name}`" if provider == "S3" else f"`az storage container create -n {name}`"
        reason = f"{provider} {what} {name!r} does not exist; create it first (e.g. {tool}) or correct the name"
    elif kind in ("credentials", "permission") and provider in CREDENTIAL_FIXES:
        what = "the SFTP server refused the login" if provider == "SFTP" else f"{provider} rejected the credentials"
        reason = f"{what} ({detail}); {CREDENTIAL_FIXES[provider]}"
    elif kind == "permission":
        reason = f"permission denied ({detail}); check credentials and access rights"
    elif kind == "unreachable":
        fix = ENDPOINT_FIXES.get(provider, "check the address and that the service is running")
        reason = f"cannot reach the {provider} server ({detail}); {fix}"
    elif kind == "not-found":
        reason = f"not found ({detail})"
    else:
        reason = f"{provider} error ({type(exc).__name__}: {detail})" if provider not in ("local disk", "memory") \
            else detail
    error = StorageError(url=url, reason=reason)
    error.kind = kind          # lets the retry policy tell "server down" from "bad credentials"
    return error


def check_container(fs: AbstractFileSystem, url: str) -> None:
    """Raise StorageError when the bucket/container of an object-store URL is missing.

    Called only when a repository was not found, so a typo in the bucket name
    is reported as such (and no bucket is created behind the user's back).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in S3_SCHEMES | AZURE_SCHEMES:
        return
    name = _container(url)
    try:
        exists = fs.exists(name)
    except Exception as exc:
        if is_storage_failure(exc):
            raise describe_error(url, exc) from None
        raise
    if not exists:
        raise describe_error(url, FileNotFoundError(
            "NoSuchBucket" if scheme in S3_SCHEMES else "ContainerNotFound"))
