"""Scanning and diffing: metadata, exclusions, the unchanged rule, the racy guard."""

from __future__ import annotations

import gc
import os
import stat

import pyarrow as pa
import pytest

from keepflow.tasks.core import diff as diffmod
from keepflow.tasks.core import memory
from keepflow.tasks.core import scan as scanmod
from keepflow.tasks.core.errors import BadPatternError, SourceNotFoundError
from keepflow.tasks.core.scan import scan

from tests import core_helpers
from tests.conftest import age_tree, make_tree


def _paths(table):
    return table["path"].to_pylist()


def test_scan_records_types_and_metadata(tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": "hello", "sub/b.bin": b"\0" * 10, "empty": None,
                                       "link": ("link", "a.txt"), "dangling": ("link", "nowhere")})
    os.chmod(src / "a.txt", 0o600)
    table = scan(str(src)).table
    rows = {r["path"]: r for r in table.to_pylist()}
    assert _paths(table) == sorted(_paths(table))
    assert rows["a.txt"]["type"] == "file" and rows["a.txt"]["size"] == 5
    assert stat.S_IMODE(rows["a.txt"]["mode"]) == 0o600
    assert rows["sub"]["type"] == "dir" and rows["empty"]["type"] == "dir"
    assert rows["link"]["type"] == "symlink" and rows["link"]["link_target"] == "a.txt"
    assert rows["dangling"]["link_target"] == "nowhere"
    assert rows["a.txt"]["inode"] == os.stat(src / "a.txt").st_ino


def test_scan_records_fifos_reports_sockets_and_never_follows_links(tmp_path):
    import socket

    src = make_tree(tmp_path / "src", {"f": "x", "out": ("link", "/etc")})
    os.mkfifo(src / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        result = scan(str(src))
    assert _paths(result.table) == ["f", "out", "pipe"]
    assert result.table.to_pylist()[2]["type"] == "fifo"
    assert result.skipped == [("sock", "a socket is not backed up (it belongs to a running program)")]


def test_folders_listed_ahead_on_threads_keep_walk_order_and_stay_bounded(tmp_path, monkeypatch):
    """scan._ReadAhead: folders are listed on its threads, at most AHEAD ahead, and what they
    report reaches ``skipped`` in path order, as a walk in one thread gives it."""
    import socket
    import threading

    from keepflow.tasks.core import scan as scanmod

    spec = {f"d{i:02d}/s{j}/f{k}": f"{i} {j} {k}" for i in range(12) for j in range(3) for k in range(5)}
    src = make_tree(tmp_path / "src", spec)
    socks = []
    for i in range(12):                     # a socket in every top folder: one report each
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(src / f"d{i:02d}" / "sock"))
        socks.append(sock)
    readers: list[str] = []
    most = [0]
    read, prefetch = scanmod._FolderReader.read, scanmod._ReadAhead.prefetch

    def recording_read(self, where, skipped):
        readers.append(threading.current_thread().name)
        return read(self, where, skipped)

    def recording_prefetch(self, folder):
        prefetch(self, folder)
        most[0] = max(most[0], len(self.pending))

    monkeypatch.setattr(scanmod._FolderReader, "read", recording_read)
    monkeypatch.setattr(scanmod._ReadAhead, "prefetch", recording_prefetch)
    try:
        result = scan(str(src))
    finally:
        for sock in socks:
            sock.close()
    assert _paths(result.table) == sorted(_paths(result.table))
    assert len(readers) == 1 + 12 + 36                                  # every folder listed once
    assert sum(name.startswith("keepflow-scan") for name in readers) >= 12
    assert 1 <= most[0] <= scanmod._ReadAhead.AHEAD
    assert [path for path, _ in result.skipped] == [f"d{i:02d}/sock" for i in range(12)]
    assert not any(t.name.startswith("keepflow-scan") for t in threading.enumerate())    # the pool is gone


def test_excludes_and_nested_ignore_files(tmp_path):
    src = make_tree(tmp_path / "src", {
        "keep.txt": "k", "drop.log": "d", "build/out.o": "o",
        "sub/.keepflowignore": "*.tmp\nsecret/\n", "sub/a.tmp": "t", "sub/secret/key": "s", "sub/ok": "o",
        "top.tmp": "tmp outside sub is kept",
    })
    table = scan(str(src), excludes=["*.log", "build/"]).table
    paths = set(_paths(table))
    assert {"keep.txt", "sub/ok", "top.tmp", "sub/.keepflowignore"} <= paths
    assert not paths & {"drop.log", "build", "build/out.o", "sub/a.tmp", "sub/secret", "sub/secret/key"}


def test_repository_inside_source_is_excluded(tmp_path):
    src = make_tree(tmp_path / "src", {"a": "1", "repo/keepflow.json": "{}"})
    table = scan(str(src), exclude_paths=[str(src / "repo")]).table
    assert _paths(table) == ["a"]


def test_missing_source(tmp_path):
    with pytest.raises(SourceNotFoundError):
        scan(str(tmp_path / "nope"))


