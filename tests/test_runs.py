"""Dead processes and what they leave: liveness, the run registry, writer-named temporaries.

Every "dead" process here is a real one: a child Python process that did the
thing (registered a run, wrote a temporary) and was then killed, reaped or
left a zombie. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from keepflow.tasks.core import lease, liveness, runs, treeinfo
from keepflow.tasks.core.repository import Repository
from keepflow.tasks.core.restore_writer import TargetWriter, new_token, temp_name

from tests import core_helpers
from tests.conftest import age_tree, make_tree

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str = "") -> subprocess.Popen:
    """A Python child that runs ``code``, says "ready" and then sleeps until killed."""
    script = textwrap.dedent(code) + "\nimport sys, time\nprint('ready', flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _kill_unreaped(proc: subprocess.Popen) -> None:
    """SIGKILL and wait until the kernel shows a zombie; the parent (we) has not reaped it."""
    proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while liveness.proc_stat(proc.pid)[0] != "Z":
        assert time.monotonic() < deadline, "child did not become a zombie"
        time.sleep(0.01)


def _dead_child(code: str) -> None:
    proc = _child(code)
    proc.kill()
    proc.wait()


# -- liveness ---------------------------------------------------------------------------

def test_a_killed_process_is_gone_as_a_zombie_and_after_reaping():
    proc = _child()
    st = liveness.proc_stat(proc.pid)
    assert st is not None and st[0] in "RS"
    assert not liveness.is_gone(proc.pid, start=st[1])
    _kill_unreaped(proc)
    assert liveness.is_gone(proc.pid)                  # kill(pid, 0) would still succeed here
    proc.wait()
    assert liveness.proc_stat(proc.pid) is None and liveness.is_gone(proc.pid)


def test_a_reused_pid_or_another_boot_is_gone_and_another_host_cannot_be_judged():
    me = liveness.this_process()
    assert liveness.gone(me) is False
    assert liveness.is_gone(me.pid, start=me.start + 1)                      # same pid, another process
    assert liveness.is_gone(me.pid, start=me.start, boot="0badb007")        # a process of an earlier boot
    # Leases record when they were made: a process that started long after cannot be the holder.
    assert liveness.is_gone(me.pid, started_by=time.time() - 86400)
    assert not liveness.is_gone(me.pid, started_by=time.time())
    assert liveness.gone(liveness.ProcessId("another-host", me.pid, me.start, me.boot)) is None
    assert liveness.parse_tag(me.tag()) == me
    assert liveness.parse_tag("not-a-tag") is None


def test_a_zombie_or_reused_pid_does_not_hold_a_lease(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    proc = _child()
    held = lease.Holder(repo, "backup", "/src")
    held.lease.pid = proc.pid
    held._write()
    with pytest.raises(lease.LeaseConflictError):
        lease.Holder(repo, "backup", "/src").acquire()        # a live holder blocks
    _kill_unreaped(proc)
    try:
        lease.Holder(repo, "backup", "/src").acquire().release()   # issue 11: a zombie does not
        assert [held.pid for held in lease.unlock(repo)[0]] == [proc.pid]
    finally:
        proc.wait()
    # A lease written a day ago naming a pid that a younger process has now.
    other = _child()
    try:
        old = lease.Holder(repo, "prune")
        old.lease.pid = other.pid
        old.lease.created = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
        old._write()
        assert old.lease.holder_is_dead()
        lease.Holder(repo, "backup", "/src").acquire().release()
    finally:
        other.kill()
        other.wait()
    lease.unlock(repo)


# -- run registry -----------------------------------------------------------------------

def test_registry_records_live_runs_and_finds_dead_ones_per_repository(tmp_path):
    folder = str(tmp_path / "runs")
    repo = str(tmp_path / "repo")
    mine = runs.register(folder, "run-live", "backup-src-1", "backup", repo, "http://api")
    assert stat.S_IMODE(os.stat(mine.path).st_mode) == 0o600
    code = f"""
        from keepflow.tasks.core import runs
        runs.register({folder!r}, "run-dead", "prune-repo-2", "prune", {repo + '/'!r}, "http://api")
        runs.register({folder!r}, "run-other-repo", "backup-x-3", "backup", {str(tmp_path / 'other')!r}, None)
    """
    _dead_child(code)
    # The same repository spelled differently (trailing slash, relative) is the same repository.
    rel = os.path.relpath(repo)
    assert {r.flow_run_id for r in runs.records(folder)} == {"run-live", "run-dead", "run-other-repo"}
    assert [r.flow_run_id for r in runs.dead_runs(folder, rel)] == ["run-dead"]
    assert {r.flow_run_id for r in runs.dead_runs(folder)} == {"run-dead", "run-other-repo"}
    (Path(folder) / "half-written.json").write_text('{"flow_run_id": ')     # skipped, not fatal
    runs.unregister(folder, "run-dead")
    runs.unregister(folder, "run-dead")                                   # twice is fine
    assert runs.dead_runs(folder, repo) == []
    assert [r.flow_run_id for r in runs.records(folder) if r.pid == os.getpid()] == ["run-live"]


def test_a_dead_runs_orphaned_helper_is_stopped_but_never_a_reused_pid(tmp_path):
    folder = str(tmp_path / "runs")
    helper = _child()           # stands in for the embedded server a killed run started: a real process
    other = _child()
    try:
        _dead_child(f"""
            from keepflow.tasks.core import runs
            runs.register({folder!r}, "dead-1", "n", "backup", "/r", None, helper_pid={helper.pid})
            runs.register({folder!r}, "dead-2", "n", "backup", "/r", None, helper_pid={other.pid})
        """)
        first, second = sorted(runs.dead_runs(folder, "/r"), key=lambda r: r.flow_run_id)
        assert first.helper_pid == helper.pid and first.helper_start == liveness.proc_stat(helper.pid)[1]
        second.helper_start += 1                    # as if that pid now belonged to another process
        assert not runs.stop_orphaned_helper(second)
        assert runs.stop_orphaned_helper(first)
        assert helper.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None
        live = runs.register(folder, "live", "n", "backup", "/r", None, helper_pid=other.pid)
        assert not runs.stop_orphaned_helper(live)   # its run is alive: its helper is not an orphan
        assert other.poll() is None
    finally:
        for p in (helper, other):
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def prefect_client(prefect_api_url):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


def _running_flow_run(client, name: str):
    from prefect.states import Running

    from keepflow.flows.verify import verify

    run = client.create_flow_run(verify, name=name, parameters={})
    client.set_flow_run_state(run.id, Running(), force=True)
    return run


def test_dead_runs_are_marked_crashed_live_and_final_ones_are_left(tmp_path, prefect_client):
    from prefect.states import Completed, StateType

    from keepflow.flows._runs import api_url, crash_dead_runs

    repo = str(tmp_path / "repo")
    folder = runs.default_folder()
    killed, finished, live, elsewhere = (_running_flow_run(prefect_client, f"t-{n}-{uuid.uuid4().hex[:6]}")
                                         for n in ("killed", "finished", "live", "elsewhere"))
    prefect_client.set_flow_run_state(finished.id, Completed(), force=True)
    ours = api_url()
    _dead_child(f"""
        from keepflow.tasks.core import runs
        for run_id, api in (({str(killed.id)!r}, {ours!r}), ({str(finished.id)!r}, {ours!r}),
                            ({str(elsewhere.id)!r}, "http://127.0.0.1:9/api")):
            runs.register({folder!r}, run_id, "n", "verify", {repo!r}, api)
    """)
    runs.register(folder, str(live.id), live.name, "verify", repo, ours)
    try:
        marked, other = crash_dead_runs(repo, by="test")
        assert [r.flow_run_id for r in marked] == [str(killed.id)]
        assert [r.flow_run_id for r in other] == [str(elsewhere.id)]
        state = prefect_client.read_flow_run(killed.id).state
        assert state.type == StateType.CRASHED and "ended without reporting a final state" in state.message
        assert prefect_client.read_flow_run(finished.id).state.type == StateType.COMPLETED   # never overwritten
        assert prefect_client.read_flow_run(live.id).state.type == StateType.RUNNING
        left = {r.flow_run_id for r in runs.records(folder) if r.repo == runs.repo_key(repo)}
        assert left == {str(live.id), str(elsewhere.id)}
    finally:
        for run in (live, elsewhere):
            runs.unregister(folder, str(run.id))


def test_a_flow_run_registers_itself_and_crashes_dead_runs_of_its_repository(tmp_path, prefect_client):
    from prefect.states import StateType

    from keepflow.flows._runs import api_url
    from keepflow.flows.verify import verify

    src = make_tree(tmp_path / "src", {"a": "1"})
    repo = str(tmp_path / "repo")
    core_helpers.backup(src, repo)
    folder = runs.default_folder()
    killed = _running_flow_run(prefect_client, f"t-killed-{uuid.uuid4().hex[:6]}")
    _dead_child(f"""
        from keepflow.tasks.core import runs
        runs.register({folder!r}, {str(killed.id)!r}, "n", "backup", {repo!r}, {api_url()!r})
    """)
    seen = {}

    # The record exists while the run runs: read it from a hook that runs after ours.
    def look(flow, flow_run, state):
        seen["records"] = [r.flow_run_id for r in runs.records(folder)]
        seen["id"] = str(flow_run.id)

    from keepflow.flows._runs import HOOKS

    checked = verify.with_options(on_running=[*HOOKS["on_running"], look])
    state = checked(repo, return_state=True)
    assert state.is_completed()
    assert seen["id"] in seen["records"]
    assert seen["id"] not in {r.flow_run_id for r in runs.records(folder)}       # removed at the end
    assert prefect_client.read_flow_run(killed.id).state.type == StateType.CRASHED
    assert str(killed.id) not in {r.flow_run_id for r in runs.records(folder)}


# -- temporaries named after their writer -----------------------------------------------

def test_dead_writers_repository_temporaries_go_at_once_others_stay(tmp_path):
    repo = str(tmp_path / "repo")
    tmp = Path(repo) / "tmp"
    tmp.mkdir(parents=True)
    _dead_child(f"""
        from keepflow.tasks.core import liveness
        open({str(tmp)!r} + "/" + liveness.repo_tmp_name(), "wb").write(b"x" * 1000)
    """)
    live = tmp / liveness.repo_tmp_name()                      # ours: a live writer
    live.write_bytes(b"y")
    remote = tmp / f"otherhost-{os.getpid()}-5-0badb007-{uuid.uuid4().hex}"   # judged by gc's hour rule
    remote.write_bytes(b"z")
    odd = tmp / "notes.txt"
    odd.write_bytes(b"?")
    before = set(os.listdir(tmp))
    assert liveness.remove_dead_repo_temporaries(repo) == 1
    assert before - set(os.listdir(tmp)) == {n for n in before if n not in {live.name, remote.name, odd.name}}
    assert live.exists() and remote.exists() and odd.exists()
    assert liveness.remove_dead_repo_temporaries(str(tmp_path / "nothing-here")) == 0


def _dead_token() -> str:
    """A restore-writer token of a process that has since been killed."""
    proc = subprocess.Popen([sys.executable, "-c", "from keepflow.tasks.core.restore_writer import new_token; "
                             "print(new_token(), flush=True); import time; time.sleep(120)"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    token = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    return token


def test_restore_removes_dead_writers_temporaries_and_never_anything_else(tmp_path):
    src = make_tree(tmp_path / "src", {"d1/a": "alpha", "d1/b": b"b" * 5000, "d2/c": "gamma", "top": "t",
                                       "d2/link": ("link", "../top"), "empty": None})
    age_tree(src)
    repo = str(tmp_path / "repo")
    core_helpers.backup(src, repo)
    target = tmp_path / "target"
    core_helpers.restore(repo, target)
    (target / "extra").mkdir()
    # What a killed restore leaves: a partial file, a symlink, in folders being restored into,
    # and one in a folder this restore does not touch.
    _dead_child(f"""
        import os
        from keepflow.tasks.core.restore_writer import new_token, temp_name
        t = new_token()
        open(temp_name({str(target / 'd1')!r}, t, 1), "wb").write(b"partial")
        os.symlink("../top", temp_name({str(target / 'd2')!r}, t, 2))
        open(temp_name({str(target)!r}, t, 3), "wb").write(b"partial")
        open(temp_name({str(target / 'extra')!r}, t, 4), "wb").write(b"not in the snapshot's folders")
        os.mkdir(temp_name({str(target / 'd1')!r}, t, 5))
    """)
    live = Path(temp_name(str(target / "d1"), new_token(), 1))           # a restore running right now
    live.write_bytes(b"in progress")
    old_legacy, new_legacy = target / "d2" / ".kf-tmp-abcdef01-3", target / "d2" / ".kf-tmp-abcdef01-4"
    old_legacy.write_bytes(b"from an earlier keepflow")
    new_legacy.write_bytes(b"from an earlier keepflow, maybe running")
    hour_ago = time.time() - 7200
    os.utime(old_legacy, (hour_ago, hour_ago))
    user = [target / "d1" / ".kf-tmp-notes", target / "d1" / "report.kf-tmp-1",
            target / "d1" / (".kf-tmp-" + "ab" * 4 + "-12x")]
    for p in user:
        p.write_bytes(b"the user's")
    before = {str(p.relative_to(target)) for p in target.rglob("*")}

    plan, _, errors = core_helpers.restore(repo, target)
    assert errors == [] and plan["temporaries_removed"] == 4
    after = {str(p.relative_to(target)) for p in target.rglob("*")}
    gone = before - after
    assert len(gone) == 4 and all(os.path.dirname(g) in ("", "d1", "d2") for g in gone), gone
    assert "d2/" + old_legacy.name in gone
    kept = [live, new_legacy, *user, *(target / "extra").iterdir()]
    kept += [p for p in (target / "d1").iterdir() if p.is_dir()]          # a folder is never removed
    assert all(p.exists() for p in kept) and len(kept) == 7
    # Apart from what is not ours, the target is exactly the snapshot (folder mtimes too).
    skip = {str(p.relative_to(target)) for p in kept} | {"extra"}
    assert {k: v for k, v in treeinfo.describe(str(target)).items() if k not in skip} == treeinfo.describe(str(src))


def test_restore_into_a_remote_target_removes_dead_writers_temporaries(tmp_path):
    import fsspec

    src = make_tree(tmp_path / "src", {"d/a": "alpha", "b": "beta"})
    repo = str(tmp_path / "repo")
    core_helpers.backup(src, repo)
    target = f"memory://kf-{tmp_path.name}/target"
    fs = fsspec.filesystem("memory")
    try:
        core_helpers.restore(repo, target)
        dead = f"/kf-{tmp_path.name}/target/d/" + temp_name("", _dead_token(), 1).lstrip("/")
        live = f"/kf-{tmp_path.name}/target/d/" + temp_name("", new_token(), 1).lstrip("/")
        fs.pipe_file(dead, b"partial")
        fs.pipe_file(live, b"in progress")
        plan, _, errors = core_helpers.restore(repo, target)
        assert errors == [] and plan["temporaries_removed"] == 1
        assert not fs.exists(dead) and fs.exists(live)
    finally:
        fs.rm(f"/kf-{tmp_path.name}", recursive=True)


def _cols(path: str, data: bytes, mode: int = 0o644) -> dict:
    import blake3

    return {"path": [path], "hash": [blake3.blake3(data).hexdigest()], "mode": [stat.S_IFREG | mode],
            "mtime_ns": [1_600_000_000_000_000_000], "mtime_ns_exact": [None], "uid": [None], "gid": [None],
            "size": [len(data)]}


def _wait_for_temp(folder: Path) -> Path:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [p for p in folder.iterdir() if p.name.startswith(".kf-tmp-")]
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError("no temporary appeared")


def test_a_killed_restore_leaves_owner_only_temporaries_that_the_rerun_removes(tmp_path):
    """A child restores a large file; we freeze it (SIGSTOP) the moment its temporary appears,
    look at it, kill it, and restore again."""
    src = make_tree(tmp_path / "src", {"big": os.urandom(1 << 20) * 96, "small": "s"})
    os.chmod(src / "big", 0o644)
    age_tree(src)
    repo = str(tmp_path / "repo")
    core_helpers.backup(src, repo)
    target = tmp_path / "target"
    leftovers = []
    for _ in range(5):          # the write lasts ~0.1 s; a poll every millisecond sees it
        child = subprocess.Popen([sys.executable, "-c", "import sys; from tests import core_helpers; "
                                  "core_helpers.restore(sys.argv[1], sys.argv[2], overwrite='always')",
                                  repo, str(target)], cwd=ROOT)
        while child.poll() is None and not leftovers:
            if target.exists():
                leftovers = [p for p in target.iterdir() if p.name.startswith(".kf-tmp-")]
            time.sleep(0.001)
        child.send_signal(signal.SIGSTOP)
        modes = [stat.S_IMODE(os.lstat(p).st_mode) for p in leftovers if p.exists()]
        child.kill()
        child.wait()
        if modes:
            break
        leftovers = []
    assert modes and set(modes) == {0o600}, "no temporary seen in 5 runs"
    old = os.umask(0)           # whatever the umask, the file's own mode is what ends up there
    try:
        plan, _, errors = core_helpers.restore(repo, target)
    finally:
        os.umask(old)
    assert errors == [] and plan["temporaries_removed"] >= 1
    assert treeinfo.describe(str(target)) == treeinfo.describe(str(src))


def test_a_copy_for_a_second_path_is_owner_only_while_written(tmp_path):
    """Two paths with one blob: the second is copied from the first. A FIFO in place of
    the first holds the copy open while we look at the temporary."""
    import fsspec

    target = tmp_path / "target"
    target.mkdir()
    data = b"secret " * 1000
    writer = TargetWriter(fsspec.filesystem("file"), str(target), "always", False)
    cols = _cols("g", data, 0o640)
    cols = {k: v + v for k, v in cols.items()}
    cols["path"] = ["g", "h"]
    os.mkfifo(target / "g")
    old = os.umask(0)
    try:
        t = threading.Thread(target=writer.copy_from, args=(cols, 0, 1))
        t.start()
        with open(target / "g", "wb") as f:
            f.write(data[:100])
            f.flush()
            tmp = _wait_for_temp(target)
            assert stat.S_IMODE(os.lstat(tmp).st_mode) == 0o600
            f.write(data[100:])
        t.join()
    finally:
        os.umask(old)
    assert writer.result.errors == [] and (target / "h").read_bytes() == data
    assert stat.S_IMODE(os.stat(target / "h").st_mode) == 0o640
