"""No single odd entry can fail a backup; each is kept exactly (issue 11).

Each of these made the *whole* backup fail before ("unexpected
OverflowError / ArrowInvalid / UnicodeEncodeError"): an mtime past int64
nanoseconds (year 2400), an owner above 2^31, a symlink target that is not
UTF-8. Each is backed up and restored exactly here.
"""

from __future__ import annotations

import os

import pytest

from keepflow.tasks.core import manifest
from keepflow.tasks.core.repository import RepoConfig, Repository
from keepflow.tasks.core.snapshots import resolve

from tests import core_helpers
from tests.conftest import age_tree, make_tree

YEAR_2400_NS = 13_569_465_600 * 10**9 + 123_456_789     # 2400-01-01 + a fraction: beyond int64 ns
BIG_ID = 3_000_000_000


@pytest.fixture
def odd_tree(tmp_path):
    src = make_tree(tmp_path / "src", {"future.txt": "from the future", "big-owner.txt": "owned", "plain": "p",
                                       "dir/inner": "i"})
    age_tree(src)
    os.utime(src / "future.txt", ns=(YEAR_2400_NS, YEAR_2400_NS))
    if os.geteuid() == 0:
        os.chown(src / "big-owner.txt", BIG_ID, BIG_ID + 1)
    os.symlink(b"\xff\xfe-not-utf8", os.fsencode(src / "bad-link"))
    return src


def test_odd_entries_back_up_and_restore_exactly(odd_tree, tmp_path):
    repo_url = str(tmp_path / "repo")
    committed, _, _ = core_helpers.backup(odd_tree, repo_url)
    assert committed.skipped == []
    assert committed.info.files == 4

    repo = Repository.open(repo_url)
    rows = {r["path"]: r for r in manifest.read_manifest(repo, resolve(repo, "latest")).to_pylist()}
    assert rows["future.txt"]["mtime_ns"] == manifest.NS_MAX
    assert int(rows["future.txt"]["mtime_ns_exact"]) == YEAR_2400_NS
    assert rows["bad-link"]["link_target"] == "\\xff\\xfe-not-utf8"          # readable in ls, DuckDB
    assert rows["bad-link"]["link_target_bytes"] == b"\xff\xfe-not-utf8"
    assert rows["plain"]["mtime_ns_exact"] is None and rows["plain"]["link_target_bytes"] is None

    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == []
    assert os.stat(out / "future.txt").st_mtime_ns == YEAR_2400_NS
    assert os.readlink(os.fsencode(out / "bad-link")) == b"\xff\xfe-not-utf8"
    if os.geteuid() == 0:
        st = os.stat(out / "big-owner.txt")
        assert (st.st_uid, st.st_gid) == (BIG_ID, BIG_ID + 1)

    # The next backup keeps them exact too (the future file is re-read: a
    # parent mtime after the scan start is never trusted, the racy guard).
    again, plan, _ = core_helpers.backup(odd_tree, repo_url)
    assert again.skipped == [] and again.info.unchanged == 4
    rows = {r["path"]: r for r in manifest.read_manifest(repo, resolve(repo, "latest")).to_pylist()}
    assert int(rows["future.txt"]["mtime_ns_exact"]) == YEAR_2400_NS
    assert rows["bad-link"]["link_target_bytes"] == b"\xff\xfe-not-utf8"


def test_manifests_written_before_the_optional_columns_still_read(tmp_path):
    """An older manifest has no mtime_ns_exact / link_target_bytes and int32 owners: read as nulls.

    Only format 1 repositories predate those columns (every format 2 manifest
    has them), and a format 1 manifest is plain Parquet: written here by hand.
    """
    import pyarrow as pa

    src = make_tree(tmp_path / "src", {"a": "x", "l": ("link", "a")})
    repo_url = str(tmp_path / "repo")
    Repository.init(repo_url, config=RepoConfig())
    core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    info = resolve(repo, "latest")
    path = tmp_path / "repo" / "snapshots" / info.key
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    old = table.drop_columns(list(manifest.OPTIONAL_COLUMNS))
    old = old.set_column(old.schema.get_field_index("uid"), "uid", old["uid"].cast(pa.int32()))
    os.unlink(path)
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), path)

    read = manifest.read_manifest(repo, info)
    assert read.column_names[-len(manifest.OPTIONAL_COLUMNS):] == list(manifest.OPTIONAL_COLUMNS)
    assert read["mtime_ns_exact"].null_count == read.num_rows
    picked = manifest.read_manifest(repo, info, columns=["path", "link_target_bytes"])
    assert picked.column_names == ["path", "link_target_bytes"]
    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == [] and os.readlink(out / "l") == "a"


