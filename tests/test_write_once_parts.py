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
