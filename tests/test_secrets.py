"""Secrets stay secret: nothing the Prefect API holds after a run shows the password or a file name.

A backup, a restore and a verify of a tree whose file names and contents
carry marker strings run through the session's real Prefect server, the
password given as a Prefect Secret block named by the flow parameter (the
way a deployment gives it) and, separately, through the environment with
``--json`` on the real command. Then everything the API returns about those
runs (flow runs with their parameters and state messages, task runs, logs,
artifacts, events) is searched for the password, the master key material and
the plaintext names. The flows' own summaries go to artifacts and logs, so
this catches a summary, a log line, an exception message or a parameter
that would carry them.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import age_tree, make_tree, run_cli

PASSWORD = "correct horse battery staple 7391"
NAME_MARKER = "secretname-91c2"
CONTENT_MARKER = "secretcontent-4d7e"


def _api_dump(api_url: str, flow_run_ids: list[str]) -> str:
    """Everything the API returns about these flow runs, as one string."""
    out = []
    with httpx.Client(base_url=api_url, timeout=30) as http:
        for run_id in flow_run_ids:
            out.append(http.get(f"/flow_runs/{run_id}").text)
        body = {"flow_runs": {"id": {"any_": flow_run_ids}}}
        for endpoint in ("/task_runs/filter", "/artifacts/filter", "/flow_runs/filter"):
            resp = http.post(endpoint, json=body)
            assert resp.status_code == 200, (endpoint, resp.text[:300])
            out.append(resp.text)
        for run_id in flow_run_ids:
            resp = http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
            assert resp.status_code == 200, resp.text[:300]
            out.append(resp.text)
        # Events are written asynchronously: wait until the runs' terminal events are in.
        def events(flt: dict) -> str:
            pages = []
            resp = http.post("/events/filter", json={"limit": 50, "filter": {
                "occurred": {"since": "2000-01-01T00:00:00Z"}, **flt}})
            while True:
                assert resp.status_code == 200, resp.text[:300]
                pages.append(resp.text)
                nxt = resp.json().get("next_page")
                if not nxt or len(pages) > 40:
                    return "\n".join(pages)
                resp = http.get(nxt)

        runs = {"any_resource": {"id_prefix": [f"prefect.flow-run.{i}" for i in flow_run_ids]}}
        for _ in range(30):
            found = events(runs)
            if found.count("prefect.flow-run.Completed") >= len(flow_run_ids):
                break
            time.sleep(1)
        out.append(found)
        out.append(events({"event": {"prefix": ["prefect.task-run."]}}))
    return "\n".join(out)


@pytest.fixture
def marked_tree(tmp_path):
    tree = make_tree(tmp_path / "src", {
        f"{NAME_MARKER}/a-{NAME_MARKER}.txt": f"{CONTENT_MARKER}\n" * 1000,
        f"docs/{NAME_MARKER}.md": CONTENT_MARKER,
        "big.log": (f"{CONTENT_MARKER} " * 200_000).encode(),
    })
    age_tree(tree)
    return tree


def test_flows_with_a_secret_block_leave_no_password_or_file_name_in_the_api(prefect_api_url, tmp_path,
                                                                              marked_tree, monkeypatch):
    from prefect.blocks.system import Secret

    from keepflow.flows.backup import backup
    from keepflow.flows.restore import restore
    from keepflow.flows.verify import verify
    from keepflow.tasks.core import keyring, passwords

    Secret(value=PASSWORD).save("keepflow-secrets-test", overwrite=True)
    for name in ("KEEPFLOW_PASSWORD", "KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND"):
        monkeypatch.delenv(name, raising=False)
    repo = str(tmp_path / "repo")
    try:
        states = [backup(str(marked_tree), repo, password="secret/keepflow-secrets-test", return_state=True)]
        (marked_tree / f"docs/{NAME_MARKER}.md").write_text(CONTENT_MARKER * 3)
        states.append(backup(str(marked_tree), repo, password="secret/keepflow-secrets-test", return_state=True))
        states.append(restore(repo, str(tmp_path / "out"), password="secret/keepflow-secrets-test",
                              return_state=True))
        states.append(verify(repo, read_data=100.0, password="secret/keepflow-secrets-test", return_state=True))
        assert all(s.is_completed() for s in states), [s.message for s in states]
        assert (tmp_path / "out" / f"{NAME_MARKER}/a-{NAME_MARKER}.txt").read_text().startswith(CONTENT_MARKER)
        master = keyring._masters[json.loads((tmp_path / "repo/keepflow.json").read_text())["id"]]
    finally:
        passwords.clear()
        keyring.forget()
    dump = _api_dump(prefect_api_url, [str(s.state_details.flow_run_id) for s in states])
    assert "secret/keepflow-secrets-test" in dump           # the parameter names the block ...
    assert len(dump) > 5000                                 # ... and the dump holds real content:
    assert "store-b0" in dump and '"key":"backup-' in dump.replace(" ", "")     # task runs, artifacts
    assert "prefect.flow-run.Completed" in dump and "prefect.task-run.Completed" in dump   # events
    for needle in (PASSWORD, NAME_MARKER, CONTENT_MARKER, master.hex(), master.hex()[:16]):
        assert needle not in dump, f"{needle[:12]}... found in what the Prefect API returns"
    # The test password can open the repository again for the integrity check after the test.
    passwords.use_password(PASSWORD)
    try:
        from keepflow.tasks.core.repository import Repository

        keyring.add_key(Repository.open(repo), "keepflow test password")
    finally:
        passwords.clear()
        keyring.forget()


def test_the_command_with_json_shows_no_password_or_key(tmp_path, marked_tree, cli_env):
    env = {**cli_env, "KEEPFLOW_PASSWORD": PASSWORD}
    repo = tmp_path / "repo"
    outputs = []
    for args in (["init", repo, "--json"], ["backup", marked_tree, repo, "--json"],
                 ["snapshots", repo, "--json"], ["verify", repo, "--json"], ["key", "list", repo, "--json"],
                 ["stats", repo, "--json"], ["restore", repo, tmp_path / "out", "--json"]):
        proc = run_cli(args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    text = "\n".join(outputs)
    assert PASSWORD not in text
    wrapped = [json.loads(p.read_text())["wrapped"] for p in (repo / "keys").iterdir()]
    assert all(w not in text for w in wrapped)
    env["KEEPFLOW_NEW_PASSWORD"] = "keepflow test password"     # for the integrity check after the test
    assert run_cli(["key", "add", repo], env=env).returncode == 0
