"""Partial copies of a killed writer go at the next run on the same host (issue 11).

After killed replicates, partial `.tmp-` copies on the replica stayed after
successful reruns (14 files, 1,016 MiB in one test), because temporaries were
kept for an hour whoever wrote them. Now a temporary names its writer, so a
rerun removes a dead writer's at once, and keeps a live writer's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from keepflow.tasks.core import replicate, storage

from tests import core_helpers
from tests.conftest import make_tree

# A child that starts a write-once copy under a temporary name and is killed in the middle.
_WRITER = """
import sys, time
from keepflow.tasks.core import storage
tmp = storage.tmp_name(sys.argv[1])
with open(tmp, "wb") as f:
    f.write(b"partial copy")
    f.flush()
    print(tmp, flush=True)
    time.sleep(60)
"""


def _killed_writer(final: str) -> str:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, final], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    tmp = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(tmp)
    return tmp


def test_a_rerun_of_replicate_removes_a_dead_writers_partial_copy_at_once(tmp_path):
    src = make_tree(tmp_path / "src", {"a": "alpha", "b": "beta"})
    repo, replica = tmp_path / "repo", tmp_path / "replica"
    core_helpers.backup(src, repo)
    replicate.replicate(str(repo), str(replica))
    pack = next(p for p in (replica / "packs").rglob("*") if p.is_file())
    dead = _killed_writer(str(pack.parent / ("f" * 64)))
    live = storage.tmp_name(str(pack.parent / ("e" * 64)))      # this process: alive
    with open(live, "wb") as f:
        f.write(b"in progress")

    result = replicate.replicate(str(repo), str(replica))
    assert result.temporaries_removed == 1
    assert not os.path.exists(dead) and os.path.exists(live)
    os.unlink(live)


def test_unnamed_temporaries_keep_the_one_hour_rule(tmp_path):
    folder = tmp_path / "packs"
    folder.mkdir()
    young, old = folder / "x.tmp-0123abcd", folder / "y.tmp-4567cdef"
    young.write_bytes(b"1")
    old.write_bytes(b"2")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    fs, root = storage.open_url(str(tmp_path))
    assert storage.stale_temporaries(fs, root, ["packs"], 3600) == [str(old)]


def test_a_lease_is_released_when_acquiring_is_interrupted(tmp_path, monkeypatch):
    """Ctrl-C between writing our lease and reading the others left the lease behind (issue 11)."""
    import pytest

    from keepflow.tasks.core import lease
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(str(tmp_path / "repo"), create=True)

    def interrupted(_repo):
        # The fault: KeyboardInterrupt at exactly this point (a real Ctrl-C cannot be aimed here).
        raise KeyboardInterrupt

    monkeypatch.setattr(lease, "list_leases", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lease.Holder(repo, "backup", "/src").acquire()
    monkeypatch.undo()
    assert lease.list_leases(repo) == []


def test_ctrl_c_during_a_backup_exits_130_and_releases_the_lease(tmp_path, cli_env):
    from tests.conftest import age_tree, ctrl_c_during_backup

    src = make_tree(tmp_path / "src", {f"big{i:02d}.bin": os.urandom(8 * 1024 * 1024) for i in range(40)})
    age_tree(src)
    ctrl_c_during_backup(src, tmp_path / "repo", cli_env)
