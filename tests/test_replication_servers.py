"""Distributed backup against real servers: local primary -> S3 + Azure + SFTP replicas.

Runs the real replicate flow (Prefect engine) against SeaweedFS, Azurite and
OpenSSH started by tests/servers.py: a full first replication, an incremental
one, a replica server stopped in the middle (the real process is stopped),
restore from each replica alone, and restore falling back when the primary is
gone.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid

import pytest

from keepflow.tasks.core import replicate as core_replicate
from keepflow.tasks.core import snapshots, treeinfo, verify
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree
from tests.servers import clear_fs_caches


@pytest.fixture
def replicas(s3_server, azure_server, sftp_server):
    tag = uuid.uuid4().hex[:8]
    urls = {"s3": s3_server.url(f"rep-{tag}"), "azure": azure_server.url(f"rep-{tag}"),
            "sftp": sftp_server.url(f"rep-{tag}")}
    options = {urls["s3"]: s3_server.storage_options, urls["azure"]: azure_server.storage_options,
               urls["sftp"]: sftp_server.storage_options}
    return urls, options


def _tree(root, n=120, seed=0):
    return make_tree(root, {f"d{i % 6}/f{i}": os.urandom(3000 + i) for i in range(n)}
                     | {"big.bin": os.urandom(3 * 1024 * 1024), "ln": ("link", "big.bin"), "empty": None})


def test_local_to_s3_azure_sftp_then_incremental(tmp_path, replicas, prefect_api_url):
    from keepflow.flows.replicate import replicate

    urls, options = replicas
    src = _tree(tmp_path / "src")
    age_tree(src)
    primary = str(tmp_path / "primary")
    core_helpers.backup(src, primary)
    first = replicate(primary, list(urls.values()), replica_options=options)
    assert first["failed"] == []
    assert all(o["snapshots_copied"] == 1 and o["created"] for o in first["replicas"])
    before = treeinfo.describe(str(src))

    for name, url in urls.items():     # each replica alone restores the snapshot
        out = tmp_path / f"out-{name}"
        _, _, errors = core_helpers.restore(url, out, storage_options=options[url])
        assert errors == [], name
        assert treeinfo.describe(str(out)) == before, name

    (src / "d0" / "new.txt").write_bytes(os.urandom(5000))
    core_helpers.backup(src, primary)
    second = replicate(primary, list(urls.values()), replica_options=options)
    for o in second["replicas"]:
        assert o["snapshots_copied"] == 1 and o["data_copied"] == 1, o   # only the new pack
        assert o["bytes_copied"] < 100_000
    for url in urls.values():
        status = core_replicate.status(Repository.open(primary), url, options[url])
        assert status.snapshots_missing == [] and status.data_missing == 0


def test_replica_server_stopped_mid_replication(tmp_path, replicas, sftp_server, prefect_api_url):
    """Stop sshd while the SFTP copy is under way: the others complete, SFTP stays consistent."""
    from keepflow.flows.replicate import replicate

    urls, options = replicas
    src = _tree(tmp_path / "src", n=600)
    primary = str(tmp_path / "primary")
    # Small packs, so there are many objects to copy and time to stop the server midway.
    Repository.init(primary, config=RepoConfig.new_v2(pack_size=64 * 1024))
    core_helpers.backup(src, primary)
    total = len([p for p in (tmp_path / "primary" / "packs").rglob("*") if p.is_file()])
    sftp_dir = sftp_server.data / urls["sftp"].rsplit("/", 1)[-1]

    def complete_copies():
        # Copies in flight on SFTP carry a .tmp- name until their rename.
        return [p for folder in ("packs", "objects") if (sftp_dir / folder).exists()
                for p in (sftp_dir / folder).rglob("*") if p.is_file() and ".tmp-" not in p.name]

    def stop_when_copying():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(complete_copies()) >= 3:
                sftp_server.stop()
                return
            time.sleep(0.01)

    stopper = threading.Thread(target=stop_when_copying)
    stopper.start()
    try:
        state = replicate(primary, list(urls.values()), replica_options=options, return_state=True)
        stopper.join()
        assert state.is_failed()
        summary = state.result(raise_on_failure=False)
        assert summary["failed"] == [urls["sftp"]]
        assert urls["sftp"] in state.message and urls["s3"] in state.message
        copied_first = complete_copies()
        assert 3 <= len(copied_first) < total                   # stopped in the middle
        # The stopped replica is consistent: no manifest whose data is incomplete.
        assert not (sftp_dir / "snapshots").exists() or verify.check_structure(str(sftp_dir)).problems == []
        assert snapshots.list_snapshots(Repository.open(str(sftp_dir))) == []
    finally:
        if not sftp_server.running:
            sftp_server.start()
        clear_fs_caches()
    again = replicate(primary, [urls["sftp"]], replica_options=options)
    result = again["replicas"][0]
    assert again["failed"] == [] and result["snapshots_copied"] == 1
    assert result["data_copied"] == total - len(copied_first)       # the rest, nothing twice
    assert verify.verify(str(sftp_dir), read_data=100).problems == []


def test_restore_falls_back_to_a_remote_replica(tmp_path, replicas):
    urls, options = replicas
    src = _tree(tmp_path / "src", n=40)
    primary = str(tmp_path / "primary")
    core_helpers.backup(src, primary)
    core_replicate.replicate(primary, urls["s3"], replica_options=options[urls["s3"]])
    core_replicate.replicate(primary, urls["azure"], replica_options=options[urls["azure"]])
    shutil.rmtree(primary)
    plan, results, errors = core_helpers.restore(primary, tmp_path / "out", fallbacks=[urls["s3"], urls["azure"]],
                                                 fallback_options=options)
    assert errors == [] and plan["repo_url"] == urls["s3"]
    assert treeinfo.describe(str(tmp_path / "out")) == treeinfo.describe(str(src))


def test_restore_into_an_s3_target(tmp_path, s3_server):
    """Restore straight into a bucket: every file lands there, verified."""
    import fsspec

    src = _tree(tmp_path / "src", n=30)
    primary = str(tmp_path / "primary")
    core_helpers.backup(src, primary)
    target = s3_server.unique_url("restored")
    _, results, errors = core_helpers.restore(primary, target, target_options=s3_server.storage_options)
    assert errors == []
    fs, root = fsspec.core.url_to_fs(target, **s3_server.storage_options)
    for rel in ("d0/f0", "big.bin"):
        assert fs.cat_file(f"{root}/{rel}") == (src / rel).read_bytes()
    assert sum(r.written for r in results) == 31


def test_big_objects_stream_to_sftp_and_s3(tmp_path, replicas, monkeypatch):
    """The streaming copy publishes whole objects on SFTP (rename) and S3 (multipart)."""
    urls, options = replicas
    monkeypatch.setattr(core_replicate, "STREAM_ABOVE", 1024 * 1024)
    src = _tree(tmp_path / "src", n=10)
    primary = str(tmp_path / "primary")
    core_helpers.backup(src, primary)
    for name in ("sftp", "s3"):
        url = urls[name]
        core_replicate.replicate(primary, url, replica_options=options[url])
        out = tmp_path / f"out-{name}"
        _, _, errors = core_helpers.restore(url, out, storage_options=options[url])
        assert errors == [] and treeinfo.describe(str(out)) == treeinfo.describe(str(src)), name
