"""Replication between local repositories and restore failover (real servers: test_replication_servers.py).

The primary is the default, format 2; ``test_a_format_1_primary_replicates_as_before`` covers format 1.
Format 2's own cases (no password, key files, byte copies) are in test_format2_repair_replicate.py.
"""

from __future__ import annotations

import os
import shutil

import pyarrow.compute as pc
import pytest

from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core import replicate as core_replicate
from keepflow.tasks.core import snapshots, treeinfo
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree


def _primary(tmp_path, config: RepoConfig | None = None):
    src = make_tree(tmp_path / "src", {f"d{i % 4}/f{i}": os.urandom(500 + i) for i in range(60)}
                    | {"big": os.urandom(2 * 1024 * 1024), "ln": ("link", "big"), "empty": None})
    age_tree(src)
    repo = str(tmp_path / "primary")
    if config is not None:
        Repository.init(repo, config=config)
    core_helpers.backup(src, repo)
    return src, repo


@pytest.fixture
def primary(tmp_path):
    return _primary(tmp_path)


def test_a_format_1_primary_replicates_as_before(tmp_path):
    src, repo = _primary(tmp_path, RepoConfig())
    replica = tmp_path / "replica"
    result = core_replicate.replicate(repo, str(replica))
    assert result.created and result.snapshots_copied == 1 and result.data_copied == 2   # a pack, an object
    assert (replica / "keepflow.json").read_bytes() == (tmp_path / "primary" / "keepflow.json").read_bytes()
    assert Repository.open(str(replica)).version == 1 and not (replica / "keys").exists()
    assert (result.keys_copied, result.keys_removed, result.not_copied) == (0, 0, [])
    status = core_replicate.status(Repository.open(repo), str(replica))
    assert status.snapshots_missing == [] and len(status.snapshots_present) == 1 and status.data_missing == 0
    _, _, errors = core_helpers.restore(str(replica), tmp_path / "out")
    assert errors == [] and treeinfo.describe(str(tmp_path / "out")) == treeinfo.describe(str(src))
    again = core_replicate.replicate(repo, str(replica))
    assert (again.data_copied, again.index_copied, again.snapshots_copied) == (0, 0, 0)


def test_replica_is_a_full_repository_with_same_id(tmp_path, primary):
    src, repo = primary
    replica = str(tmp_path / "replica")
    result = core_replicate.replicate(repo, replica)
    assert result.created and result.snapshots_copied == 1 and result.data_copied >= 2
    assert Repository.open(replica).config.id == Repository.open(repo).config.id
    _, _, errors = core_helpers.restore(replica, tmp_path / "out")
    assert errors == []
    assert treeinfo.describe(str(tmp_path / "out")) == treeinfo.describe(str(src))


def test_second_run_copies_only_new_data(tmp_path, primary):
    src, repo = primary
    replica = str(tmp_path / "replica")
    core_replicate.replicate(repo, replica)
    again = core_replicate.replicate(repo, replica)
    assert (again.data_copied, again.index_copied, again.snapshots_copied) == (0, 0, 0)
    (src / "d0" / "new").write_bytes(os.urandom(3000))
    core_helpers.backup(src, repo)
    third = core_replicate.replicate(repo, replica)
    assert third.snapshots_copied == 1 and third.data_copied == 1 and third.bytes_copied < 100_000
    assert len(snapshots.list_snapshots(Repository.open(replica))) == 2


def test_status_lists_missing_snapshots_and_bytes(tmp_path, primary):
    src, repo = primary
    replica = str(tmp_path / "replica")
    before = core_replicate.status(Repository.open(repo), replica)
    assert not before.exists and len(before.snapshots_missing) == 1 and before.data_bytes_missing > 2_000_000
    core_replicate.replicate(repo, replica)
    (src / "another").write_bytes(os.urandom(1000))
    core_helpers.backup(src, repo)
    behind = core_replicate.status(Repository.open(repo), replica)
    assert behind.exists and len(behind.snapshots_present) == 1 and len(behind.snapshots_missing) == 1
    assert behind.data_missing == 1


