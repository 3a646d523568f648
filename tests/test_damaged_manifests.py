"""A manifest that cannot be read is reported by name, never skipped silently.

Found by truncating the newest manifest: `keepflow snapshots` listed one
snapshot fewer and `restore --snapshot latest` restored the *older* snapshot
with exit 0. `latest` must never mean "latest readable", and prune must never
collect data that a damaged manifest might reference.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from keepflow.tasks.core import analysis, gc, snapshots
from keepflow.tasks.core.errors import DamagedManifestError
from keepflow.tasks.core.repository import Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree

pytestmark = pytest.mark.damages_repository   # every test here leaves a damaged manifest


@pytest.fixture
def two_snapshots(tmp_path):
    """A repository with two snapshots whose newest manifest is truncated."""
    src = make_tree(tmp_path / "src", {"a.txt": "first", "b/c.txt": "shared"})
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    core_helpers.backup(src, repo_url)
    (src / "a.txt").write_text("second version")
    (src / "d.txt").write_text("new in the second snapshot")
    age_tree(src)
    core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    older, newer = snapshots.list_snapshots(repo)
    path = tmp_path / "repo" / "snapshots" / newer.key
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return repo_url, older, newer


def test_listing_raises_by_default_and_collects_on_request(two_snapshots):
    repo_url, older, newer = two_snapshots
    repo = Repository.open(repo_url)
    with pytest.raises(DamagedManifestError) as err:
        snapshots.list_snapshots(repo)
    assert newer.key in str(err.value) and newer.id[:8] in str(err.value)
    damaged: list = []
    assert [s.id for s in snapshots.list_snapshots(repo, damaged)] == [older.id]
    assert [d.name for d in damaged] == [newer.key] and damaged[0].id == newer.id
    assert abs(damaged[0].time - newer.datetime) < dt.timedelta(seconds=1)


def test_latest_and_as_of_never_skip_over_a_damaged_manifest(two_snapshots):
    repo_url, older, newer = two_snapshots
    repo = Repository.open(repo_url)
    with pytest.raises(DamagedManifestError, match="the latest snapshot"):
        snapshots.resolve(repo, "latest")
    with pytest.raises(DamagedManifestError, match=newer.key):
        snapshots.resolve(repo, newer.id[:6])
    after_both = (newer.datetime + dt.timedelta(seconds=5)).isoformat()
    with pytest.raises(DamagedManifestError, match="at or before"):
        snapshots.resolve(repo, as_of=after_both)
    # What lies before the damaged one is still reachable, by id or by time.
    assert snapshots.resolve(repo, older.id[:8]).id == older.id
    between = (older.datetime + (newer.datetime - older.datetime) / 2).isoformat()
    assert snapshots.resolve(repo, as_of=between).id == older.id


def test_a_foreign_file_with_no_telling_name_blocks_latest(tmp_path):
    src = make_tree(tmp_path / "src", {"a": "x"})
    repo_url = str(tmp_path / "repo")
    core_helpers.backup(src, repo_url)
    (tmp_path / "repo" / "snapshots" / "notes.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DamagedManifestError, match="notes.parquet"):
        snapshots.resolve(Repository.open(repo_url), "latest")


def test_prune_refuses_to_collect_while_a_manifest_is_damaged(two_snapshots):
    repo_url, older, newer = two_snapshots
    repo = Repository.open(repo_url)
    keys_before = sorted(os.listdir(os.path.join(repo_url, "packs")))
    with pytest.raises(DamagedManifestError, match=newer.key):
        gc.referenced_hashes(repo)
    with pytest.raises(DamagedManifestError):
        gc.mark(repo)
    assert sorted(os.listdir(os.path.join(repo_url, "packs"))) == keys_before


def test_analysis_names_the_damaged_manifest(two_snapshots):
    repo_url, _, newer = two_snapshots
    with pytest.raises(DamagedManifestError, match=newer.key):
        analysis.load_snapshots(repo_url)


def test_backup_still_works_and_picks_a_readable_parent(two_snapshots, tmp_path):
    repo_url, older, _ = two_snapshots
    committed, plan, _ = core_helpers.backup(tmp_path / "src", repo_url)
    assert plan["parent"] == older.id
    assert committed.info.files == 3


def test_cli_snapshots_warns_and_restore_latest_fails_naming_the_file(two_snapshots, cli, tmp_path):
    repo_url, older, newer = two_snapshots
    listed = cli("snapshots", repo_url, "--json")
    assert listed.returncode == 3
    assert [s["id"] for s in json.loads(listed.stdout)] == [older.id]
    assert newer.key in listed.stderr and listed.stderr.startswith("keepflow: warning: ")

    out = tmp_path / "out"
    restored = cli("restore", repo_url, str(out))
    assert restored.returncode == 1
    assert restored.stderr.count("\n") == 1 and newer.key in restored.stderr
    assert not out.exists() or not any(out.iterdir())

    by_id = cli("restore", repo_url, str(out), "--snapshot", older.id[:8])
    assert by_id.returncode == 0, by_id.stderr
    assert (out / "a.txt").read_text() == "first" and not (out / "d.txt").exists()
