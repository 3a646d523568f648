"""A comparable description of a folder tree (used by the demo and the tests).

``describe(root)`` maps each relative path to its type, permission bits,
size, mtime_ns, and content hash, link target or device number (sockets are
left out: they are not backed up), so two trees can be
compared with ``==`` and differences listed with ``differences``.
"""

from __future__ import annotations

import os
import stat

import blake3


def describe(root: str, mtimes: bool = True, dir_mtimes: bool = True) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            mtime = st.st_mtime_ns if mtimes else None
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, 0, mtime, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, 0, mtime if dir_mtimes else None, None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, st.st_size, mtime, blake3.blake3().update_mmap(full).hexdigest()
                            if st.st_size else blake3.blake3(b"").hexdigest())
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", mode, 0, mtime, None)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "chardev" if stat.S_ISCHR(st.st_mode) else "blockdev"
                out[rel] = (kind, mode, 0, mtime, st.st_rdev)
    return out


def differences(a: dict, b: dict, limit: int = 20) -> list[str]:
    diffs = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            diffs.append(f"{path}: {a.get(path)} != {b.get(path)}")
            if len(diffs) >= limit:
                break
    return diffs
