"""Fidelity: a tree with every property restic keeps, backed up and restored through the CLI.

Issue 11 compared restic 0.14 and keepflow on one tree: 25 of 37 properties
were kept. This builds such a tree (the root-only cases when run as root, as
in CI), backs it up with `keepflow backup` (exit 0: nothing in it is
skipped), restores it with `keepflow restore`, and compares the two trees
property by property: type, mode (setuid/setgid/sticky, 000), owner,
mtime_ns (files, folders, symlinks; 1938, 2200, 2400), size, content, link
target bytes, device number, extended attributes, hard-link groups, names in
any encoding, and the space a sparse file takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

import pytest

from tests.conftest import make_tree

IS_ROOT = os.geteuid() == 0
NS = 1_000_000_000


def _at(year_seconds: int, frac: int = 0) -> int:
    return year_seconds * NS + frac


MTIMES = {                       # seconds since the epoch of Jan 1st, and a fraction
    b"year-1938.txt": _at(-1009843200, 250_000_000),
    b"year-2200.txt": _at(7258118400, 1),
    b"year-2400.txt": _at(13569465600, 123_456_789),      # past int64 nanoseconds
}


def _build(root: str) -> None:
    base = os.fsencode(root)

    def p(rel: bytes) -> bytes:
        return base + b"/" + rel

    make_tree(__import__("pathlib").Path(root), {
        "plain.txt": "plain", "empty": "", "dir/nested/deep.txt": "deep", "empty-dir": None,
        "new\nline.txt": "newline", "tab\there.txt": "tab", "zoë ünïcødé 日本語.txt": "unicode",
        "a" * 255: "255-byte name",
    })
    # A path of ~3,969 bytes: 31 folders of 127 bytes, then a file.
    long_dir = b"/".join([b"d" * 127] * 31)
    os.makedirs(p(long_dir))
    with open(p(long_dir + b"/f"), "wb") as f:
        f.write(b"long path")
    for name, mtime in MTIMES.items():
        with open(p(name), "wb") as f:
            f.write(name)
        os.utime(p(name), ns=(mtime, mtime))
    for name, mode in ((b"setuid", 0o4755), (b"setgid", 0o2750), (b"mode-000", 0o000)):
        with open(p(name), "wb") as f:
            f.write(name)
        os.chmod(p(name), mode)
    os.makedirs(p(b"sticky"))
    os.chmod(p(b"sticky"), 0o1777)
    os.makedirs(p(b"private"))
    with open(p(b"private/key"), "wb") as f:
        f.write(b"secret")
    os.chmod(p(b"private"), 0o700)
    os.symlink(b"plain.txt", p(b"link-relative"))
    os.symlink(b"/etc/hostname", p(b"link-absolute"))
    os.symlink(b"does/not/exist", p(b"link-dangling"))
    os.symlink(b"\xff\xfe-target", p(b"link-not-utf8"))
    # Hard links: three names, one inode.
    with open(p(b"hard-1"), "wb") as f:
        f.write(b"one inode, three names")
    os.link(p(b"hard-1"), p(b"dir/hard-2"))
    os.link(p(b"hard-1"), p(b"hard-3"))
    # Names in another encoding.
    os.makedirs(p(b"caf\xe9"))
    with open(p(b"caf\xe9/\xff\xfe.txt"), "wb") as f:
        f.write(b"odd names")
    # Extended attributes on a file and a folder, and a POSIX ACL (its xattr,
    # as setfacl writes it: version 2, then (tag, perm, id) entries).
    os.setxattr(p(b"plain.txt"), "user.origin", b"fidelity")
    os.setxattr(p(b"dir"), "user.folder", bytes(range(32)))
    undefined = 0xFFFFFFFF
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
        (0x01, 6, undefined), (0x02, 4, 1000), (0x04, 4, undefined), (0x10, 4, undefined), (0x20, 4, undefined)))
    with open(p(b"acl.txt"), "wb") as f:
        f.write(b"user 1000 may read this")
    os.setxattr(p(b"acl.txt"), "system.posix_acl_access", acl)
    # A sparse file: 256 MiB, a few KiB on disk.
    with open(p(b"sparse.img"), "wb") as f:
        f.write(b"head")
        f.seek(256 * 1024 * 1024 - 4)
        f.write(b"tail")
    os.mkfifo(p(b"fifo"))
    if IS_ROOT:
        os.chown(p(b"plain.txt"), 1234, 5678)
        os.chown(p(b"empty"), 3_000_000_000, 3_000_000_001)     # ids above 2^31
        os.lchown(p(b"link-relative"), 4321, 8765)               # a symlink's own owner
        os.mknod(p(b"null-device"), stat.S_IFCHR | 0o644, os.makedev(1, 3))
    # Folder mtimes last (creating entries moved them), and symlink mtimes.
    for folder, _, _ in os.walk(base, topdown=False):
        os.utime(folder, ns=(_at(1600000000), _at(1600000000, 42)))
    os.utime(p(b"link-relative"), ns=(_at(1500000000), _at(1500000000, 7)), follow_symlinks=False)


def _describe(root: str) -> dict[bytes, dict]:
    """Every property the fidelity table names, per path (bytes, relative)."""
    base = os.fsencode(root)
    out: dict[bytes, dict] = {}
    inodes: dict[int, list[bytes]] = {}
    for folder, dirs, files in os.walk(base):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            props = {"mode": stat.filemode(st.st_mode) + oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
                     "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    props |= {"size": st.st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
                if st.st_size >= 1024 * 1024:
                    props["sparse"] = st.st_blocks * 512 < st.st_size // 2
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                props["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                props["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISFIFO(st.st_mode) and not stat.S_ISCHR(st.st_mode):
                props["xattrs"] = {n: os.getxattr(full, n) for n in sorted(os.listxattr(full))}
            out[rel] = props
    for names in inodes.values():
        for name in names:
            out[name]["hard_links"] = sorted(names)
    return out


def _differences(expected: dict, actual: dict) -> list[str]:
    diffs = []
    for path in sorted(set(expected) | set(actual)):
        a, b = expected.get(path), actual.get(path)
        if a is None or b is None:
            diffs.append(f"{path!r}: {'missing' if b is None else 'extra'}")
            continue
        diffs += [f"{path!r} {key}: {a.get(key)!r} != {b.get(key)!r}" for key in sorted(set(a) | set(b))
                  if a.get(key) != b.get(key)]
    return diffs


@pytest.mark.slow
def test_every_property_survives_backup_and_restore(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    _build(str(src))
    expected = _describe(str(src))
    assert expected[b"sparse.img"]["sparse"] and len(expected[b"dir/hard-2"]["hard_links"]) == 3
    assert "system.posix_acl_access" in expected[b"acl.txt"]["xattrs"]

    repo = tmp_path / "repo"
    backed = cli("backup", str(src), str(repo), "--json")
    assert backed.returncode == 0, backed.stderr
    summary = json.loads(backed.stdout)
    assert summary["skipped"] == []

    out = tmp_path / "out"
    restored = cli("restore", str(repo), str(out), "--json")
    assert restored.returncode == 0, restored.stderr
    diffs = _differences(expected, _describe(str(out)))
    assert diffs == [], "\n".join(diffs[:40])
