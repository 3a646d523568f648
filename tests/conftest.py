"""Shared fixtures: one Prefect test server for the whole session, tree builders.

Flow tests run under one session-wide ``prefect_test_harness`` (a real
Prefect API on a temporary SQLite database). CLI tests run the real
``keepflow`` command in subprocesses pointed at the same server through
``PREFECT_API_URL``, so they pay Prefect's client start-up but not a
temporary server per command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest_plugins = ["tests.servers"]

# Before anything imports prefect: a private home, no analytics.
_HOME = tempfile.mkdtemp(prefix="keepflow-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)
# Format 2 repositories are encrypted by default: every test (and every
# keepflow subprocess it starts) has a password, and key files made with a
# cheap KDF (the defaults cost half a second per unlock). Tests of missing or
# wrong passwords set their own environment.
TEST_PASSWORD = "keepflow test password"
os.environ["KEEPFLOW_PASSWORD"] = TEST_PASSWORD
os.environ["KEEPFLOW_KDF"] = "argon2id:t=1,m=1024,p=1"
for _name in ("KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND"):
    os.environ.pop(_name, None)
# Flows run in this process keep their batches in its threads: many tests
# cause faults by patching core functions here, which a child process would
# not see. The `keepflow` commands of the CLI tests (cli_env) run batches in
# child processes, the default; tests/test_batch_processes.py tests them in
# flows run here.
os.environ["KEEPFLOW_BATCH_PROCESSES"] = "0"

VENV_BIN = Path(sys.executable).parent
KEEPFLOW = str(VENV_BIN / "keepflow")


@pytest.fixture(scope="session")
def prefect_api_url():
    """Start the session's Prefect test server; yield its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(params=["local", "memory"])
def repo_url(request, tmp_path):
    """A repository location on local disk and on memory:// (the cheap providers)."""
    import fsspec

    if request.param == "local":
        yield str(tmp_path / "repo")
        return
    url = f"memory://kf-{tmp_path.name}/repo"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        try:
            check_repositories_left_behind(request, [url])     # before it is gone (see below)
        finally:
            fs.rm(url, recursive=True)


# The `keepflow` commands of these modules must each be a process of their own (KEEPFLOW_WARM=0):
# they kill the command (SIGKILL leaves a warm child running on), or look at its child processes.
COLD_MODULES = {"test_batch_processes", "test_crash", "test_dask", "test_deployments", "test_format2_prune",
                "test_prune", "test_run_folder", "test_runs", "test_temporaries"}


def _cli_environment(prefect_api_url: str) -> dict:
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api_url
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    env.pop("KEEPFLOW_BATCH_PROCESSES", None)      # the default: batches in child processes
    return env


@pytest.fixture(scope="session")
def _warm_process(prefect_api_url):
    """The warm process of ``keepflow server start`` (flows/cli/warm.py) for the session's server.

    Why: importing Prefect is most of a `keepflow` command's time here, and the
    suite runs several hundred of them. The CLI tests' commands run as they do
    for a user after ``keepflow server start``: forked from a process that
    imported Prefect, with their own environment, streams and exit code. The
    commands of COLD_MODULES, those with another environment (another
    PREFECT_HOME or server, KEEPFLOW_BATCH_PROCESSES) and tests/test_server.py
    run in processes of their own.
    """
    from keepflow.flows.cli import warm

    def ensure() -> None:
        if os.environ.get("KEEPFLOW_WARM") == "0":     # `KEEPFLOW_WARM=0 make test`: every command cold
            return
        if not warm.running() and not warm.start(prefect_api_url, env=_cli_environment(prefect_api_url)):
            raise RuntimeError(f"the warm process did not start: {warm.log_path().read_text()[-2000:]}")

    ensure()
    yield ensure
    warm.stop()


@pytest.fixture
def cli_env(request, prefect_api_url, _warm_process):
    env = _cli_environment(prefect_api_url)
    if request.module.__name__.rsplit(".", 1)[-1] in COLD_MODULES:
        env["KEEPFLOW_WARM"] = "0"
    else:
        _warm_process()          # started again if changed code made it exit (tests/test_server.py does)
    return env


def run_cli(args, env=None, check=False, input=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real ``keepflow`` command."""
    proc = subprocess.run([KEEPFLOW, *map(str, args)], capture_output=True, text=True, env=env,
                          input=input, cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"keepflow {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(cli_env):
    def _run(*args, check=False, **kw):
        return run_cli(args, env=cli_env, check=check, **kw)
    return _run


@pytest.fixture
def s3_config(s3_server, tmp_path, monkeypatch):
    """The S3 server's options in a per-URL storage config file (storage_config.py), as a user would
    set them, for this (the flow's) process."""
    opts = s3_server.storage_options
    path = tmp_path / "storage.toml"
    path.write_text(f'["s3://{s3_server.bucket}"]\nkey = "{opts["key"]}"\nsecret = "{opts["secret"]}"\n'
                    f'endpoint_url = "{s3_server.endpoint}"\nclient_kwargs = {{region_name = "us-east-1"}}\n')
    monkeypatch.setenv("KEEPFLOW_STORAGE_CONFIG", str(path))
    return path


def make_tree(root: Path, spec: dict) -> Path:
    """Build a tree declaratively (restic's TestCreateFiles idea).

    ``spec`` maps relative paths to: bytes/str (a file), ``None`` (an empty
    folder), or ``("link", target)`` (a symlink).
    """
    root.mkdir(parents=True, exist_ok=True)
    for rel, value in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir(exist_ok=True)
        elif isinstance(value, tuple) and value[0] == "link":
            os.symlink(value[1], path)
        else:
            path.write_bytes(value.encode() if isinstance(value, str) else value)
    return root


def age_tree(root: Path, seconds: int = 10) -> None:
    """Move every mtime into the past, out of the racy-timestamp window."""
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 1_000_000_000), follow_symlinks=False)


