"""Compare two folder trees exactly, property by property, and list what differs.

``compare(expected, actual)`` walks both trees (never following symlinks) and
returns one ``Difference`` per path and property that does not match:

* ``missing`` / ``extra``: a path on one side only;
* ``type``: file, dir, symlink or other (a FIFO, a socket, ...);
* ``size`` and ``content`` (files): content is compared byte for byte, in
  chunks, only when the sizes agree, so a wrong file costs one read of each side;
* ``mode`` (permission bits, files and folders; a symlink's own bits mean
  nothing on Linux);
* ``mtime_ns`` (files and folders, which is what a restore sets; symlinks only
  with ``symlink_mtimes=True``);
* ``link_target`` (symlinks, compared as the stored text, never resolved);
* ``owner`` (uid, gid; only with ``owner=True``).

The roots themselves are not compared (a restore target's own folder is the
caller's), only what is inside them. An empty list means the trees are equal
in every property asked for; ``format_differences`` turns the list into an
assertion message.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    type: str                 # "file" | "dir" | "symlink" | "other"
    mode: int                 # permission bits (stat.S_IMODE)
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link_target: str | None


@dataclass(frozen=True)
class Difference:
    path: str                 # relative POSIX path
    prop: str                 # missing, extra, type, size, content, mode, mtime_ns, link_target, owner
    expected: object = None
    actual: object = None

    def __str__(self) -> str:
        if self.prop in ("missing", "extra"):
            return f"{self.path}: {self.prop}"
        if self.prop == "content":
            return f"{self.path}: content differs at byte {self.actual}"
        exp, act = self.expected, self.actual
        if self.prop == "mode":
            exp, act = oct(exp), oct(act)
        return f"{self.path}: {self.prop} {exp!r} != {act!r}"


def _type(st_mode: int) -> str:
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISDIR(st_mode):
        return "dir"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    return "other"


def describe(root: str | os.PathLike) -> dict[str, Entry]:
    """Every path under ``root`` (relative, POSIX) with its ``Entry``, from lstat only."""
    root = os.fspath(root)
    out: dict[str, Entry] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                kind = _type(st.st_mode)
                out[rel] = Entry(kind, stat.S_IMODE(st.st_mode), st.st_size if kind == "file" else 0,
                                 st.st_mtime_ns, st.st_uid, st.st_gid,
                                 os.readlink(entry.path) if kind == "symlink" else None)
                if kind == "dir":
                    stack.append(rel)
    return out


def first_difference(a: str | os.PathLike, b: str | os.PathLike) -> int | None:
    """Offset of the first byte where two files differ (None: identical)."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                n = min(len(ca), len(cb))
                return offset + next((i for i in range(n) if ca[i] != cb[i]), n)
            if not ca:
                return None
            offset += len(ca)


def compare(expected: str | os.PathLike, actual: str | os.PathLike, *, content: bool = True,
            mtimes: bool = True, dir_mtimes: bool = True, symlink_mtimes: bool = False,
            modes: bool = True, owner: bool = False,
            ignore: Callable[[str], bool] | None = None) -> list[Difference]:
    """Every difference between the trees at ``expected`` and ``actual`` (see the module docstring).

    ``ignore(path)`` returning True leaves that relative path out on both sides.
    """
    want, got = describe(expected), describe(actual)
    if ignore is not None:
        want = {p: e for p, e in want.items() if not ignore(p)}
        got = {p: e for p, e in got.items() if not ignore(p)}
    diffs: list[Difference] = []
    for path in sorted(want.keys() | got.keys()):
        w, g = want.get(path), got.get(path)
        if g is None:
            diffs.append(Difference(path, "missing"))
            continue
        if w is None:
            diffs.append(Difference(path, "extra"))
            continue
        if w.type != g.type:
            diffs.append(Difference(path, "type", w.type, g.type))
            continue
        if modes and w.type in ("file", "dir") and w.mode != g.mode:
            diffs.append(Difference(path, "mode", w.mode, g.mode))
        check_mtime = mtimes and (w.type == "file" or (w.type == "dir" and dir_mtimes)
                                  or (w.type == "symlink" and symlink_mtimes))
        if check_mtime and w.mtime_ns != g.mtime_ns:
            diffs.append(Difference(path, "mtime_ns", w.mtime_ns, g.mtime_ns))
        if owner and (w.uid, w.gid) != (g.uid, g.gid):
            diffs.append(Difference(path, "owner", (w.uid, w.gid), (g.uid, g.gid)))
        if w.type == "symlink" and w.link_target != g.link_target:
            diffs.append(Difference(path, "link_target", w.link_target, g.link_target))
        if w.type == "file":
            if w.size != g.size:
                diffs.append(Difference(path, "size", w.size, g.size))
            elif content and w.size:
                at = first_difference(Path(expected, path), Path(actual, path))
                if at is not None:
                    diffs.append(Difference(path, "content", None, at))
    return diffs


def format_differences(diffs: Iterable[Difference], limit: int = 30) -> str:
    """An assertion message: the count and the first ``limit`` differences, one a line."""
    diffs = list(diffs)
    lines = [f"{len(diffs)} differences"] + [f"  {d}" for d in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"  ... and {len(diffs) - limit} more")
    return "\n".join(lines)
