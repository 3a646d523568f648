"""Batches on a real Dask cluster: a scheduler and two workers as separate processes.

The cluster is what a user starts by hand: ``dask scheduler`` and two
``dask worker`` processes (one thread each), each worker with its own
working directory, ``TMPDIR``, ``PREFECT_HOME`` and ``--local-directory``, and
``PREFECT_API_URL`` pointing at the session's Prefect test server. Each worker
runs in a private mount namespace (``unshare --mount``, as root) with a
tmpfs mounted on /tmp, so this process's temporary folder (the flow's default
work dir, and every pytest tmp_path) does not exist for them; their own
folders live outside /tmp. The source, the repository and the work dir are
on the S3 server (SeaweedFS): the test process finds their options in a
per-URL storage config file, the workers in their environment.

What is asserted: the workers really cannot see the test's files; a backup
run there restores exactly and verifies clean (also when the restore and
verify run on the cluster); both workers ran batches (each batch names the
process that ran it, and the workers are asked for theirs); at the end no run
folder is left and no worker holds the run's known-blob set; a worker killed
with SIGKILL while it runs a batch, once the first batches have completed, is
survived (the scheduler gives its work to the other worker) with a consistent
repository. And ``keepflow ... --workers 2`` (a local process cluster) on a
local tree, also with the password in no environment (``--password-file``, a
Secret block): the workers are handed it. Usage errors for impossible set-ups
are one line, exit 2.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core import restore as core_restore
from keepflow.tasks.core import scratch
from keepflow.tasks.core.verify import check_structure

from tests.conftest import VENV_BIN, age_tree, make_tree, run_cli
from tests.servers import free_port
from tests.treecompare import compare, format_differences

DASK = str(VENV_BIN / "dask")
# Worker folders must be outside /tmp, which the workers see as an empty tmpfs.
WORKER_ROOT = Path("/var/tmp")
BATCH_FILES = 40          # small batches, so a few hundred files make a dozen task runs


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /tmp && test -z "$(ls -A /tmp)"'],
                          capture_output=True)
    return proc.returncode == 0


def _private_tmp_script(home: Path) -> str:
    """Shell commands that put an empty tmpfs on /tmp, keeping keepflow itself visible.

    A clean clone (and its venv) may itself live under /tmp, as CI's does:
    those folders are bind-mounted aside first and back in place on top of
    the tmpfs, so the worker still runs the same interpreter and code while
    everything else under /tmp (the flow's temporary folder, every pytest
    tmp_path) is gone.
    """
    keep = sorted({p for p in (Path(__file__).resolve().parents[1], Path(sys.prefix).resolve())
                   if p.is_relative_to("/tmp")})
    steps = []
    for k, path in enumerate(keep):
        stage = home / f"keep{k}"
        stage.mkdir(parents=True, exist_ok=True)
        steps.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(stage))}")
    steps.append("mount -t tmpfs tmpfs /tmp")
    for k, path in enumerate(keep):
        stage = home / f"keep{k}"
        steps.append(f"mkdir -p {shlex.quote(str(path))} && mount --bind {shlex.quote(str(stage))} "
                     f"{shlex.quote(str(path))}")
    return " && ".join(steps)


class Cluster:
    """A scheduler and workers, each a separate process started like a user would."""

    def __init__(self, api_url: str, worker_env: dict):
        self.base = WORKER_ROOT / f"keepflow-dask-{uuid.uuid4().hex[:8]}"
        self.base.mkdir(parents=True)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.api_url, self.worker_env = api_url, worker_env
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[int, subprocess.Popen] = {}
        self._client = None

    def _spawn(self, cmd, name, cwd, env) -> subprocess.Popen:
        with open(self.base / f"{name}.log", "ab") as log:    # the process has its own copy
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, workers: int = 2) -> None:
        env = dict(os.environ, DO_NOT_TRACK="1")
        self.scheduler = self._spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--no-dashboard"], "scheduler", self.base, env)
        for i in range(workers):
            self.start_worker(i)
        self.client().wait_for_workers(workers, timeout=90)

    def start_worker(self, i: int) -> None:
        home = self.base / f"worker{i}"
        for sub in ("tmp", "prefect", "dask"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("KEEPFLOW_STORAGE_CONFIG", None)       # workers find S3 in their environment
        env.update(self.worker_env)
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(home / "prefect"), TMPDIR=str(home / "tmp"),
                   DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        # A private mount namespace with an empty tmpfs on /tmp: the flow's
        # temporary folder (and this test's tmp_path) does not exist there.
        cmd = ["unshare", "--mount", "sh", "-c", _private_tmp_script(home) + ' && exec "$0" "$@"',
               DASK, "worker", self.address, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}",
               "--local-directory", str(home / "dask")]
        self.workers[i] = self._spawn(cmd, f"worker{i}", home, env)

    def client(self):
        import distributed

        if self._client is None:
            # Not the process's default client: prefect-dask's DaskTaskRunner
            # connects to a default client's cluster instead of starting its own
            # (the --workers test below would land on these workers).
            self._client = distributed.Client(self.address, timeout=60, set_as_default=False)
        return self._client

    def idents(self) -> dict[str, str]:
        """Worker address -> "host:pid" of the process that runs its tasks (as a BatchSummary names it)."""
        return self.client().run(lambda: f"{socket.gethostname()}:{os.getpid()}")

    def kill(self, address: str) -> int:
        """SIGKILL the worker at ``address`` (its nanny and its worker process); returns its index."""
        pid = self.client().run(os.getpid, workers=[address])[address]
        group = os.getpgid(pid)
        index = next(i for i, p in self.workers.items() if p.pid == group)
        os.killpg(group, signal.SIGKILL)
        self.workers[index].wait(timeout=30)
        return index

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for proc in [*self.workers.values(), self.scheduler]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self.scheduler]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(prefect_api_url, s3_server):
    if not _can_unshare():
        msg = "needs root and unshare --mount (private /tmp for the workers)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    c = Cluster(prefect_api_url, s3_server.env)
    try:
        c.start(2)
        yield c
    finally:
        c.stop()


@pytest.fixture
def small_batches(monkeypatch):
    # Batches are cut in the flow process (the plan), so this reaches every worker.
    monkeypatch.setattr(core_backup, "MAX_BATCH_FILES", BATCH_FILES)
    monkeypatch.setattr(core_restore, "MAX_BATCH_FILES", BATCH_FILES)


def _files(n: int) -> dict[str, bytes]:
    files = {f"d{i % 12:02d}/f{i:04d}.txt": (f"file {i} " * (i % 37 + 1)).encode() for i in range(n)}
    files.update({f"same/copy{i}.txt": b"the same content in several files\n" for i in range(5)})
    files["big/large.bin"] = os.urandom(3 * 1024 * 1024)          # above 1 MiB: content-defined chunks
    return files


def _upload(s3_server, url: str, files: dict[str, bytes]) -> None:
    fs = s3_server.filesystem()
    root = url.split("://", 1)[1]
    fs.pipe({f"{root}/{path}": data for path, data in files.items()})


def _s3_tree(s3_server, url: str) -> dict[str, bytes]:
    fs = s3_server.filesystem()
    fs.invalidate_cache()
    root = url.split("://", 1)[1]
    found = fs.find(root)
    return {p[len(root) + 1:]: data for p, data in fs.cat(found).items()} if found else {}


def _run_folders(s3_server, work: str) -> list[str]:
    fs = s3_server.filesystem()
    fs.invalidate_cache()
    return [p for p in fs.find(work.split("://", 1)[1], withdirs=True) if "/keepflow-" in p]


def _final_batch_states(flow_run_id, batches: int, timeout: float = 60.0) -> list[str]:
    """The state types of the flow run's store-b task runs once all are final (states arrive as events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                any_=[flow_run_id]))) if r.name.startswith("store-b")]
            states = sorted(r.state.type.value if r.state else "NONE" for r in runs)
            if len(runs) >= batches and all(r.state and r.state.is_final() for r in runs):
                return states
            if time.monotonic() > deadline:
                return states
            time.sleep(0.2)


