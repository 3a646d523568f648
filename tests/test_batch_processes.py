"""Batches in child processes of this machine (tasks/core/batch_processes.py).

Real processes throughout: the flows run under the test Prefect server, their
batches in forkserver children; the kill test SIGKILLs a real child mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core import batch_processes, progress
from keepflow.tasks.core import restore as core_restore
from keepflow.tasks.core.errors import UsageError

from tests.conftest import KEEPFLOW, age_tree, make_tree
from tests.treecompare import compare, format_differences


@pytest.fixture
def flows(prefect_api_url):
    from keepflow.flows.backup import backup
    from keepflow.flows.restore import restore

    return backup, restore


@pytest.fixture
def in_children(monkeypatch):
    """Batches in two child processes, and small batches so a small tree makes many."""
    monkeypatch.setenv(batch_processes.ENV, "2")
    monkeypatch.setattr(core_backup, "MAX_BATCH_FILES", 40)
    monkeypatch.setattr(core_restore, "MAX_BATCH_FILES", 40)


def _real_tree(root: Path, files: int = 400) -> Path:
    """Many small files, identical contents in different batches, symlinks, two chunked files."""
    spec: dict = {}
    for i in range(files):
        spec[f"d{i % 7}/sub{i % 3}/f{i:04d}.txt"] = f"same contents {i % 25}\n" * (1 + i % 5)
    spec["big/a.bin"] = os.urandom(3 * 1024 * 1024)
    spec["big/b.bin"] = spec["big/a.bin"][: 2 * 1024 * 1024] + os.urandom(1024 * 1024)
    spec["links/to-a"] = ("link", "../big/a.bin")
    spec["links/dangling"] = ("link", "nowhere")
    spec["empty"] = None
    make_tree(root, spec)
    age_tree(root)
    return root


def _children_of_forkserver() -> list[psutil.Process]:
    kids = []
    for child in psutil.Process().children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                kids += child.children()
        except psutil.NoSuchProcess:
            pass
    return kids


def test_batches_run_in_child_processes_and_the_snapshot_restores_exactly(tmp_path, flows, in_children):
    backup, restore = flows
    src = _real_tree(tmp_path / "src")
    repo = str(tmp_path / "repo")
    seen: list[tuple[str, int, int]] = []
    progress.set_sink(lambda phase, files, nbytes: seen.append((phase, files, nbytes)))
    try:
        summary = backup(str(src), repo)
    finally:
        progress.set_sink(None)
    assert summary["exit_code"] == 0 and summary["batches"] >= 5
    pids = {int(where.rsplit(":", 1)[1]) for where in summary["ran_on"]}
    assert os.getpid() not in pids          # every batch ran in a child ...
    assert 1 <= len(pids) <= 2              # ... of a pool of two
    # What the children reported reached this process's sink: the totals, then every file.
    starts = [s for s in seen if s[0] == "store:start"]
    assert starts == [("store:start", summary["files_new"], summary["bytes_read"])]
    assert sum(f for phase, f, _ in seen if phase == "store") == summary["files_new"]

    state = restore(repo, str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    diffs = compare(src, tmp_path / "out")
    assert not diffs, format_differences(diffs)

    # A change, and the next backup (children again) stores only it.
    changed = src / "d1" / "sub1" / "f0001.txt"
    changed.write_text("changed\n")
    os.utime(changed, (time.time() - 20, time.time() - 20))     # out of the racy window, the rest untouched
    second = backup(str(src), repo)
    assert second["files_changed"] == 1 and second["bytes_read"] == len("changed\n")


def test_a_killed_batch_process_is_survived(tmp_path, flows, in_children, monkeypatch):
    """SIGKILL a real child mid-run: its batches fail, are retried in a new pool, the snapshot is whole."""
    backup, restore = flows
    monkeypatch.setattr(core_backup, "MAX_BATCH_FILES", 25)
    src = make_tree(tmp_path / "src", {f"d{i % 20}/f{i:05d}": os.urandom(2048) for i in range(2500)})
    age_tree(src)
    repo = str(tmp_path / "repo")
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for child in _children_of_forkserver():
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one)
    killer.start()
    state = backup(str(src), repo, return_state=True)
    killer.join()
    assert killed, "no batch process was seen to kill"
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["files"] == 2500 and killed[0] not in {int(w.rsplit(":", 1)[1]) for w in summary["ran_on"]}
    out = tmp_path / "out"
    assert restore(repo, str(out), return_state=True).is_completed()
    diffs = compare(src, out)
    assert not diffs, format_differences(diffs)      # and the fixture verifies the repository clean


def test_the_keepflow_command_runs_its_batches_in_children(tmp_path, cli_env):
    """The default for the command: no setting needed (cli_env leaves KEEPFLOW_BATCH_PROCESSES unset)."""
    files = core_backup.MAX_BATCH_FILES + 1000          # two batches at the default size
    src = make_tree(tmp_path / "src", {f"d{i % 10}/f{i}": f"file {i}" for i in range(files)})
    age_tree(src)
    repo = tmp_path / "repo"
    subprocess.run([KEEPFLOW, "init", str(repo)], env=cli_env, check=True, capture_output=True)
    proc = subprocess.Popen([KEEPFLOW, "backup", str(src), str(repo), "--json"], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    import json

    summary = json.loads(out)
    assert summary["batches"] >= 2 and proc.pid not in {int(w.rsplit(":", 1)[1]) for w in summary["ran_on"]}
    restored = subprocess.run([KEEPFLOW, "restore", str(repo), str(tmp_path / "out")], env=cli_env,
                              capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr
    diffs = compare(src, tmp_path / "out")
    assert not diffs, format_differences(diffs)


def test_batches_stay_in_this_process_when_asked_or_when_they_cannot_leave(monkeypatch):
    monkeypatch.setenv(batch_processes.ENV, "2")
    with batch_processes.session():
        assert batch_processes.call(os.getpid, batches=1) == os.getpid()       # one batch: no fork server
        assert batch_processes.call(os.getpid, batches=3, urls=("memory://repo",)) == os.getpid()
        assert batch_processes.call(os.getpid, batches=3, urls=("/tmp/x",)) != os.getpid()
    assert batch_processes.call(os.getpid, batches=3) == os.getpid()            # no session: here
    monkeypatch.setenv(batch_processes.ENV, "0")
    with batch_processes.session():
        assert batch_processes.call(os.getpid, batches=3) == os.getpid()


def test_a_bad_process_count_is_one_line(monkeypatch):
    monkeypatch.setenv(batch_processes.ENV, "many")
    with pytest.raises(UsageError, match="KEEPFLOW_BATCH_PROCESSES='many' is not a number of processes"):
        batch_processes.configured()
    assert batch_processes.threads_for_batches() == 2


def test_an_incremental_backup_maps_one_known_blob_set_for_all_its_processes(tmp_path, flows, in_children,
                                                                              monkeypatch):
    """The plan writes the known-blob set it loaded to the run folder (known_blobs.share) and the
    children map it instead of loading the index each: contents already stored are found known
    in the children (not stored again), new ones are stored once, and the repository verifies."""
    from keepflow.flows.verify import verify
    from keepflow.tasks.core import index, known_blobs
    from keepflow.tasks.core.repository import Repository

    backup, restore = flows
    src = _real_tree(tmp_path / "src")
    repo = str(tmp_path / "repo")
    first = backup(str(src), repo)
    assert first["exit_code"] == 0
    for i in range(120):        # 60 files with contents the repository has, 60 with new contents
        text = f"same contents {i % 25}\n" * (1 + i % 5) if i % 2 else f"new contents {i}\n"
        (src / "added" / f"g{i:03d}.txt").parent.mkdir(exist_ok=True)
        (src / "added" / f"g{i:03d}.txt").write_text(text)
    age_tree(src / "added")

    shared: list[tuple[str, int]] = []
    real_share = known_blobs.share

    def spy(known, path):
        done = real_share(known, path)
        shared.append((path, len(known) if done else 0))
        return done

    monkeypatch.setattr(known_blobs, "SHARE_MIN", 1)         # the test repository is far below 32k blobs
    monkeypatch.setattr(index, "share", spy)                 # what core.backup calls (re-exported there)
    second = backup(str(src), repo)
    assert second["exit_code"] == 0 and second["files_new"] == 120 and second["batches"] >= 3
    indexed = len(known_blobs.indexed_now(Repository.open(repo, None, create=False)))
    assert len(shared) == 1 and shared[0][1] == indexed - 60          # the whole set before it, shared once
    assert not Path(shared[0][0]).exists()                                    # gone with the run folder
    assert os.getpid() not in {int(where.rsplit(":", 1)[1]) for where in second["ran_on"]}
    assert second["blobs_stored"] == 60           # the 60 known contents were found in the shared set
    assert verify(repo, return_state=True).is_completed()
    state = restore(repo, str(tmp_path / "out"), return_state=True)
    assert state.is_completed(), state.message
    diffs = compare(src, tmp_path / "out")
    assert not diffs, format_differences(diffs)


def test_children_build_arrow_tables_without_importing_pandas(monkeypatch):
    """pyarrow's "is this a pandas object?" check would import pandas (23 MiB per child; pandas_probe.py)."""
    from tests.child_calls import arrow_table_from_lists_imports_pandas

    monkeypatch.setenv(batch_processes.ENV, "2")
    with batch_processes.session():
        pid, imported = batch_processes.call(arrow_table_from_lists_imports_pandas, batches=2)
    assert pid != os.getpid() and imported is False


def test_a_run_that_ends_its_session_early_lets_the_children_go_unless_another_run_uses_them(monkeypatch):
    """A backup ends its session before the commit (flows/backup.py): the children must be gone then,
    but not while another run in this process still has batches in them."""
    monkeypatch.setenv(batch_processes.ENV, "2")
    with batch_processes.session() as first, batch_processes.session() as second:
        child = batch_processes.call(os.getpid, batches=2)
        assert child != os.getpid()
        first.end()
        first.end()                                   # once only: the second run's claim stays
        assert batch_processes.call(os.getpid, batches=2) != os.getpid()
        assert psutil.pid_exists(child)
        second.end()
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        assert batch_processes.call(os.getpid, batches=2) == os.getpid()     # no session left: here
    assert batch_processes.call(os.getpid, batches=2) == os.getpid()
