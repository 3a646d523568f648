"""Scheduled deployments: deployments/prefect.yaml, `keepflow serve`, the backup completion event.

One real Prefect server (``prefect server start`` on 127.0.0.1, a free port,
its own PREFECT_HOME, analytics off) for this module: the embedded test
server runs no scheduler service, and ``serve`` needs one to create its runs.
Everything is checked through the server's REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from keepflow.tasks.core import snapshots
from keepflow.tasks.core.repository import Repository

from tests.conftest import KEEPFLOW, age_tree, make_tree
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
EVENT = "keepflow.backup.completed"
SERVER_START_TIMEOUT = 120.0


def _wait(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class PrefectServer:
    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(os.environ)
        self.env.update(PREFECT_HOME=str(home), PREFECT_API_URL=self.api_url, DO_NOT_TRACK="1",
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false",
                        PREFECT_RUNNER_POLL_FREQUENCY="2")
        self.env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
        self.http = httpx.Client(base_url=self.api_url, timeout=30)
        self.proc = None

    def start(self):
        env = dict(self.env)
        env.pop("PREFECT_API_URL")
        with open(self.home / "server.log", "wb") as log:     # the server has its own copy
            self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"prefect server exited {self.proc.returncode}: "
                                     f"{(self.home / 'server.log').read_text()[-2000:]}")
            try:
                return self.http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False
        _wait(healthy, SERVER_START_TIMEOUT, 0.5, "prefect server /api/health")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.http.close()

    def post(self, path: str, body: dict):
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    def deployment(self, flow: str, name: str) -> dict:
        r = self.http.get(f"/deployments/name/{flow}/{name}")
        r.raise_for_status()
        return r.json()

    def flow_runs(self, deployment_id: str, state: str = "COMPLETED") -> list[dict]:
        # By state: an interval schedule puts up to 100 future runs in the table.
        return self.post("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]},
                                                             "state": {"type": {"any_": [state]}}},
                                               "sort": "START_TIME_ASC", "limit": 50})

    def events(self, repo_id: str) -> list[dict]:
        page = self.post("/events/filter", {"filter": {"event": {"name": [EVENT]},
                                                       "resource": {"id": [f"keepflow.repository.{repo_id}"]}},
                                            "limit": 50})
        return page["events"]

    def run(self, args, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def server():
    home = Path(tempfile.mkdtemp(prefix="keepflow-test-deploy-"))
    srv = PrefectServer(home)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _repo_id(repo: Path) -> str:
    return json.loads((repo / "keepflow.json").read_text())["id"]


# -- deployments/prefect.yaml ---------------------------------------------------------------------

EXPECTED = {  # (flow, deployment): (cron, parameters that must be set)
    ("backup", "hourly-incremental"): ("0 * * * *", {"source": "/data", "repo": "/backups/repo", "rehash": False}),
    ("backup", "nightly-full"): ("30 2 * * *", {"source": "/data", "repo": "/backups/repo", "rehash": True}),
    ("replicate", "after-backup"): ("45 * * * *", {"repo": "/backups/repo", "replicas": ["/mnt/offsite/repo"]}),
    ("prune", "daily-prune"): ("15 4 * * *", {"repo": "/backups/repo", "keep_daily": 7, "grace_hours": 24.0}),
    ("verify", "weekly-verify"): ("0 5 * * 0", {"repo": "/backups/repo", "read_data": 10}),
}


def test_prefect_yaml_deploys_all(server):
    pool = server.run([PREFECT, "work-pool", "create", "keepflow-pool", "--type", "process"])
    assert pool.returncode == 0, pool.stdout + pool.stderr
    # As documented: from the project folder, non-interactive.
    deploy = server.run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                        cwd=ROOT)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    ids = {}
    for (flow, name), (cron, params) in EXPECTED.items():
        d = server.deployment(flow, name)
        ids[flow, name] = d["id"]
        assert d["entrypoint"] == f"flows/{flow}.py:{flow}"
        assert d["work_pool_name"] == "keepflow-pool"
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in d["schedules"]] == \
            [(cron, "Europe/Berlin")]
        assert d["global_concurrency_limit"]["limit"] == 1, f"{flow}/{name}: no concurrency limit of 1"
        assert params.items() <= d["parameters"].items()
        # The worker is sent to the project root, where the entrypoints are.
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

    automations = server.post("/automations/filter", {})
    triggers = [a for a in automations
                if any(act.get("deployment_id") == ids["replicate", "after-backup"] for act in a["actions"])]
    assert len(triggers) == 1
    t = triggers[0]["trigger"]
    assert t["expect"] == [EVENT] and t["posture"] == "Reactive" and t["threshold"] == 1
    assert t["match"] == {"prefect.resource.id": "keepflow.repository.*", "prefect.resource.name": "/backups/repo"}
    assert triggers[0]["actions"][0]["type"] == "run-deployment"


# -- the completion event ---------------------------------------------------------------------------

def test_backup_emits_completed_event(server, tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": "alpha", "d/b.txt": "beta"})
    age_tree(src)
    repo = tmp_path / "repo"

    first = server.run([KEEPFLOW, "backup", str(src), str(repo), "--json", "--tag", "t1"])
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    repo_id = _repo_id(repo)
    events = _wait(lambda: server.events(repo_id), 60, what="the backup's completion event")
    assert len(events) == 1
    ev = events[0]
    assert ev["event"] == EVENT
    assert ev["resource"] == {"prefect.resource.id": f"keepflow.repository.{repo_id}",
                              "prefect.resource.name": str(repo)}
    p = ev["payload"]
    assert p["snapshot"] == summary["snapshot"] and p["repository"] == str(repo) and p["source"] == str(src)
    assert (p["files"], p["files_new"], p["tags"], p["skipped"]) == (2, 2, ["t1"], 0)
    # Related to the flow run that emitted it (Prefect adds that).
    assert any(r.get("prefect.resource.role") == "flow-run" for r in ev["related"])

    # A dry run commits nothing and announces nothing.
    (src / "c.txt").write_text("gamma")
    dry = server.run([KEEPFLOW, "backup", str(src), str(repo), "--dry-run", "--json"])
    assert dry.returncode == 0, dry.stderr
    again = server.run([KEEPFLOW, "backup", str(src), str(repo), "--json"])
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)["snapshot"]
    events = _wait(lambda: (e := server.events(repo_id)) and len(e) >= 2 and e, 60, what="the second event")
    time.sleep(2)
    events = server.events(repo_id)
    assert sorted(e["payload"]["snapshot"] for e in events) == sorted([summary["snapshot"], second])


# -- keepflow serve ---------------------------------------------------------------------------------

def test_serve_runs_scheduled_backup_and_replicates_after_it(server, tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": "alpha", "d/b.txt": "beta" * 1000})
    age_tree(src)
    repo, replica = tmp_path / "repo", tmp_path / "replica"
    config = tmp_path / "keepflow.toml"
    # replicate has no schedule of its own here: a replicate run can only come from the trigger.
    config.write_text(f"""