@pytest.mark.parametrize("bad", ["!", "[z-a]"])
def test_bad_pattern_is_reported(tmp_path, bad):
    with pytest.raises(BadPatternError, match="gitignore syntax"):
        scan(str(tmp_path), excludes=[bad])


def test_bad_pattern_in_ignore_file_names_the_file(tmp_path):
    src = make_tree(tmp_path / "src", {"sub/.keepflowignore": "!\n"})
    with pytest.raises(BadPatternError, match=".keepflowignore"):
        scan(str(src))


def _parent_from(scan_table, hashes=None):
    h = hashes or [("h" + p if t == "file" else None)
                   for p, t in zip(_paths(scan_table), scan_table["type"].to_pylist(), strict=True)]
    return scan_table.append_column("hash", pa.array(h, pa.string()))


def test_diff_unchanged_new_changed_deleted(tmp_path):
    src = make_tree(tmp_path / "src", {"same": "1", "grow": "2", "gone": "3"})
    age_tree(src)
    first = scan(str(src))
    parent = _parent_from(first.table)
    (src / "grow").write_text("22")
    (src / "gone").unlink()
    (src / "new").write_text("4")
    result = diffmod.diff(scan(str(src)).table, parent, first.start_ns)
    assert (result.new, result.changed, result.unchanged, result.deleted) == (1, 1, 1, 1)
    to_read = set(_paths(result.to_read))
    assert to_read == {"grow", "new"}
    rows = {r["path"]: r for r in result.table.to_pylist()}
    assert rows["same"]["hash"] == "hsame"       # reused, file never opened
    assert rows["grow"]["hash"] is None


def test_diff_inode_or_ctime_change_means_reread(tmp_path):
    src = make_tree(tmp_path / "src", {"a": "1"})
    age_tree(src)
    first = scan(str(src))
    parent = _parent_from(first.table)
    st = os.stat(src / "a")
    os.chmod(src / "a", 0o600)                  # changes ctime only
    os.utime(src / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert set(_paths(diffmod.diff(scan(str(src)).table, parent, first.start_ns).to_read)) == {"a"}


def test_racy_files_are_reread(tmp_path):
    src = make_tree(tmp_path / "src", {"fresh": "1", "old": "2"})
    age_tree(src)
    (src / "fresh").write_text("1")             # mtime = now: inside the window
    first = scan(str(src))
    parent = _parent_from(first.table)
    again = diffmod.diff(scan(str(src)).table, parent, first.start_ns)
    assert set(_paths(again.to_read)) == {"fresh"}


def test_rehash_reads_everything(tmp_path):
    src = make_tree(tmp_path / "src", {"a": "1", "b": "2", "d/c": "3"})
    age_tree(src)
    first = scan(str(src))
    result = diffmod.diff(scan(str(src)).table, _parent_from(first.table), first.start_ns, rehash=True)
    assert set(_paths(result.to_read)) == {"a", "b", "d/c"}


def test_final_counts_classify_by_content():
    table = pa.table({"type": ["file", "file", "file", "dir"], "hash": ["x", "y", "z", None],
                      "parent_hash": ["x", "old", None, None]})
    assert diffmod.final_counts(table) == {"new": 1, "changed": 1, "unchanged": 1}


def test_scan_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/kf-scan/a.txt": b"abc", "/kf-scan/d/b.txt": b"defg"})
    try:
        table = scan("memory://kf-scan").table
        rows = {r["path"]: r for r in table.to_pylist()}
        assert rows["a.txt"]["size"] == 3 and rows["d/b.txt"]["size"] == 4
        assert rows["a.txt"]["inode"] is None
    finally:
        fs.rm("/kf-scan", recursive=True)


def test_the_collector_is_paused_while_a_backup_plans_and_back_afterwards(tmp_path, monkeypatch):
    """memory.gc_paused: the plan's scan runs without the cyclic collector (a spy on the
    folder reader asks), and the collector is on again once the plan is made, failed or not."""
    src = make_tree(tmp_path / "src", {f"d{i}/f{j}": f"{i} {j}" for i in range(3) for j in range(5)})
    seen: list[bool] = []
    read = scanmod._FolderReader.read

    def spying_read(self, where, skipped):
        seen.append(gc.isenabled())
        return read(self, where, skipped)

    monkeypatch.setattr(scanmod._FolderReader, "read", spying_read)
    assert gc.isenabled()
    plan = core_helpers.plan_backup(src, tmp_path / "repo")
    assert seen and not any(seen)                  # every folder was listed with the collector off
    assert gc.isenabled()
    core_helpers.store_all(plan)

    def failing_read(self, where, skipped):
        raise RuntimeError("a fault in the scan")

    monkeypatch.setattr(scanmod._FolderReader, "read", failing_read)
    with pytest.raises(RuntimeError):
        core_helpers.plan_backup(src, tmp_path / "repo2")
    assert gc.isenabled()

    # nested pauses, and a collector the caller had switched off stays off
    with memory.gc_paused():
        with memory.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with memory.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
