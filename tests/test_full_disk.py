"""A full repository disk: one line, its own exit code (12), no retries, no half-written leftovers.

The disk is really full: the repository lives on a 4 MiB tmpfs mounted for the
test (needs root, as in CI). Found before: ENOSPC reached the user as
"unexpected RepositoryWriteError ... rerun with --debug" after two retries.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from keepflow.tasks.core import store, verify
from keepflow.tasks.core.errors import EXIT_NO_SPACE, RepositoryFullError, RepositoryWriteError
from keepflow.tasks.core.repository import Repository
from keepflow.tasks.retry import is_transient

from tests.conftest import age_tree, make_tree


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real filesystem that runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the full-disk tests mount a tmpfs and need root in CI")
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _incompressible_tree(root, total_mib: int):
    # Small files (packed): 64 KiB each, random, so nothing deduplicates.
    make_tree(root, {f"d{i // 32}/f{i:04d}.bin": os.urandom(64 * 1024) for i in range(total_mib * 16)})
    age_tree(root)
    return root


def test_full_disk_is_permanent_and_named():
    full = RepositoryWriteError("x")
    full.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert not is_transient(full)
    assert not is_transient(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert isinstance(store.storage.write_failure("cannot write packs/ab/cd to /r: boom", full.__cause__),
                      RepositoryFullError)


def test_backup_onto_a_full_disk_fails_once_with_exit_12(tmp_path, small_disk, cli):
    src = _incompressible_tree(tmp_path / "src", total_mib=24)
    repo = small_disk / "repo"
    proc = cli("backup", str(src), str(repo))
    assert proc.returncode == EXIT_NO_SPACE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keepflow: error: ")
    assert "no space left" in lines[0] and "unexpected" not in lines[0]
    # Nothing half-written stays behind to hold the space, and no snapshot exists.
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(repo) for f in files if ".tmp-" in f]
    assert leftovers == []
    assert list((repo / "snapshots").glob("*")) == []        # any format's manifests (format 2: no .parquet)
    assert verify.check_structure(str(repo)).problems == []


def test_store_batch_task_is_not_retried_on_a_full_disk(tmp_path, small_disk, prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from keepflow.flows.backup import backup

    src = _incompressible_tree(tmp_path / "src", total_mib=24)
    repo = small_disk / "repo"
    Repository.init(str(repo))
    state = backup(str(src), str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(RepositoryFullError):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    failed = [r for r in runs if r.name.startswith("store-b") and r.state.is_failed()]
    assert failed and all(r.run_count == 1 for r in failed), [(r.name, r.run_count) for r in runs]
