"""``keepflow server start|stop|status``: a persistent local Prefect server the next commands use.

A real Prefect background server in a private ``PREFECT_HOME`` on a free
port: after ``start``, a backup run with no ``PREFECT_API_URL`` is recorded in
that server (asked through its API); ``status --json`` names it; a
``PREFECT_API_URL`` the user set still wins; after ``stop`` it is gone and
``status`` exits 3.
"""

from __future__ import annotations

import json
import os
import socket

import httpx

from tests.conftest import age_tree, make_tree, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(api_url: str) -> list[str]:
    resp = httpx.post(f"{api_url}/flow_runs/filter", json={}, timeout=30)
    resp.raise_for_status()
    return [r["name"] for r in resp.json()]


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

        run_cli(["backup", src, tmp_path / "repo"], env=env, check=True)
        assert [n for n in _runs(started["api_url"]) if n.startswith("backup-src")]

        # A server the user chose wins over the persistent one.
        before = len(_runs(started["api_url"]))
        run_cli(["backup", src, tmp_path / "repo"], env={**env, "PREFECT_API_URL": prefect_api_url}, check=True)
        assert len(_runs(started["api_url"])) == before
    finally:
        stopped = run_cli(["server", "stop", "--json"], env=env)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is True
    assert run_cli(["server", "status"], env=env).returncode == 3
    try:
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
        reachable = True
    except httpx.HTTPError:
        reachable = False
    assert not reachable