[repositories.main]
url = "{repo}"
replicas = ["{replica}"]

[sources.src]
path = "{src}"
repository = "main"
tags = ["served"]

[sources.src.incremental]
interval = 10
""")
    with open(tmp_path / "serve.log", "wb") as log:           # the process has its own copy
        # SIGINT as a terminal would deliver it: default disposition, not blocked. In two full
        # suite runs the serve process ignored Ctrl-C (nothing logged, -9 after 30 s) while the
        # test passes alone and with its own file: suspected a disposition or signal mask this
        # pytest process inherits from an earlier test, which a child would inherit too.
        proc = subprocess.Popen([KEEPFLOW, "-v", "serve", str(config)], env=server.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_plain_sigint)
    try:
        def deployment(flow, name):
            try:
                return server.deployment(flow, name)
            except httpx.HTTPStatusError:
                return None

        def alive():
            assert proc.poll() is None, f"keepflow serve exited {proc.returncode}: {_tail(tmp_path / 'serve.log')}"

        def completed(flow, name):
            alive()
            d = deployment(flow, name)
            return d and server.flow_runs(d["id"])

        backup_runs = _wait(lambda: completed("backup", "src-incremental"), 90, what="a served backup run")
        snaps = _wait(lambda: _snapshot_ids(repo), 10, what="a snapshot")
        assert snaps
        # The default format, encrypted: the served run unlocked it with the password in serve's environment.
        assert Repository.open(str(repo)).encrypted
        d = server.deployment("backup", "src-incremental")
        assert d["global_concurrency_limit"]["limit"] == 1
        assert d["schedules"][0]["schedule"]["interval"] == 10
        assert backup_runs[0]["parameters"]["tags"] == ["served"]

        # The backup's completion event starts the replicate deployment.
        _wait(lambda: completed("replicate", "main"), 60, what="a replicate run triggered by the backup")
        assert set(_snapshot_ids(replica)) >= {snaps[0]}
        replicate_runs = server.flow_runs(server.deployment("replicate", "main")["id"])
        assert all(r["auto_scheduled"] is False for r in replicate_runs)  # not from a schedule
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)   # as Ctrl-C: shuts down, pauses the schedules
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # anything of its own left behind
        except ProcessLookupError:
            pass
        proc.wait(10)
    # Ctrl-C stops it cleanly and pauses its schedules: nothing piles up while it is gone.
    assert proc.returncode == 0, _tail(tmp_path / "serve.log")
    assert server.deployment("backup", "src-incremental")["paused"] is True


def _plain_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _snapshot_ids(url: Path) -> list[str]:
    """The ids of the snapshots in the repository at ``url`` (any format; none while it does not exist yet)."""
    if not (url / "keepflow.json").exists():
        return []
    return [s.id for s in snapshots.list_snapshots(Repository.open(str(url)))]


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


# -- the configuration file -------------------------------------------------------------------------

GOOD = """
[repositories.main]
url = "/backups/repo"
[sources.data]
path = "/data"
repository = "main"
[sources.data.incremental]
cron = "0 * * * *"
"""

BAD = [
    ("timezone = 'Mars/Olympus'\n" + GOOD, "timezone: unknown time zone 'Mars/Olympus'"),
    (GOOD.replace('cron = "0 * * * *"', 'cron = "61 * * * *"'), "sources.data.incremental.cron: not a valid cron"),
    (GOOD.replace('cron = "0 * * * *"', 'cron = "0 * * *"'), "sources.data.incremental.cron: not a valid cron"),
    (GOOD.replace('cron = "0 * * * *"', 'interval = -5'), "sources.data.incremental.interval: must be a positive"),
    (GOOD.replace('cron = "0 * * * *"', 'cron = "0 * * * *"\ninterval = 5'),
     "sources.data.incremental: give either cron or interval"),
    (GOOD.replace('repository = "main"', 'repository = "other"'),
     "sources.data.repository: no repository named 'other'"),
    (GOOD.replace('path = "/data"', 'path = "/data"\nexclude = ["x"]'), "sources.data.exclude: unknown key"),
    (GOOD.replace('url = "/backups/repo"', ''), "repositories.main.url: missing"),
    (GOOD + "[repositories.main.prune]\ncron = '0 3 * * *'\n", "repositories.main.prune: no retention policy"),
    (GOOD + "[repositories.main.prune]\ncron = '0 3 * * *'\nkeep_daily = 'seven'\n",
     "repositories.main.prune.keep_daily: must be a non-negative integer"),
    (GOOD + "[repositories.main.verify]\ncron = '0 3 * * *'\nread_data = 150\n",
     "repositories.main.verify.read_data: must be a non-negative (<= 100) number"),
    (GOOD + "[repositories.main.replicate]\ncron = '0 3 * * *'\n",
     "repositories.main.replicate: there are no replicas"),
    (GOOD.replace("[sources.data.incremental]\ncron = \"0 * * * *\"\n", ""), "sources.data: no schedule"),
    ("[repositories.main]\nurl = '/r'\n", "sources: no sources"),
    ("x = [", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    from keepflow.flows.cli import main

    config = tmp_path / "keepflow.toml"
    config.write_text(text)
    assert main(["serve", str(config)]) == 2       # the command's own code path, in this process
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"keepflow: error: {config}: "), err
    assert message in lines[0]


def test_bad_config_from_the_real_command(tmp_path):
    proc = subprocess.run([KEEPFLOW, "serve", str(tmp_path / "nope.toml")], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"keepflow: error: {tmp_path / 'nope.toml'}: no such configuration file\n"
    config = tmp_path / "bad.toml"
    config.write_text(GOOD.replace('path = "/data"', "path = 5"))
    proc = subprocess.run([KEEPFLOW, "serve", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"keepflow: error: {config}: sources.data.path: must be a non-empty string")
    # A good file but no Prefect server to schedule the runs: said in one line too.
    config.write_text(GOOD)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([KEEPFLOW, "serve", str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "keepflow serve needs a running Prefect server" in proc.stderr


def test_example_config_is_valid_and_parsing_needs_no_prefect():
    code = ("import sys, keepflow.flows.serve_config as c; jobs = c.load('deployments/keepflow.example.toml'); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect imported'; "
            "print([(j.flow, j.name) for j in jobs])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([("backup", "data-incremental"), ("backup", "data-full"),
                                        ("replicate", "main"), ("prune", "main"), ("verify", "main")])
    check = subprocess.run([KEEPFLOW, "serve", "deployments/keepflow.example.toml", "--check"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "replicate/main: cron '45 * * * *' (Europe/Berlin) and after each backup of /backups/repo" in check.stdout


def test_jobs_carry_flow_parameters():
    import tomllib

    from keepflow.flows.serve_config import parse

    text = 'timezone = "Asia/Tokyo"\n' + GOOD + """
[repositories.main.prune]
cron = "0 3 * * *"
keep_last = 3
keep_tags = ["keep"]
grace_hours = 1
[sources.data.full]
interval = 3600
timezone = "Europe/Paris"
"""
    jobs = {(j.flow, j.name): j for j in parse(tomllib.loads(text), "k.toml")}
    inc, full = jobs["backup", "data-incremental"], jobs["backup", "data-full"]
    assert inc.parameters["rehash"] is False and full.parameters["rehash"] is True
    assert (inc.schedule.cron, inc.schedule.timezone) == ("0 * * * *", "Asia/Tokyo")
    assert (full.schedule.interval, full.schedule.timezone) == (3600.0, "Europe/Paris")
    prune = jobs["prune", "main"].parameters
    assert prune == {"repo": "/backups/repo", "keep_last": 3, "keep_tags": ["keep"], "grace_hours": 1.0,
                     "storage_options": None}
    # Every parameter is one the flow takes.
    import inspect

    from keepflow.flows.backup import backup
    from keepflow.flows.prune import prune as prune_flow
    assert set(inc.parameters) <= set(inspect.signature(backup.fn).parameters)
    assert set(prune) <= set(inspect.signature(prune_flow.fn).parameters)
