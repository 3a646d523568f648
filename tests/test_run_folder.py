"""The run folder (tasks/core/scratch.py): where it goes, and that it goes away however a run ends.

A failed backup is made with a repository write failure (``packs`` is a
regular file, so the first pack cannot be stored): the batch fails, is not
retried (a permanent error), and the run ends Failed. Afterwards no run
folder is left in the work dir (the temporary folder by default, a given
local folder, or a prefix on the S3 server), and this process holds no
known-blob set for the run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core import scratch
from keepflow.tasks.core.repository import Repository

from tests.conftest import age_tree, make_tree


@pytest.fixture
def flows(prefect_api_url):
    from keepflow.flows.backup import backup
    from keepflow.flows.restore import restore

    return backup, restore


def _broken_repo(tmp_path: Path) -> str:
    """A repository whose ``packs`` is a regular file: storing any small file fails."""
    repo = tmp_path / "repo"
    Repository.init(str(repo))
    (repo / "packs").write_text("in the way")
    return str(repo)


def _source(tmp_path: Path) -> Path:
    src = make_tree(tmp_path / "src", {f"d{i % 3}/f{i}.txt": f"content {i}" for i in range(30)})
    age_tree(src)
    return src


def _cached(repo: str) -> list:
    return [key for key in indexmod.cached_runs() if key[0] == repo]


@pytest.mark.damages_repository   # packs/ is a regular file on purpose
def test_failed_backup_leaves_no_run_folder_in_the_default_temporary_folder(tmp_path, flows, monkeypatch):
    backup, _ = flows
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.delenv(scratch.WORK_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))          # where the default run folder goes
    repo = _broken_repo(tmp_path)
    state = backup(str(_source(tmp_path)), repo, return_state=True)
    assert state.is_failed()
    assert "packs" in str(state.result(raise_on_failure=False))
    assert list(temp.iterdir()) == []
    assert _cached(repo) == []       # the batch loaded the run's known-blob set; the flow dropped it


@pytest.mark.damages_repository
def test_failed_backup_leaves_no_run_folder_on_s3(tmp_path, flows, s3_server, s3_config):
    backup, _ = flows
    work = s3_server.unique_url("work")
    src = _source(tmp_path)
    # The work dir really is used: a plan made with it keeps its state there.
    plan = core_backup.prepare(str(src), str(tmp_path / "plain-repo"), work_dir=work)
    assert plan.scratch.startswith(work + "/keepflow-backup-") and scratch.exists(plan.scratch)
    assert scratch.read_part(plan.scratch, "batch", 0).num_rows == 30
    assert core_backup.cleanup(plan.to_dict())
    fs = s3_server.filesystem()

    def run_folders():
        fs.invalidate_cache()
        return [p for p in fs.find(work, withdirs=True) if "/keepflow-" in p]

    assert run_folders() == []

    repo = _broken_repo(tmp_path)
    state = backup(str(src), repo, work_dir=work, return_state=True)
    assert state.is_failed()
    assert run_folders() == []
    assert _cached(repo) == []


@pytest.mark.damages_repository
def test_cli_failed_backup_removes_its_run_folder(tmp_path, cli, cli_env):
    src = _source(tmp_path)
    repo = _broken_repo(tmp_path)
    work = tmp_path / "work"
    proc = cli("backup", src, repo, "--work-dir", work)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write packs/" in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keepflow: error: "), proc.stderr
    assert work.is_dir() and list(work.iterdir()) == []

    # The default: the temporary folder (TMPDIR), with nothing left behind either.
    temp = tmp_path / "temp"
    temp.mkdir()
    env = dict(cli_env, TMPDIR=str(temp))
    env.pop(scratch.WORK_DIR_ENV, None)
    from tests.conftest import run_cli

    proc = run_cli(["backup", src, repo], env=env)
    assert proc.returncode != 0
    assert [p.name for p in temp.iterdir() if p.name.startswith("keepflow-")] == []


def test_cli_backup_and_restore_leave_no_run_folder(tmp_path, cli_env):
    from tests.conftest import run_cli

    src = _source(tmp_path)
    temp = tmp_path / "temp"
    temp.mkdir()
    env = dict(cli_env, TMPDIR=str(temp))
    env.pop(scratch.WORK_DIR_ENV, None)
    run_cli(["backup", src, tmp_path / "repo"], env=env, check=True)
    run_cli(["restore", tmp_path / "repo", tmp_path / "out"], env=env, check=True)
    assert [p.name for p in temp.iterdir() if p.name.startswith("keepflow-")] == []
    # KEEPFLOW_WORK_DIR is the default when --work-dir is not given.
    work = tmp_path / "work-from-env"
    (src / "new.txt").write_text("new")
    run_cli(["backup", src, tmp_path / "repo"], env=dict(env, KEEPFLOW_WORK_DIR=str(work)), check=True)
    assert work.is_dir() and list(work.iterdir()) == []


def test_run_folder_is_private_and_read_through_fsspec(tmp_path):
    import pyarrow as pa

    folder = scratch.create("backup", "t1", str(tmp_path / "w"))
    assert os.stat(folder).st_mode & 0o777 == 0o700          # the plan names every source path
    table = pa.table({"row": pa.array(range(10), pa.int64())})
    scratch.write_parts(folder, "batch", table, [(0, 4), (4, 10)])
    assert scratch.read_part(folder, "batch", 1)["row"].to_pylist() == list(range(4, 10))
    assert scratch.remove(folder) and not os.path.exists(folder)
    assert scratch.remove(folder)                            # already gone: still fine


def test_memory_work_dir_holds_the_whole_run_state(tmp_path):
    """Any fsspec URL works as a work dir: a backup and restore whose state lives on memory://."""
    from tests import core_helpers

    src = _source(tmp_path)
    work = f"memory://kf-work-{tmp_path.name}"
    committed, plan, _ = core_helpers.backup(src, tmp_path / "repo", work_dir=work)
    assert plan["scratch"].startswith(work + "/keepflow-backup-") and not scratch.exists(plan["scratch"])
    assert plan["repo_config"]["id"] == Repository.open(str(tmp_path / "repo")).config.id
    plan_r, _, errors = core_helpers.restore(tmp_path / "repo", tmp_path / "out", work_dir=work)
    assert errors == [] and not scratch.exists(plan_r["scratch"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d0", "d1", "d2"]


def test_a_killed_runs_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """A run killed with SIGKILL never reaches its finally; the next run in the same work dir cleans up (issue 11)."""
    import signal
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from keepflow.tasks.core import scratch\n"
        f"print(scratch.create('backup', '20261201T000000Z-0123abcd', {str(work)!r}), flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    dead = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.isdir(dead)
    foreign = work / "keepflow-backup-not-ours"          # not a run folder name: never touched
    foreign.mkdir()
    mine = scratch.create("restore", "20261201T000001Z-4567cdef", str(work))
    assert not os.path.exists(dead) and os.path.isdir(mine) and foreign.is_dir()
    again = scratch.create("backup", "20261201T000002Z-89abcdef", str(work))
    assert os.path.isdir(mine) and os.path.isdir(again)      # a live run's folder stays
    scratch.remove(mine)
    scratch.remove(again)
