"""The host-local registry of keepflow's live flow runs.

Why: command-line flow runs send no heartbeats (flows/cli/startup.py turns them off;
they cost up to a second per command), so when such a run is killed with
SIGKILL, by the OOM killer or by a power loss, Prefect never learns of it and
shows it ``Running`` forever. Only a process on the same host can tell that
the run's process is gone. So every keepflow flow run registers itself here
while it runs, and later runs check the registry for runs whose process has
died (flows/_runs.py then sets them ``Crashed`` through the Prefect API).

Where: one JSON file per live flow run,
``$PREFECT_HOME/keepflow/runs/<flow_run_id>.json`` (PREFECT_HOME defaults to
``~/.prefect``). Next to Prefect's own state rather than under
``$XDG_STATE_HOME``: the records describe runs of one Prefect set-up (with
the embedded default its database lives in the same folder), a process
pointed at another PREFECT_HOME is another set-up whose runs it should not
judge, and a test or CI job with a private PREFECT_HOME gets a private
registry for free.

A record holds the flow run's id and name, the flow, the repository (as
``repo_key`` normalises it), the Prefect API it was recorded in (``None``: the
embedded temporary server, i.e. the database in PREFECT_HOME), and the
process identity (host, pid, start ticks, boot id; see liveness.py), and,
with the embedded server, the identity of that server's process (``helper``).
It is written atomically (temporary name, rename), owner-only.

The embedded server is a child process that outlives a SIGKILLed parent (it
is not told, and nothing reaps it but init): each crash would leave a Prefect
server of some 250 MiB running for good. When a dead record names one that is
still exactly that process (same pid, start ticks and boot), it is sent
SIGTERM (``stop_orphaned_helper``).

Life cycle: written when the run enters ``Running``; removed when it has
reached a final state (after the state is recorded: a kill between the end
of the flow's code and its final state still leaves the record). A record
whose host is this one and whose process is gone is *dead*. Dead records of
a repository are looked at by every keepflow flow run on that repository
when it starts, and by ``keepflow unlock REPO``: the same scope as leases,
where a user looks after a crash. Records from other hosts (a PREFECT_HOME
on a shared home folder) are left to their own host.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import tempfile
from dataclasses import asdict, dataclass

from . import liveness


@dataclass
class RunRecord:
    flow_run_id: str
    flow_run_name: str
    flow: str
    repo: str
    api_url: str | None
    host: str
    pid: int
    start: int | None
    boot: str | None
    started_at: str
    helper_pid: int | None = None      # the embedded Prefect server this run started, if any
    helper_start: int | None = None
    path: str = ""

    @property
    def process(self) -> liveness.ProcessId:
        return liveness.ProcessId(self.host, self.pid, self.start, self.boot)

    def is_dead(self) -> bool:
        """This host's record whose process is gone (None from another host counts as alive)."""
        return liveness.gone(self.process) is True


def default_folder() -> str:
    home = os.environ.get("PREFECT_HOME") or "~/.prefect"
    return os.path.join(os.path.expanduser(home), "keepflow", "runs")


def repo_key(url: str) -> str:
    """One spelling per repository: local paths absolute (as storage.open_url
    makes them), URLs without a trailing slash."""
    if "://" in url or url.startswith("memory:"):
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))


def register(folder: str, flow_run_id: str, flow_run_name: str, flow: str, repo: str,
             api_url: str | None, helper_pid: int | None = None) -> RunRecord:
    """Record the current process as running ``flow_run_id`` (``helper_pid``: a child
    process, the embedded server, to stop if we die and leave it behind)."""
    me = liveness.this_process()
    helper = liveness.proc_stat(helper_pid) if helper_pid else None
    record = RunRecord(flow_run_id=str(flow_run_id), flow_run_name=flow_run_name, flow=flow, repo=repo_key(repo),
                       api_url=api_url, host=me.host, pid=me.pid, start=me.start, boot=me.boot,
                       started_at=dt.datetime.now(dt.UTC).isoformat(),
                       helper_pid=helper_pid if helper else None, helper_start=helper[1] if helper else None)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    data = asdict(record)
    data.pop("path")
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)   # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        record.path = os.path.join(folder, f"{record.flow_run_id}.json")
        os.replace(tmp, record.path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return record


def unregister(folder: str, flow_run_id: str) -> None:
    try:
        os.unlink(os.path.join(folder, f"{flow_run_id}.json"))
    except FileNotFoundError:
        pass


def records(folder: str) -> list[RunRecord]:
    """Every readable record (a half-written or foreign file is skipped)."""
    found = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                data = json.load(f)
            found.append(RunRecord(**data, path=path))
        except (OSError, ValueError, TypeError):
            continue
    return found


def dead_runs(folder: str, repo: str | None = None) -> list[RunRecord]:
    """Records of this host whose process is gone (of ``repo`` only, if given)."""
    key = repo_key(repo) if repo is not None else None
    return [r for r in records(folder) if (key is None or r.repo == key) and r.is_dead()]


def stop_orphaned_helper(record: RunRecord) -> bool:
    """SIGTERM the helper process of a dead run if it still runs and is still
    exactly the process recorded (never a pid that has been reused since)."""
    if record.helper_pid is None or record.helper_start is None or not record.is_dead():
        return False
    if record.boot != liveness.this_process().boot:
        return False               # an earlier boot: that process is long gone
    found = liveness.proc_stat(record.helper_pid)
    if found is None or found[0] in ("Z", "X", "x", "?") or found[1] != record.helper_start:
        return False
    try:
        os.kill(record.helper_pid, signal.SIGTERM)
    except OSError:
        return False
    return True


def crash_message(record: RunRecord, by: str) -> str:
    return (f"process {record.pid} on {record.host} ended without reporting a final state "
            f"(killed, out of memory or power lost); marked Crashed by {by}")