def ctrl_c_during_backup(src: Path, repo: Path, env: dict) -> None:
    """Run ``keepflow backup src repo``, send SIGINT once it is in its store batches, and check that it
    exits 130 with its one-line error and leaves no lease behind."""
    proc = subprocess.Popen([KEEPFLOW, "backup", str(src), str(repo)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((repo / "locks").glob("backup-*.json")):
        time.sleep(0.05)
    assert list((repo / "locks").glob("backup-*.json")), "the backup never took its lease"
    time.sleep(0.3)                       # into the store batches
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("keepflow: error: interrupted"), err
    assert list((repo / "locks").glob("*.json")) == []


# -- every test is an integrity test -------------------------------------------------
#
# After each test that passed, every repository it left behind gets the
# structural verify (keepflow.tasks.core.verify.check_structure: listings, the index,
# the manifests' hash columns; no data is read), like restic's tests calling
# checker.TestCheckRepo after their operations. Repositories left behind are:
#
# * every folder holding a keepflow.json under the test's tmp_path (only when
#   the test uses tmp_path; the walk does not descend into a repository);
# * every memory:// repository the test wrote to (fsspec's in-process store,
#   compared with a copy taken before the test) that still exists at the end;
# * the memory:// location of the ``repo_url`` fixture, checked in that
#   fixture's teardown, because it is removed there, before this fixture's
#   teardown runs (an autouse fixture is set up first and torn down last).
#
# A keepflow.json that does not open as a repository (garbage, a newer
# format) is a finding too. Tests that damage a repository on purpose say so
# with @pytest.mark.damages_repository. A test that failed is not checked: its
# own failure is the story.

_CALL_PASSED = pytest.StashKey[bool]()
CONFIG_NAME = "keepflow.json"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


def repository_problems(url: str) -> list[str]:
    """The structural verify of the repository at ``url`` as readable lines (none: sound)."""
    from keepflow.tasks.core import verify
    from keepflow.tasks.core.errors import KeepflowError

    try:
        result = verify.check_structure(url)
    except KeepflowError as exc:                 # keepflow.json is garbage, newer, ...
        return [f"{url}: does not open as a repository: {exc}"]
    except Exception as exc:                      # the verify itself broke on what it found
        return [f"{url}: structural verify raised {type(exc).__name__}: {exc}"]
    lines = []
    for p in result.problems:
        where = p["key"] or p["hash"] or ""
        line = f"{url}: {p['kind']} {where}: {p['detail']}"
        if p["snapshots"]:
            line += f" (snapshots {', '.join(p['snapshots'])}; paths {', '.join(p['paths'][:5])})"
        lines.append(line)
    return lines


def check_repositories_left_behind(request, urls) -> None:
    """Fail the test if any repository in ``urls`` fails the structural verify."""
    if not urls or request.node.get_closest_marker("damages_repository"):
        return
    if not request.node.stash.get(_CALL_PASSED, False):
        return
    problems = [line for url in urls for line in repository_problems(url)]
    if problems:
        pytest.fail("repositories left behind by this test fail the structural verify "
                    "(mark the test @pytest.mark.damages_repository if it damages them on purpose):\n  "
                    + "\n  ".join(problems), pytrace=False)


def local_repositories(root: Path) -> list[str]:
    """Every folder under ``root`` holding a keepflow.json (not descending into one)."""
    found = []
    for folder, dirs, files in os.walk(root):
        if CONFIG_NAME in files:
            found.append(folder)
            dirs[:] = []
    return sorted(found)


def _memory_store() -> dict | None:
    module = sys.modules.get("fsspec.implementations.memory")   # not imported: no memory:// repositories
    return module.MemoryFileSystem.store if module else None


def memory_repositories_written(before: dict) -> list[str]:
    """memory:// repositories that exist now and had a key added, replaced or removed since ``before``."""
    store = _memory_store()
    if not store:
        return []
    changed = {k for k, v in store.items() if before.get(k) is not v} | (before.keys() - store.keys())
    if not changed:
        return []
    roots = [k[: -len(CONFIG_NAME) - 1] for k in store if k.endswith("/" + CONFIG_NAME)]
    return sorted(f"memory://{r.lstrip('/')}" for r in roots if any(c.startswith(r + "/") for c in changed))


@pytest.fixture(autouse=True)
def repository_integrity(request):
    """Structural verify of every repository the test leaves behind (see above)."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    store = _memory_store()
    before = dict(store) if store else {}
    yield
    if request.node.get_closest_marker("damages_repository") or not request.node.stash.get(_CALL_PASSED, False):
        return
    urls = (local_repositories(tmp) if tmp is not None else []) + memory_repositories_written(before)
    check_repositories_left_behind(request, urls)