def _local_tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_backup_restore_verify_on_separate_worker_processes(cluster, s3_server, s3_config, small_batches,
                                                            tmp_path):
    from prefect_dask import DaskTaskRunner

    from keepflow.flows.backup import backup
    from keepflow.flows.restore import restore
    from keepflow.flows.verify import verify

    client = cluster.client()
    marker = tmp_path / "only-the-flow-process-sees-this"
    marker.write_text("x")
    assert marker.exists()
    assert set(client.run(os.path.exists, str(marker)).values()) == {False}
    assert set(client.run(os.path.exists, str(tmp_path)).values()) == {False}

    files = _files(460)
    src, repo, work = (s3_server.unique_url(p) for p in ("src", "repo", "work"))
    _upload(s3_server, src, files)

    # The command line's way: the runner through with_options (keepflow backup --dask ADDRESS).
    on_cluster = backup.with_options(task_runner=DaskTaskRunner(address=cluster.address))
    state = on_cluster(src, repo, work_dir=work, dask_address=cluster.address, return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["exit_code"] == 0 and summary["files"] == len(files) and summary["skipped"] == []
    assert summary["batches"] >= 10
    idents = cluster.idents()
    assert len(set(idents.values())) == 2
    assert set(summary["ran_on"]) == set(idents.values()), (summary["ran_on"], idents)   # both workers ran batches
    assert _run_folders(s3_server, work) == []
    assert [k for ks in client.run(indexmod.cached_runs).values() for k in ks if k[0] == repo] == []
    assert check_structure(repo).problems == []

    # The deployment's way: only the flow parameter; the flow enters the runner itself.
    target = s3_server.unique_url("restored")
    rstate = restore(repo, target, work_dir=work, dask_address=cluster.address, return_state=True)
    assert rstate.is_completed(), rstate
    assert rstate.result()["files_written"] == len(files)
    assert _s3_tree(s3_server, target) == files
    assert _run_folders(s3_server, work) == []

    vstate = verify(repo, read_data=100, dask_address=cluster.address, return_state=True)
    assert vstate.is_completed(), vstate
    assert vstate.result()["problems"] == [] and vstate.result()["keys_read"] > 0

    # And the snapshot restores exactly to a local folder (thread pool, this process).
    out = tmp_path / "out"
    assert restore(repo, str(out), return_state=True).is_completed()
    assert _local_tree_bytes(out) == files


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_survived(cluster, s3_server, s3_config, small_batches, tmp_path):
    from prefect_dask import DaskTaskRunner

    from keepflow.flows.backup import backup
    from keepflow.flows.restore import restore

    files = _files(700)
    src, repo, work = (s3_server.unique_url(p) for p in ("src", "repo", "work"))
    _upload(s3_server, src, files)
    seen: dict = {}

    def kill_a_busy_worker_after_the_first_batches():
        import distributed

        with distributed.Client(cluster.address, timeout=60, set_as_default=False) as watcher:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and "killed" not in seen:
                states = watcher.run_on_scheduler(
                    lambda dask_scheduler: [ts.state for ts in dask_scheduler.tasks.values()])
                done = states.count("memory")
                busy = [w for w, keys in watcher.processing().items() if keys]
                if done >= 2 and busy and len(states) - done >= 3:
                    seen.update(done=done, left=len(states) - done, victim=busy[0])
                    seen["killed"] = cluster.kill(busy[0])
                    return
                time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker_after_the_first_batches, daemon=True)
    killer.start()
    try:
        state = backup.with_options(task_runner=DaskTaskRunner(address=cluster.address))(
            src, repo, work_dir=work, dask_address=cluster.address, return_state=True)
        killer.join(timeout=60)
        assert "killed" in seen, f"no worker was killed: {seen}"     # the kill happened while batches ran
        assert state.is_completed(), state
        summary = state.result()
        assert summary["exit_code"] == 0 and summary["files"] == len(files)
        assert len(cluster.client().scheduler_info()["workers"]) == 1
        # Prefect's history agrees: one task run per batch (the rescheduled batch
        # kept its task run), every one Completed.
        states = _final_batch_states(state.state_details.flow_run_id, summary["batches"])
        assert states == ["COMPLETED"] * summary["batches"]
        assert check_structure(repo).problems == []
        assert _run_folders(s3_server, work) == []
        out = tmp_path / "out"
        assert restore(repo, str(out), return_state=True).is_completed()
        assert _local_tree_bytes(out) == files
    finally:
        if "killed" in seen:                       # give later tests their two workers back
            cluster.start_worker(seen["killed"])
            cluster.client().wait_for_workers(2, timeout=90)


