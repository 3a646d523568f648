"""Shared fixtures: one Prefect test server for the whole session, tree builders.

Flow tests run under one session-wide ``prefect_test_harness`` (a real
Prefect API on a temporary SQLite database). CLI tests run the real
``keepflow`` command in subprocesses pointed at the same server through
``PREFECT_API_URL``, so they pay Prefect's client start-up but not a
temporary server per command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.servers"]

# Before anything imports prefect: a private home, no analytics.
_HOME = tempfile.mkdtemp(prefix="keepflow-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)

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
        fs.rm(url, recursive=True)


@pytest.fixture
def cli_env(prefect_api_url):
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api_url
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
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
