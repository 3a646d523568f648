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
* object stores (S3, Azure, GCS, memory): a PUT is atomic; we check existence
  first because the names are content hashes, so an existing object already
  holds the same bytes.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .errors import StorageError, UsageError

LOCAL_PROTOCOLS = {"file", "local"}


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_url(url: str, storage_options: dict[str, Any] | None = None):
    """Return ``(fs, root)`` for a URL or plain path.

    A plain path means local disk and is made absolute, so that the same
    repository is reached from any working directory.
    """
    if not url:
        raise UsageError("empty location; give a path or a URL such as s3://bucket/repo")
    if "://" not in url and not url.startswith("memory:"):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(url))
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        raise UsageError(
            f"unknown or unavailable storage scheme {scheme!r} in {url}: {exc}; "
            "use a local path or an fsspec URL whose package is installed"
        ) from None
    return fs, root.rstrip("/") or root


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if root else "/".join(parts)


def write_once(fs, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` unless something is already there.

    Returns True when this call created the object. See the module docstring
    for how each backend makes this atomic.
    """
    if is_local(fs):
        return _local_write_once(path, data)
    if fs.exists(path):
        return False
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "sftp" in _protocols(fs) or "ssh" in _protocols(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, path)
        except OSError:
            fs.rm_file(tmp)
            return False
        return True
    fs.pipe_file(path, data)
    return True


def _local_write_once(path: str, data: bytes) -> bool:
    if os.path.exists(path):
        return False
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    return publish_local_tmp(tmp, path)


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


def _protocols(fs) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def read_bytes(fs, path: str, start: int | None = None, end: int | None = None) -> bytes:
    return fs.cat_file(path, start=start, end=end)


def list_files(fs, folder: str) -> list[dict]:
    """All files below ``folder`` with their info dicts; missing folder -> []."""
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return []
    return [dict(info, name=name) for name, info in found.items() if info.get("type") != "directory"]


def describe_error(url: str, exc: BaseException) -> StorageError:
    """Turn an fsspec/OS error into a one-line StorageError naming the place."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError):
        reason = f"permission denied ({reason}); check credentials and access rights"
    elif isinstance(exc, FileNotFoundError):
        reason = f"not found ({reason})"
    return StorageError(url=url, reason=reason)