@pytest.mark.slow
def test_cli_workers_2_backs_up_restores_and_verifies_a_local_tree(tmp_path, cli):
    import json

    # Three batches of at most MAX_BATCH_FILES files: enough for both workers.
    src = make_tree(tmp_path / "src", {f"d{i % 40:02d}/f{i:05d}.txt": f"file {i}\n" * (i % 9 + 1)
                                       for i in range(core_backup.MAX_BATCH_FILES * 2 + 300)})
    age_tree(src)      # out of the racy window, or the second backup re-reads files at random
    proc = cli("backup", src, tmp_path / "repo", "--workers", "2", "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["batches"] == 3 and summary["exit_code"] == 0
    assert len(summary["ran_on"]) == 2 and sum(summary["ran_on"].values()) == 3, summary["ran_on"]
    assert proc.stderr == ""
    proc = cli("restore", tmp_path / "repo", tmp_path / "out", "--workers", "2", "--json", check=True)
    assert json.loads(proc.stdout)["files_written"] == summary["files"]
    diffs = compare(src, tmp_path / "out")
    assert diffs == [], format_differences(diffs)
    cli("verify", tmp_path / "repo", "--read-data", "100%", "--workers", "2", check=True)

    # A deployment's way: the flow parameter alone; the flow starts the local cluster itself.
    from keepflow.flows.backup import backup

    (src / "d00" / "f00000.txt").write_text("changed\n")
    state = backup(str(src), str(tmp_path / "repo"), workers=2, return_state=True)
    assert state.is_completed(), state
    again = state.result()
    assert again["files_changed"] == 1 and again["batches"] == 1
    assert list(again["ran_on"]) != [f"{socket.gethostname()}:{os.getpid()}"]     # not this process


@pytest.mark.slow
def test_workers_2_get_the_password_the_command_or_the_flow_was_given(tmp_path, cli_env, monkeypatch):
    """A password from --password-file or a Secret block is in no environment the workers inherit:
    a --workers cluster's workers get it from the process that started them (before this, every
    batch failed for want of a password, exit 10)."""
    import json

    from prefect.blocks.system import Secret

    from keepflow.flows.restore import restore
    from keepflow.tasks.core import keyring, passwords

    from tests.conftest import TEST_PASSWORD

    src = make_tree(tmp_path / "src", {f"d{i % 5}/f{i:03d}.txt": f"file {i}\n" * (i + 1) for i in range(60)}
                    | {"big/large.bin": os.urandom(3 * 1024 * 1024)})
    age_tree(src)
    pw_file = tmp_path / "pw"
    pw_file.write_text(TEST_PASSWORD + "\n")
    sources = ("KEEPFLOW_PASSWORD", "KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND")
    env = {k: v for k, v in cli_env.items() if k not in sources}
    repo = tmp_path / "repo"

    proc = run_cli(["backup", src, repo, "--workers", "2", "--password-file", pw_file, "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["exit_code"] == 0 and summary["files"] == 61 and sum(summary["ran_on"].values()) == 1
    proc = run_cli(["verify", repo, "--read-data", "100%", "--workers", "2", "--password-file", pw_file], env=env)
    assert proc.returncode == 0, proc.stderr
    for out in (proc.stdout, proc.stderr):
        assert TEST_PASSWORD not in out

    # A deployment's way: the flow parameters alone, the password in a Secret block.
    Secret(value=TEST_PASSWORD).save("keepflow-dask-password", overwrite=True)
    for name in sources:
        monkeypatch.delenv(name, raising=False)       # the local cluster's workers inherit this environment
    keyring.forget()
    try:
        state = restore(str(repo), str(tmp_path / "out"), workers=2, password="secret/keepflow-dask-password",
                        return_state=True)
        assert state.is_completed(), state
        assert state.result()["files_written"] == 61
    finally:
        passwords.clear()
        keyring.forget()
    diffs = compare(src, tmp_path / "out")
    assert diffs == [], format_differences(diffs)


def test_cluster_set_ups_that_cannot_work_are_one_line_usage_errors(tmp_path, cli_env):
    src = make_tree(tmp_path / "src", {"a.txt": "a"})
    repo = tmp_path / "repo"
    env = {k: v for k, v in cli_env.items() if k not in (scratch.WORK_DIR_ENV, "KEEPFLOW_DASK_ADDRESS")}

    def usage_error(args, env=env):
        proc = run_cli(args, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("keepflow: error: "), proc.stderr
        return lines[0]

    assert "exclude each other" in usage_error(["backup", src, repo, "--dask", "tcp://127.0.0.1:1", "--workers", "2"])
    assert "--workers must be" in usage_error(["backup", src, repo, "--workers", "0"])
    # A remote scheduler cannot read this machine's temporary folder (192.0.2.0/24: TEST-NET, never reached).
    line = usage_error(["backup", src, repo, "--dask", "tcp://192.0.2.10:8786"])
    assert "--work-dir" in line
    line = usage_error(["restore", repo, tmp_path / "out", "--dask", "tcp://192.0.2.10:8786"])
    assert "--work-dir" in line
    # The same from the environment.
    assert "--work-dir" in usage_error(["backup", src, repo], env=dict(env, KEEPFLOW_DASK_ADDRESS="192.0.2.10:8786"))
    # Workers started elsewhere need a Prefect server they share with us.
    no_api = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    assert "PREFECT_API_URL" in usage_error(["verify", repo, "--dask", "tcp://127.0.0.1:1"], env=no_api)
    assert not repo.exists()          # nothing was created by any of them


def test_which_schedulers_are_remote():
    from keepflow.flows._dask import is_remote

    assert not is_remote("tcp://127.0.0.1:8786") and not is_remote("localhost:8786")
    assert not is_remote(f"tcp://{socket.gethostname()}:8786")
    assert is_remote("tcp://192.0.2.10:8786") and is_remote("tls://192.0.2.10:8786")
