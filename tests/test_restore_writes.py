"""The restore's write path for small files: batches in threads, short writes, metadata.

Scenarios: a tree of many small files in several folders restored with its
batches on two threads (local repository into a local target, the case whose
writes are serialised per process: restore._LOCAL_WRITES); a restore whose every
``os.write`` writes fewer bytes than asked; and the metadata each file gets.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from keepflow.tasks.core import restore as core_restore
from keepflow.tasks.core import restore_writer

from tests import core_helpers
from tests.conftest import age_tree, make_tree


def _tree(root, n=300):
    spec = {f"d{i % 7}/sub{i % 3}/f{i}.bin": os.urandom(1 + (i * 37) % 6000) for i in range(n)}
    src = make_tree(root, spec)
    for i, rel in enumerate(sorted(spec)):
        os.chmod(src / rel, (0o600, 0o640, 0o755, 0o444)[i % 4])
    age_tree(src)
    return src, spec


def _same(src, out, spec):
    for rel in spec:
        a, b = os.lstat(src / rel), os.lstat(out / rel)
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
    left = [n for _, _, names in os.walk(out) for n in names if ".kf-tmp-" in n]
    assert not left


def test_batches_on_two_threads_restore_every_file(tmp_path, monkeypatch):
    """Several batches at once (the flow runs two): local writes take turns, nothing is lost."""
    monkeypatch.setattr(core_restore, "MAX_BATCH_FILES", 16)
    src, spec = _tree(tmp_path / "src")
    repo = tmp_path / "repo"
    core_helpers.backup(src, repo)          # the default: format 2
    out = tmp_path / "out"
    plan = core_helpers.plan_restore(repo, out)
    assert len(plan["batches"]) > 4
    holders, seen = [], threading.Lock()
    real = core_restore._restore_blobs

    def watched(*args, **kwargs):
        # a local batch writes its files holding the lock (one batch at a time per process)
        assert core_restore._LOCAL_WRITES.locked()
        with seen:
            holders.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(core_restore, "_restore_blobs", watched)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda b: core_restore.restore_range(plan, b), range(len(plan["batches"]))))
    assert not [e for r in results for e in r.errors]
    assert sum(r.written for r in results) == len(spec)
    core_restore.finish(plan)
    core_restore.cleanup(plan)
    assert len(holders) == len(plan["batches"])
    _same(src, out, spec)


def test_short_writes_still_write_whole_files(tmp_path, monkeypatch):
    """``os.write`` may write less than asked: the rest is written, never dropped."""
    src, spec = _tree(tmp_path / "src", 40)
    repo = tmp_path / "repo"
    core_helpers.backup(src, repo)
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        return real_write(fd, memoryview(data)[: max(1, len(data) // 3)])

    monkeypatch.setattr(restore_writer.os, "write", short_write)
    out = tmp_path / "out"
    _, _, errors = core_helpers.restore(repo, out)
    monkeypatch.undo()
    assert not errors
    assert len(calls) > len(spec)           # every file needed more than one call
    _same(src, out, spec)


@pytest.mark.parametrize("fresh", [True, False])
def test_restored_files_get_mode_and_mtime(tmp_path, fresh):
    """Into a new folder and into an existing one (which runs the overwrite checks)."""
    src, spec = _tree(tmp_path / "src", 60)
    repo = tmp_path / "repo"
    core_helpers.backup(src, repo)
    out = tmp_path / "out"
    if not fresh:
        out.mkdir()
        (out / "d0").mkdir()
        (out / "d0" / "sub0").mkdir()
        first = sorted(r for r in spec if r.startswith("d0/sub0/"))[0]
        (out / first).write_bytes(b"something else")
    _, _, errors = core_helpers.restore(repo, out)
    assert not errors
    _same(src, out, spec)
