"""Recreating entries that have no content: FIFOs and device files.

A FIFO (named pipe) is recreated with ``mkfifo``, a character or block device
with ``mknod`` and the device number the scan recorded (``rdev``); creating a
device needs root, as with restic and tar, so without it the entry is
reported, never silently dropped. Each is created owner-only under a
temporary name in its folder, given its owner, mode and mtime, then renamed
into place, like every other restored entry: a crash leaves only a
temporary that the next restore removes.
"""

from __future__ import annotations

import os
import stat

from . import xattrs
from .restore_writer import IS_ROOT, exact_mtime

_CREATE_MODE = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}


def matches(dest: str, row: dict) -> bool:
    """True when ``dest`` already is this kind of entry (and the same device)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    if row["type"] == "fifo":
        return stat.S_ISFIFO(st.st_mode)
    kind_ok = stat.S_ISCHR(st.st_mode) if row["type"] == "chardev" else stat.S_ISBLK(st.st_mode)
    return kind_ok and st.st_rdev == row["rdev"]


def create(tmp: str, row: dict) -> None:
    """Make the entry at ``tmp`` (the caller renames it into place)."""
    if row["type"] == "fifo":
        os.mkfifo(tmp, 0o600)
        return
    if not IS_ROOT:
        raise PermissionError(1, "recreating a device file needs root")
    os.mknod(tmp, _CREATE_MODE[row["type"]] | 0o600, row["rdev"] or 0)


def apply_meta(path: str, row: dict) -> None:
    if IS_ROOT and row["uid"] is not None:
        os.chown(path, row["uid"], row["gid"], follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(row["mode"]))
    failures = xattrs.apply(path, row["xattrs"])
    if failures:
        raise OSError(0, "; ".join(failures))
    mtime = exact_mtime(row["mtime_ns"], row["mtime_ns_exact"])
    os.utime(path, ns=(mtime, mtime))