def test_fifos_and_devices_are_entries_sockets_are_reported(tmp_path):
    import socket
    import stat

    src = make_tree(tmp_path / "src", {"data": "d"})
    os.mkfifo(src / "pipe", 0o640)
    if os.geteuid() == 0:
        os.mknod(src / "null-again", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    age_tree(src)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "app.sock"))
        committed, _, _ = core_helpers.backup(src, str(tmp_path / "repo"))
    assert committed.skipped == [("app.sock", "a socket is not backed up (it belongs to a running program)")]

    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(str(tmp_path / "repo"), out)
    assert errors == []
    st = os.lstat(out / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == os.lstat(src / "pipe").st_mtime_ns
    if os.geteuid() == 0:
        dev = os.lstat(out / "null-again")
        assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert not (out / "app.sock").exists()
    # A second restore over the first finds them in place and changes nothing.
    _, _, errors = core_helpers.restore(str(tmp_path / "repo"), out)
    assert errors == [] and stat.S_ISFIFO(os.lstat(out / "pipe").st_mode)


def test_a_non_utf8_name_whose_shown_form_is_taken_is_reported(tmp_path):
    # A real name spelled with the literal text \xff, beside one with the byte 0xff.
    src = make_tree(tmp_path / "src", {"sub/\\xff.txt": "literal backslash", "sub/x": "y"})
    with open(os.fsencode(src / "sub") + b"/\xff.txt", "wb") as f:
        f.write(b"raw byte")
    committed, _, _ = core_helpers.backup(src, str(tmp_path / "repo"))
    assert committed.skipped == [("sub/\\xff.txt", "name is not valid UTF-8 and its shown form is another "
                                                   "entry's name; rename one")]
    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(str(tmp_path / "repo"), out)
    assert errors == [] and (out / "sub" / "\\xff.txt").read_text() == "literal backslash"


def test_hard_links_are_restored_as_links(tmp_path):
    src = make_tree(tmp_path / "src", {"a/one": "shared inode", "solo": "s"})
    os.link(src / "a" / "one", src / "two")
    os.link(src / "a" / "one", src / "a" / "three")
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    committed, _, _ = core_helpers.backup(src, repo_url)
    assert committed.info.files == 4 and committed.info.bytes_stored == len("shared inode") + 1
    repo = Repository.open(repo_url)
    rows = {r["path"]: r for r in manifest.read_manifest(repo, resolve(repo, "latest")).to_pylist()}
    assert rows["a/three"]["hardlink_to"] == rows["two"]["hardlink_to"] == "a/one"
    assert rows["a/one"]["hardlink_to"] is None and rows["solo"]["hardlink_to"] is None

    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == []
    inode = os.stat(out / "a" / "one").st_ino
    assert os.stat(out / "two").st_ino == inode == os.stat(out / "a" / "three").st_ino
    assert os.stat(out / "a" / "one").st_nlink == 3 and (out / "two").read_text() == "shared inode"
    # Restoring again over it keeps the links and reports nothing.
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == [] and os.stat(out / "two").st_ino == os.stat(out / "a" / "one").st_ino

    # A name whose first name is left out by --include is restored as a file of its own.
    part = tmp_path / "part"
    _, _, errors = core_helpers.restore(repo_url, part, includes=["two"])
    assert errors == [] and (part / "two").read_text() == "shared inode" and os.stat(part / "two").st_nlink == 1


def test_restore_keeps_folders_private_until_they_get_the_snapshot_mode(tmp_path):
    import stat


    src = make_tree(tmp_path / "src", {"open/a": "a", "secret/key": "k", "secret/deeper/b": "b"})
    os.chmod(src / "open", 0o755)
    os.chmod(src / "secret", 0o700)
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    core_helpers.backup(src, repo_url)

    out = tmp_path / "out"
    plan = core_helpers.plan_restore(repo_url, out)
    # While the restore runs (or after it was killed here), every folder it created is owner-only.
    for folder in (out, out / "open", out / "secret", out / "secret" / "deeper"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
    assert core_helpers.restore_all(plan)[1] == []
    assert stat.S_IMODE(os.stat(out / "open").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out / "secret").st_mode) == 0o700


def test_sparse_files_stay_sparse_on_restore(tmp_path):

    src = tmp_path / "src"
    src.mkdir()
    size = 48 * 1024 * 1024
    with open(src / "disk.img", "wb") as f:      # data, a 40 MiB hole, data, a trailing hole
        f.write(os.urandom(1024 * 1024))
        f.seek(41 * 1024 * 1024)
        f.write(os.urandom(512 * 1024))
        f.truncate(size)
    with open(src / "copy.img", "wb") as f:       # the same content again: restored by copying
        f.write((src / "disk.img").read_bytes())
    assert os.stat(src / "disk.img").st_blocks * 512 < 4 * 1024 * 1024
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    core_helpers.backup(src, repo_url)

    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == []
    for name in ("disk.img", "copy.img"):
        st = os.stat(out / name)
        assert st.st_size == size and (out / name).read_bytes() == (src / "disk.img").read_bytes()
        assert st.st_blocks * 512 < 4 * 1024 * 1024, f"{name}: {st.st_blocks * 512} bytes on disk"
    # --no-sparse writes every byte.
    dense = tmp_path / "dense"
    core_helpers.restore(repo_url, dense, sparse=False)
    assert os.stat(dense / "disk.img").st_blocks * 512 >= size


def test_xattrs_on_files_and_folders_round_trip(tmp_path):

    src = make_tree(tmp_path / "src", {"doc.txt": "text", "dir/inner": "i", "plain": "p"})
    os.setxattr(src / "doc.txt", "user.origin", b"scanner-7")
    os.setxattr(src / "doc.txt", "user.binary", bytes(range(256)))
    os.setxattr(src / "dir", "user.project", b"keepflow")
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    committed, _, _ = core_helpers.backup(src, repo_url)
    assert committed.skipped == []
    repo = Repository.open(repo_url)
    rows = {r["path"]: r for r in manifest.read_manifest(repo, resolve(repo, "latest")).to_pylist()}
    assert [a["name"] for a in rows["doc.txt"]["xattrs"]] == ["user.binary", "user.origin"]
    assert rows["plain"]["xattrs"] is None

    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == []
    assert os.getxattr(out / "doc.txt", "user.origin") == b"scanner-7"
    assert os.getxattr(out / "doc.txt", "user.binary") == bytes(range(256))
    assert os.getxattr(out / "dir", "user.project") == b"keepflow"
    assert os.listxattr(out / "plain") == []

    # --no-xattrs, on either side, leaves them out.
    committed, _, _ = core_helpers.backup(src, str(tmp_path / "repo2"), xattrs=False)
    repo2 = Repository.open(str(tmp_path / "repo2"))
    assert manifest.read_manifest(repo2, resolve(repo2, "latest"))["xattrs"].null_count == committed.info.files + 1
    bare = tmp_path / "bare"
    core_helpers.restore(repo_url, bare, xattrs=False)
    assert os.listxattr(bare / "doc.txt") == [] and os.listxattr(bare / "dir") == []


def test_an_incremental_backup_reads_the_xattrs_of_changed_entries_only_and_keeps_the_others(tmp_path,
                                                                                               monkeypatch):
    """diff.py, "Extended attributes": an entry whose inode and ctime match its parent row keeps the
    parent's attributes without a listxattr; one whose attributes changed (ctime moved) is read again."""
    import time

    from keepflow.tasks.core import xattrs as xattrsmod

    src = make_tree(tmp_path / "src", {"a.txt": "a", "b.txt": "b", "sub/c.txt": "c", "gone.txt": "g"})
    os.setxattr(src / "a.txt", "user.note", b"one")
    os.setxattr(src / "gone.txt", "user.old", b"x")
    os.setxattr(src / "sub", "user.dir", b"d")
    age_tree(src)
    time.sleep(2.5)                 # every ctime out of the first backup's racy window (ctime cannot be aged)
    repo_url = str(tmp_path / "repo")
    first, _, _ = core_helpers.backup(src, repo_url)
    assert first.info.xattrs is True
    repo = Repository.open(repo_url)

    def attrs_of(committed) -> dict:
        table = manifest.read_manifest(repo, committed.info)
        return {r["path"]: {a["name"]: a["value"] for a in r["xattrs"] or []} for r in table.to_pylist()}

    read: list[str] = []
    real = xattrsmod.read

    def counting(path):
        read.append(os.path.relpath(path, src))
        return real(path)

    monkeypatch.setattr(xattrsmod, "read", counting)
    os.setxattr(src / "b.txt", "user.new", b"two")            # b's ctime moves
    os.removexattr(src / "gone.txt", "user.old")
    (src / "d.txt").write_text("new file")
    os.setxattr(src / "d.txt", "user.fresh", b"f")
    second, _, _ = core_helpers.backup(src, repo_url)
    assert sorted(read) == ["b.txt", "d.txt", "gone.txt"]       # not a.txt, sub nor sub/c.txt
    got = attrs_of(second)
    assert got["a.txt"] == {"user.note": b"one"} and got["sub"] == {"user.dir": b"d"}
    assert got["b.txt"] == {"user.new": b"two"} and got["d.txt"] == {"user.fresh": b"f"}
    assert got["gone.txt"] == {} and got["sub/c.txt"] == {}

    # A parent that did not read attributes (--no-xattrs) is no source for them: all are read.
    core_helpers.backup(src, repo_url, xattrs=False)
    read.clear()
    fourth, _, _ = core_helpers.backup(src, repo_url)
    assert len(read) == fourth.info.files + fourth.info.dirs and attrs_of(fourth) == got
    out = tmp_path / "out"
    assert core_helpers.restore(repo_url, out)[2] == []
    assert os.getxattr(out / "a.txt", "user.note") == b"one" and os.getxattr(out / "sub", "user.dir") == b"d"


def test_cli_no_xattrs_and_no_sparse(tmp_path, cli):
    src = make_tree(tmp_path / "src", {"doc": "d"})
    os.setxattr(src / "doc", "user.tag", b"t")
    with open(src / "holes.img", "wb") as f:
        f.truncate(8 * 1024 * 1024)
    age_tree(src)
    repo = tmp_path / "repo"
    assert cli("backup", str(src), str(repo)).returncode == 0
    out = tmp_path / "out"
    restored = cli("restore", str(repo), str(out), "--no-xattrs", "--no-sparse")
    assert restored.returncode == 0, restored.stderr
    assert os.listxattr(out / "doc") == [] and os.stat(out / "holes.img").st_blocks * 512 >= 8 * 1024 * 1024
    plain = tmp_path / "plain"
    assert cli("restore", str(repo), str(plain)).returncode == 0
    assert os.getxattr(plain / "doc", "user.tag") == b"t" and os.stat(plain / "holes.img").st_blocks == 0
    bare = tmp_path / "bare"
    assert cli("backup", str(src), str(bare), "--no-xattrs").returncode == 0
    assert cli("restore", str(bare), str(tmp_path / "out2")).returncode == 0
    assert os.listxattr(tmp_path / "out2" / "doc") == []


def test_names_that_are_not_utf8_round_trip_byte_exact(tmp_path):
    bad_dir, bad_file = b"caf\xe9", b"\xff\xfe.txt"        # Latin-1 folder, junk bytes file
    src = make_tree(tmp_path / "src", {"ok": "fine"})
    base = os.fsencode(src)
    os.mkdir(base + b"/" + bad_dir)
    with open(base + b"/" + bad_dir + b"/" + bad_file, "wb") as f:
        f.write(b"content under odd names")
    with open(base + b"/" + bad_dir + b"/plain.txt", "wb") as f:
        f.write(b"plain name, odd folder")
    os.symlink(b"caf\xe9/" + bad_file, base + b"/link-\xfa")
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    committed, _, _ = core_helpers.backup(src, repo_url)
    assert committed.skipped == [] and committed.info.files == 3

    repo = Repository.open(repo_url)
    rows = {r["path"]: r for r in manifest.read_manifest(repo, resolve(repo, "latest")).to_pylist()}
    assert rows["caf\\xe9/\\xff\\xfe.txt"]["path_bytes"] == b"caf\xe9/\xff\xfe.txt"      # readable key, exact bytes
    assert rows["ok"]["path_bytes"] is None

    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo_url, out)
    assert errors == []
    obase = os.fsencode(out)
    assert sorted(os.listdir(obase)) == sorted([b"ok", bad_dir, b"link-\xfa"])
    with open(obase + b"/" + bad_dir + b"/" + bad_file, "rb") as f:
        assert f.read() == b"content under odd names"
    assert os.readlink(obase + b"/link-\xfa") == b"caf\xe9/" + bad_file
    assert os.stat(obase + b"/" + bad_dir).st_mtime_ns == os.stat(base + b"/" + bad_dir).st_mtime_ns
    # Unchanged on the next backup, found by its readable name with --include.
    again, plan, _ = core_helpers.backup(src, repo_url)
    assert plan["to_read"] == 0 and again.info.unchanged == 3
    part = tmp_path / "part"
    # gitignore syntax: the backslash of the shown form is written twice in a pattern.
    _, _, errors = core_helpers.restore(repo_url, part, includes=["caf\\\\xe9/"])
    assert errors == [] and sorted(os.listdir(os.fsencode(part) + b"/" + bad_dir)) == sorted([bad_file, b"plain.txt"])
