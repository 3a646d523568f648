"""The flows on Prefect's real engine (session-wide test harness)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from keepflow.tasks.core import treeinfo
from keepflow.tasks.core.backup import MAX_BATCH_FILES, cut_batches

from tests.conftest import make_tree


@pytest.fixture
def flows(prefect_api_url):
    from keepflow.flows.backup import backup
    from keepflow.flows.restore import restore

    return backup, restore


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_batches_are_bounded_for_100k_files():
    sizes = np.full(100_000, 4096, dtype=np.int64)
    batches = cut_batches(np.ones(100_000, dtype=bool), sizes)
    assert len(batches) <= 200
    assert batches[0] == (0, MAX_BATCH_FILES) and batches[-1][1] == 100_000
    big = np.full(20, 100 * 1024 * 1024, dtype=np.int64)
    assert len(cut_batches(np.ones(20, dtype=bool), big)) == 20   # one large file per batch


def test_backup_and_restore_flows_record_batched_task_runs(tmp_path, flows):
    backup, restore = flows
    n = MAX_BATCH_FILES * 2 + 10
    src = make_tree(tmp_path / "src", {f"d{i % 50}/f{i}": f"content {i}" for i in range(n)})
    state = backup(str(src), str(tmp_path / "repo"), tags=["t1"], return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["files_new"] == n and summary["batches"] == 3 and summary["exit_code"] == 0
    runs = _task_runs(state.state_details.flow_run_id)
    names = sorted(r.name for r in runs)
    assert len(runs) == 5, names               # plan + 3 store batches + commit, not one per file
    assert [n for n in names if n.startswith("store-b")] == ["store-b0", "store-b1", "store-b2"]

    rstate = restore(str(tmp_path / "repo"), str(tmp_path / "out"), return_state=True)
    assert rstate.is_completed()
    assert rstate.result()["files_written"] == n
    assert treeinfo.describe(str(src)) == treeinfo.describe(str(tmp_path / "out"))


def test_flow_run_name_says_what_ran(tmp_path, flows):
    backup, _ = flows
    src = make_tree(tmp_path / "my-photos", {"a": "1"})
    state = backup(str(src), str(tmp_path / "repo"), return_state=True)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name.startswith("backup-my-photos-")


def test_backup_writes_summary_artifact(tmp_path, flows):
    backup, _ = flows
    src = make_tree(tmp_path / "src", {"a": "1"})
    state = backup(str(src), str(tmp_path / "repo"), return_state=True)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    keys = {a.key for a in arts}
    assert "backup-summary" in keys
    md = next(a for a in arts if a.key == "backup-summary").data
    assert state.result()["snapshot"] in md


def test_failed_source_fails_the_flow_with_our_error(tmp_path, flows):
    from keepflow.tasks.core.errors import SourceNotFoundError

    backup, _ = flows
    state = backup(str(tmp_path / "missing"), str(tmp_path / "repo"), return_state=True)
    assert state.is_failed()
    with pytest.raises(SourceNotFoundError):
        state.result()


@pytest.mark.damages_repository
def test_restore_with_corrupt_data_ends_failed_with_summary(tmp_path, flows):
    backup, restore = flows
    src = make_tree(tmp_path / "src", {"only": "precious bytes"})
    backup(str(src), str(tmp_path / "repo"))
    packs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "repo" / "packs") for f in fs]
    assert len(packs) == 1               # its one blob starts at byte 0 (format 2: its ciphertext)
    data = bytearray(Path(packs[0]).read_bytes())
    data[0] ^= 0xFF
    Path(packs[0]).write_bytes(bytes(data))
    state = restore(str(tmp_path / "repo"), str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    summary = state.result(raise_on_failure=False)
    assert [e["path"] for e in summary["errors"]] == ["only"]
    assert not (tmp_path / "out" / "only").exists()


def test_flows_are_importable_and_composable(tmp_path, flows):
    """Another flow can call keepflow's flows as subflows."""
    from prefect import flow

    backup, restore = flows

    @flow
    def nightly(src: str, repo: str, out: str) -> int:
        backup(src, repo)
        return restore(repo, out)["files_written"]

    src = make_tree(tmp_path / "src", {"x": "1", "y/z": "2"})
    assert nightly(str(src), str(tmp_path / "repo"), str(tmp_path / "out")) == 2
