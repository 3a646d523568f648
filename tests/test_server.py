"""``keepflow server start|stop|status``: a persistent local Prefect server the next commands use.

A real Prefect background server in a private ``PREFECT_HOME`` on a free
port: after ``start``, a backup run with no ``PREFECT_API_URL`` is recorded in
that server (asked through its API); ``status --json`` names it; a
``PREFECT_API_URL`` the user set still wins; after ``stop`` it is gone and
``status`` exits 3.

``start`` also starts the warm process (flows/cli/warm.py): the commands
after it run in children forked from it, which its log names; exit codes,
output, Ctrl-C and restores behave as in a process of their own; another
Prefect environment or changed code makes it step aside, and the command
still runs.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx

from tests.conftest import age_tree, ctrl_c_during_backup, make_tree, run_cli
from tests.treecompare import compare, format_differences


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(api_url: str) -> list[str]:
    resp = httpx.post(f"{api_url}/flow_runs/filter", json={}, timeout=30)
    resp.raise_for_status()
    return [r["name"] for r in resp.json()]


def _count_runs(api_url: str, name_like: str) -> int:
    """Flow runs whose name contains ``name_like`` (a count: the session's server holds more runs than a page)."""
    resp = httpx.post(f"{api_url}/flow_runs/count", json={"flow_runs": {"name": {"like_": name_like}}}, timeout=30)
    resp.raise_for_status()
    return int(resp.json())


def test_server_start_is_used_by_later_commands_and_stop_ends_it(tmp_path, prefect_api_url):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    src = make_tree(tmp_path / "src", {"a.txt": "alpha", "b/c.txt": "gamma"})
    age_tree(src)
    port = _free_port()
    proc = run_cli(["server", "start", "--port", port, "--json"], env=env)
    try:
        assert proc.returncode == 0, proc.stderr
        started = json.loads(proc.stdout)
        assert started["running"] and started["api_url"] == f"http://127.0.0.1:{port}/api"
        status = json.loads(run_cli(["server", "status", "--json"], env=env, check=True).stdout)
        assert status["api_url"] == started["api_url"] and status["ui_url"] == f"http://127.0.0.1:{port}"
        again = run_cli(["server", "start", "--json"], env=env, check=True)
        assert json.loads(again.stdout)["started"] is False           # one server, not two

        assert started["warm_process"] is True and status["warm_process"] is True
        warm_log = Path(env["PREFECT_HOME"]) / "keepflow" / "warm.log"
        warm_pid = json.loads((warm_log.parent / "warm.json").read_text())["pid"]

        run_cli(["backup", src, tmp_path / "repo"], env=env, check=True)
        assert [n for n in _runs(started["api_url"]) if n.startswith("backup-src")]
        assert _warm_lines(warm_log, "backup in pid") == 1           # it ran in the warm process

        # Output, exit codes and one-line errors come back from the warm process as from a process of its own.
        listed = run_cli(["snapshots", tmp_path / "repo", "--json"], env=env, check=True)
        assert len(json.loads(listed.stdout)) == 1
        missing = run_cli(["backup", tmp_path / "no-such-folder", tmp_path / "repo"], env=env)
        assert missing.returncode == 2 and missing.stderr.startswith("keepflow: error:"), missing.stderr
        assert "Traceback" not in missing.stderr and _warm_lines(warm_log, "backup in pid") == 2
        run_cli(["restore", tmp_path / "repo", tmp_path / "restored"], env=env, check=True)
        diffs = compare(src, tmp_path / "restored")
        assert not diffs, format_differences(diffs)

        # Ctrl-C reaches the command's child: the run ends with 130 and its lease released.
        big = make_tree(tmp_path / "big", {f"big{i:02d}.bin": os.urandom(8 * 1024 * 1024) for i in range(40)})
        age_tree(big)
        ctrl_c_during_backup(big, tmp_path / "repo-big", env)
        assert _warm_lines(warm_log, "backup in pid") == 3

        # A server the user chose wins over the persistent one; the warm process steps aside for it.
        before = len(_runs(started["api_url"]))
        run_cli(["backup", src, tmp_path / "repo"], env={**env, "PREFECT_API_URL": prefect_api_url}, check=True)
        assert len(_runs(started["api_url"])) == before
        assert _warm_lines(warm_log, "declined backup") == 1

        # Changed code: the warm process exits rather than run what it imported before; the command still runs.
        source = Path(__file__).resolve().parents[1] / "flows" / "cli" / "warm.py"
        st = source.stat()
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        try:
            run_cli(["backup", src, tmp_path / "repo"], env=env, check=True)
        finally:
            os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert _warm_lines(warm_log, "backup in pid") == 3
        assert json.loads(run_cli(["server", "status", "--json"], env=env).stdout)["warm_process"] is False
        assert json.loads(run_cli(["server", "start", "--json"], env=env, check=True).stdout)["warm_process"]
        warm_pid = json.loads((warm_log.parent / "warm.json").read_text())["pid"]
    finally:
        stopped = run_cli(["server", "stop", "--json"], env=env)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is True
    assert not Path(f"/proc/{warm_pid}").exists() and not (warm_log.parent / "warm.sock").exists()
    assert run_cli(["server", "status"], env=env).returncode == 3
    try:
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
        reachable = True
    except httpx.HTTPError:
        reachable = False
    assert not reachable


def _warm_lines(log: Path, text: str) -> int:
    return sum(text in line for line in log.read_text().splitlines())


def test_server_start_with_a_chosen_api_starts_only_the_warm_process(tmp_path, prefect_api_url):
    """A Prefect API the user chose (here in the active profile, as `prefect config set` leaves it):
    `server start` starts no server beside it, only the warm process for it; commands with that API,
    from the profile or from PREFECT_API_URL, run in the warm process and are recorded there."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{prefect_api_url}"\n')
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    src = make_tree(tmp_path / "src", {"a.txt": "alpha", "b/c.txt": "gamma"})
    age_tree(src)

    dead = run_cli(["server", "start"], env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"})
    assert dead.returncode == 1 and dead.stderr.startswith("keepflow: error: the Prefect API"), dead.stderr
    assert "Traceback" not in dead.stderr and len(dead.stderr.strip().splitlines()) == 1

    proc = run_cli(["server", "start", "--json"], env=env)
    try:
        assert proc.returncode == 0, proc.stderr
        started = json.loads(proc.stdout)
        assert started["chosen_by"] == "the Prefect profile" and started["api_url"] == prefect_api_url
        assert started["started"] is False and started["warm_process"] is True
        assert not (home / "keepflow" / "server.json").exists()           # no server of keepflow's own
        status = json.loads(run_cli(["server", "status", "--json"], env=env, check=True).stdout)
        assert status["chosen_by"] == "the Prefect profile" and status["warm_process"] is True
        warm_log = home / "keepflow" / "warm.log"

        before = _count_runs(prefect_api_url, "backup-src-")
        run_cli(["backup", src, tmp_path / "repo"], env=env, check=True)
        run_cli(["backup", src, tmp_path / "repo"], env={**env, "PREFECT_API_URL": prefect_api_url}, check=True)
        assert _warm_lines(warm_log, "backup in pid") == 2 and _warm_lines(warm_log, "declined") == 0
        assert _count_runs(prefect_api_url, "backup-src-") == before + 2
        run_cli(["restore", tmp_path / "repo", tmp_path / "restored"], env=env, check=True)
        diffs = compare(src, tmp_path / "restored")
        assert not diffs, format_differences(diffs)
    finally:
        stopped = run_cli(["server", "stop", "--json"], env=env)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is False   # it stopped no server
    assert not (home / "keepflow" / "warm.sock").exists()
    assert json.loads(run_cli(["server", "status", "--json"], env=env, check=True).stdout)["warm_process"] is False
    assert httpx.get(f"{prefect_api_url}/health", timeout=5).status_code == 200        # the chosen server runs on
