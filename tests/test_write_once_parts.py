"""``storage.write_once_parts``: a pack written from its parts, never joined on local disk.

The parts must land in order and whole, however ``os.writev`` splits them (more
parts than one call takes, short writes), with the same write-once rule as
``write_once``: a taken name is never replaced, and no temporary stays behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from keepflow.tasks.core import storage


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
    import ctypes
    import mmap

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
