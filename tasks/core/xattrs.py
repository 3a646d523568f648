"""Extended attributes: which are kept, how they are read and put back.

Kept: ``user.*`` always; as root also ``security.*`` (SELinux labels, file
capabilities) and ``trusted.*``; and the POSIX ACLs, which Linux exposes as
the xattrs ``system.posix_acl_access`` and ``system.posix_acl_default``
(restic keeps the same set). Other ``system.*`` names are the kernel's own
and are not restorable.

Reading costs one ``listxattr`` per entry (about 3 µs here, ~3 s per million
entries) and a ``getxattr`` per attribute; ``--no-xattrs`` skips both. A
filesystem without xattrs answers ENOTSUP, which simply means "none".

The manifest holds them in the optional column ``xattrs``:
``list<struct<name: string, value: binary>>``, sorted by name, null when an
entry has none. On restore they are set after the owner (``chown`` clears
``security.capability``) and before the entry gets its final name.
"""

from __future__ import annotations

import errno
import os

import pyarrow as pa

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TYPE = pa.list_(pa.struct([("name", pa.string()), ("value", pa.binary())]))
_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_NONE = {errno.ENOTSUP, errno.ENODATA, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def kept(name: str) -> bool:
    if name.startswith("user.") or name in _ACLS:
        return True
    return IS_ROOT and name.startswith(("security.", "trusted."))


def read(path: str | int) -> list[dict] | None:
    """The kept xattrs of ``path`` (never following a symlink), or None when there are none.

    Raises OSError only for a real failure (permission, I/O); "not supported"
    means none.
    """
    follow = isinstance(path, int)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _NONE:
            return None
        raise
    out = []
    for name in sorted(names):
        if not kept(name):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:      # removed meanwhile
                continue
            raise
        out.append({"name": name, "value": value})
    return out or None


def apply(path: str | int, attrs: list[dict] | None, follow_symlinks: bool = True) -> list[str]:
    """Set ``attrs`` on ``path`` (a path or an open descriptor); returns one line per failure."""
    failures = []
    for attr in attrs or ():
        try:
            if isinstance(path, int):
                os.setxattr(path, attr["name"], attr["value"])
            else:
                os.setxattr(path, attr["name"], attr["value"], follow_symlinks=follow_symlinks)
        except OSError as exc:
            failures.append(f"cannot set extended attribute {attr['name']}: {exc.strerror or exc}")
    return failures
