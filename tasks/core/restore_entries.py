"""Putting back the entries that have no content of their own, after the batches.

The batches write file contents (restore_writer.py); ``finish`` then makes
everything else, in this order:

* symlinks, with their own owner, xattrs and mtime (a target that is not
  UTF-8 is created from its raw bytes);
* further names of a hard-linked file: a hard link to the name the batches
  wrote (``hardlink_to``), so the names share one inode again;
* FIFOs (``mkfifo``) and character/block devices (``mknod`` with the recorded
  ``rdev``; devices need root, as with restic and tar, and without it the
  entry is reported, never silently dropped);
* folder metadata last and deepest first, because creating entries in a
  folder moves its mtime, and a folder stays owner-only (0700, see
  restore.py) until it gets its own mode here.

Each new entry is made under a temporary name in its folder and renamed into
place, like every restored file: a crash leaves only a temporary that the
next restore removes. Under ``--overwrite never`` an existing entry is kept;
otherwise an entry that already is what the snapshot says is left alone and
only its metadata is set again. Every failure is one (path, reason) pair.
"""

from __future__ import annotations

import os
import stat

from . import xattrs
from .manifest import SPECIAL_TYPES, fs_path
from .restore_writer import IS_ROOT, exact_mtime, new_token, temp_name

_CREATE_MODE = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}


def link_target(row: dict) -> str | bytes:
    """What to create the symlink with: the raw bytes when the target is not UTF-8."""
    raw = row.get("link_target_bytes")
    return raw if raw is not None else row["link_target"]


class EntryPlacer:
    """Makes symlinks, hard links, FIFOs and devices under ``root``, then folder metadata."""

    def __init__(self, root: str, overwrite: str, with_xattrs: bool = True) -> None:
        self.root, self.overwrite, self.with_xattrs = root, overwrite, with_xattrs
        self._token, self._count = new_token(), 0
        self.errors: list[tuple[str, str]] = []

    def place_all(self, rows: list[dict]) -> list[tuple[str, str]]:
        if not self.with_xattrs:           # --no-xattrs: no entry gets any
            for row in rows:
                row["xattrs"] = None
        for row in rows:
            kind = row["type"]
            if kind == "symlink":
                self._place(row, "create symlink", self._symlink_is_there, self._make_symlink, _link_meta)
            elif kind == "file":           # a further name of a file the batches wrote
                self._place(row, f"link to {row['hardlink_to']}", self._same_inode, self._make_hard_link, None)
            elif kind in SPECIAL_TYPES:
                self._place(row, f"create {kind}", _special_is_there, _make_special, _plain_meta)
        for row in sorted((r for r in rows if r["type"] == "dir"), key=lambda r: r["path"].count("/"), reverse=True):
            try:
                for failure in _plain_meta(self._dest(row), row):
                    self.errors.append((row["path"], failure))
            except OSError as exc:
                self.errors.append((row["path"], f"cannot set folder metadata: {exc.strerror or exc}"))
        return self.errors

    def _dest(self, row: dict, key: str = "path") -> str:
        return os.path.join(self.root, fs_path(row[key], row.get(f"{key}_bytes")))

    def _place(self, row, what, is_there, make, meta) -> None:
        dest = self._dest(row)
        try:
            there = os.path.lexists(dest)
            if there and self.overwrite == "never":
                return
            if there and os.path.isdir(dest) and not os.path.islink(dest):
                raise IsADirectoryError(21, "a folder is in the way", dest)
            if not there or not is_there(dest, row):
                self._count += 1
                tmp = temp_name(os.path.dirname(dest), self._token, self._count)
                make(tmp, row)
                os.replace(tmp, dest)
            for failure in (meta(dest, row) if meta else ()):
                self.errors.append((row["path"], failure))
        except OSError as exc:
            self.errors.append((row["path"], f"cannot {what}: {exc.strerror or exc}"))

    @staticmethod
    def _symlink_is_there(dest: str, row: dict) -> bool:
        target = link_target(row)
        if not os.path.islink(dest):
            return False
        return (os.readlink(os.fsencode(dest)) if isinstance(target, bytes) else os.readlink(dest)) == target

    @staticmethod
    def _make_symlink(tmp: str, row: dict) -> None:
        os.symlink(link_target(row), tmp)

    def _same_inode(self, dest: str, row: dict) -> bool:
        return os.path.samefile(dest, self._dest(row, "hardlink_to"))

    def _make_hard_link(self, tmp: str, row: dict) -> None:
        os.link(self._dest(row, "hardlink_to"), tmp)


def _special_is_there(dest: str, row: dict) -> bool:
    """True when ``dest`` already is this kind of entry (and the same device)."""
    st = os.lstat(dest)
    if row["type"] == "fifo":
        return stat.S_ISFIFO(st.st_mode)
    kind_ok = stat.S_ISCHR(st.st_mode) if row["type"] == "chardev" else stat.S_ISBLK(st.st_mode)
    return kind_ok and st.st_rdev == row["rdev"]


def _make_special(tmp: str, row: dict) -> None:
    if row["type"] == "fifo":
        os.mkfifo(tmp, 0o600)
        return
    if not IS_ROOT:
        raise PermissionError(1, "recreating a device file needs root")
    os.mknod(tmp, _CREATE_MODE[row["type"]] | 0o600, row["rdev"] or 0)


def _plain_meta(path: str, row: dict) -> list[str]:
    """Owner, mode, xattrs (after chown: it clears security.capability), mtime; returns xattr failures."""
    if IS_ROOT and row["uid"] is not None:
        os.chown(path, row["uid"], row["gid"], follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(row["mode"]))
    failures = xattrs.apply(path, row["xattrs"])
    mtime = exact_mtime(row["mtime_ns"], row["mtime_ns_exact"])
    os.utime(path, ns=(mtime, mtime))
    return failures


def _link_meta(dest: str, row: dict) -> list[str]:
    """A symlink's own owner, xattrs and mtime (never its target's)."""
    if IS_ROOT and row["uid"] is not None:
        try:
            os.lchown(dest, row["uid"], row["gid"])
        except OSError:
            pass
    failures = xattrs.apply(dest, row.get("xattrs"), follow_symlinks=False)
    if os.utime in os.supports_follow_symlinks:
        mtime = exact_mtime(row["mtime_ns"], row.get("mtime_ns_exact"))
        os.utime(dest, ns=(mtime, mtime), follow_symlinks=False)
    return failures