def test_replica_of_another_repository_is_refused(tmp_path, primary):
    _, repo = primary
    other = str(tmp_path / "other")
    Repository.init(other)
    with pytest.raises(core_replicate.ReplicaMismatchError, match="different keepflow repository"):
        core_replicate.replicate(repo, other)


def test_damaged_copy_on_replica_is_replaced(tmp_path, primary):
    src, repo = primary
    replica = tmp_path / "replica"
    core_replicate.replicate(repo, str(replica))
    pack = next(p for p in (replica / "packs").rglob("*") if p.is_file())
    pack.write_bytes(pack.read_bytes()[:100])           # a truncated copy
    result = core_replicate.replicate(repo, str(replica))
    assert result.replaced_damaged == 1 and result.data_copied == 1
    _, _, errors = core_helpers.restore(str(replica), tmp_path / "out")
    assert errors == []


def test_restore_falls_back_when_primary_is_gone(tmp_path, primary):
    src, repo = primary
    replica = str(tmp_path / "replica")
    core_replicate.replicate(repo, replica)
    shutil.rmtree(repo)
    plan, results, errors = core_helpers.restore(repo, tmp_path / "out", fallbacks=[replica])
    assert errors == [] and plan["repo_url"] == replica
    assert treeinfo.describe(str(tmp_path / "out")) == treeinfo.describe(str(src))


def test_restore_reads_corrupt_blobs_from_replica(tmp_path, primary):
    src, repo = primary
    replica = str(tmp_path / "replica")
    core_replicate.replicate(repo, replica)
    # One flipped byte inside a small file's blob and inside a large one (format 1: the big
    # object; format 2: one of its chunks).
    idx = indexmod.load_index(Repository.open(repo))
    data = idx.filter(pc.equal(idx["type"], 0)) if "type" in idx.column_names else idx
    victims = {}
    columns = (data["key"].to_pylist(), data["offset"].to_pylist(), data["length"].to_pylist())
    for key, offset, length in zip(*columns, strict=True):
        victims.setdefault(length > 100_000, (key, offset + length // 2))
    assert len(victims) == 2
    for key, at in victims.values():
        path = tmp_path / "primary" / key
        stored = bytearray(path.read_bytes())
        stored[at] ^= 0xFF
        path.write_bytes(bytes(stored))
    plan, results, errors = core_helpers.restore(repo, tmp_path / "out", fallbacks=[replica])
    assert errors == []
    used = {}
    for r in results:
        for url, n in r.sources.items():
            used[url] = used.get(url, 0) + n
    assert used.get(replica, 0) >= 2                    # both damaged blobs came from the replica
    assert treeinfo.describe(str(tmp_path / "out")) == treeinfo.describe(str(src))


def test_replicate_flow_one_failing_replica_does_not_stop_others(tmp_path, primary, prefect_api_url):
    from keepflow.flows.replicate import replicate

    _, repo = primary
    good = str(tmp_path / "good")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the replica's folder should be")
    bad = str(blocker / "replica")                     # a real failure: cannot create it
    state = replicate(repo, [bad, good], return_state=True)
    assert state.is_failed()
    assert bad in state.message and good in state.message
    summary = state.result(raise_on_failure=False)
    assert summary["failed"] == [bad]
    assert len(snapshots.list_snapshots(Repository.open(good))) == 1


def test_big_objects_are_streamed_to_the_replica(tmp_path, primary, monkeypatch):
    """Objects above the streaming threshold are copied in chunks, never held whole in memory."""
    src, repo = primary
    monkeypatch.setattr(core_replicate, "STREAM_ABOVE", 1024 * 1024)   # the 2 MiB object now streams
    replica = str(tmp_path / "replica")
    result = core_replicate.replicate(repo, replica)
    assert result.bytes_copied > 2 * 1024 * 1024
    _, _, errors = core_helpers.restore(replica, tmp_path / "out")
    assert errors == [] and treeinfo.describe(str(tmp_path / "out")) == treeinfo.describe(str(src))
