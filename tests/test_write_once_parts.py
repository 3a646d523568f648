"""``storage.write_once_parts``: a pack written from its parts, never joined on local disk.

The parts must land in order and whole, however ``os.writev`` splits them (more
parts than one call takes, short writes), with the same write-once rule as
``write_once``: a taken name is never replaced, and no temporary stays behind.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import fsspec
import pytest

from keepflow.tasks.core import storage, store
from keepflow.tasks.core.known_blobs import KnownBlobs
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers


def _parts(n: int) -> list:
    # bytes, bytearrays, memoryviews and empty parts, as encode_pack2 may return
    out: list = []
    for i in range(n):
        blob = os.urandom(1 + (i * 131) % 5000)
        out.append((bytes, bytearray, memoryview)[i % 3](blob))
        if i % 17 == 0:
            out.append(b"")
    return out


@pytest.mark.parametrize("n", [1, 5, 3000])           # 3000: more than IOV_MAX (1024) buffers
def test_local_parts_land_in_order(tmp_path, n):
    fs = fsspec.filesystem("file")
    parts = _parts(n)
    path = str(tmp_path / "packs" / "ab" / "pack")
    assert storage.write_once_parts(fs, path, parts) is True
    assert Path(path).read_bytes() == b"".join(bytes(p) for p in parts)
    assert storage.write_once_parts(fs, path, [b"other"]) is False      # never replaced
    assert Path(path).read_bytes() == b"".join(bytes(p) for p in parts)
    assert [f for f in os.listdir(tmp_path / "packs" / "ab") if ".tmp-" in f] == []


def test_short_writev_is_resumed(tmp_path, monkeypatch):
    real = os.writev
    calls = []

    def short(fd, buffers):
        calls.append(len(buffers))
        total = sum(len(b) for b in buffers)
        budget = max(1, total // 3)          # a third of what was asked, cutting a buffer in two
        cut = []
        for b in buffers:
            if budget <= 0:
                break
            cut.append(memoryview(b)[:budget])
            budget -= len(cut[-1])
        return real(fd, cut)

    monkeypatch.setattr(storage.os, "writev", short)
    parts = _parts(50)
    path = str(tmp_path / "pack")
    assert storage.write_once_parts(fsspec.filesystem("file"), path, parts) is True
    assert len(calls) > 3
    assert Path(path).read_bytes() == b"".join(bytes(p) for p in parts)


def test_remote_parts_are_joined(tmp_path):
    fs = fsspec.filesystem("memory")
    parts = _parts(10)
    path = f"/kf-parts-{os.getpid()}/pack"
    try:
        assert storage.write_once_parts(fs, path, parts) is True
        assert fs.cat_file(path) == b"".join(bytes(p) for p in parts)
        assert storage.write_once_parts(fs, path, [b"x"]) is False
    finally:
        fs.rm(f"/kf-parts-{os.getpid()}", recursive=True)


def _resident_pages(path: str) -> int:
    """Pages of ``path`` in the page cache (mincore over a read-only mapping; maps nothing in)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def test_local_pack_is_synced_before_its_name_and_left_out_of_the_cache(tmp_path, monkeypatch):
    # The order is watched with a spy on os.link (the publish) around the real
    # fdatasync: a power cut cannot be caused here. The page cache is the real one.
    fs = fsspec.filesystem("file")
    events: list[str] = []
    real_sync, real_link = storage._fdatasync, os.link
    monkeypatch.setattr(storage, "_fdatasync", lambda fd: (events.append("sync"), real_sync(fd))[1])
    monkeypatch.setattr(os, "link", lambda a, b: (events.append("link"), real_link(a, b))[1])
    big = str(tmp_path / "packs" / "ab" / "big")
    parts = [os.urandom(3 * 1024 * 1024), os.urandom(1024 * 1024)]
    assert storage.write_once_parts(fs, big, parts) is True
    assert events == ["sync", "link"]
    assert _resident_pages(big) <= 2             # dropped once on the disk (of 1,024 pages)
    assert Path(big).read_bytes() == b"".join(parts)

    events.clear()
    small = str(tmp_path / "index" / "small")
    assert storage.write_once(fs, small, b"x" * 1000) is True
    assert events == ["sync", "link"]
    assert _resident_pages(small) == 1           # small files (index, manifests) stay cached


def _v2_repo(tmp_path, pack_size: int):
    config = RepoConfig.new_v2()
    config.pack_size = pack_size
    return Repository.init(str(tmp_path / "repo"), config=config)


def test_format_2_packs_are_written_while_the_batch_goes_on(tmp_path, monkeypatch):
    # The first pack's write is held until the batch has filled the next pack:
    # writing on the batch's own thread would never get there (the test would
    # time out in the held write instead).
    repo = _v2_repo(tmp_path, pack_size=64 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02d}").write_bytes(os.urandom(20 * 1024))      # 3-4 files a pack
    real = storage.write_once_parts
    release, threads, sends = threading.Event(), [], []
    real_send = store.PackWriter._send_v2

    def held(fs, path, parts):
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            assert release.wait(20), "the batch never filled a second pack while the first was written"
        return real(fs, path, parts)

    def releasing_send(self):
        sends.append(self.size)
        if len(sends) == 2:
            release.set()         # the batch filled a second pack: the first is not written yet
        real_send(self)

    monkeypatch.setattr(storage, "write_once_parts", held)
    monkeypatch.setattr(store.PackWriter, "_send_v2", releasing_send)
    known = KnownBlobs()
    result = core_helpers.store_files(repo, src, sorted(os.listdir(src)), known)
    assert release.is_set()
    assert threads and all(name.startswith("keepflow-pack") for name in threads)
    assert result.packs_written == len(threads) >= 3
    # every blob's index row names a pack that is on the disk
    keys = set(result.index_rows["key"])
    assert len(result.index_rows["hash"]) == 12 and all(os.path.exists(repo.path(k)) for k in keys)


def test_a_failed_pack_write_on_a_pack_thread_fails_the_batch_and_indexes_nothing(tmp_path, monkeypatch):
    repo = _v2_repo(tmp_path, pack_size=64 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02d}").write_bytes(os.urandom(20 * 1024))
    if (tmp_path / "repo" / "packs").is_dir():
        (tmp_path / "repo" / "packs").rmdir()
    (tmp_path / "repo" / "packs").write_bytes(b"in the way")     # a real fault: no pack can be created
    known = KnownBlobs()
    with pytest.raises(store.RepositoryWriteError):
        core_helpers.store_files(repo, src, sorted(os.listdir(src)), known)
    assert len(known) == 0
    (tmp_path / "repo" / "packs").unlink()
    retried = core_helpers.store_files(repo, src, sorted(os.listdir(src)), known)
    assert retried.blobs_stored == 12 and len(known) == 12
