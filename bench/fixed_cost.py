"""The fixed cost of everyday commands: a no-change backup of a 20-file folder, and `snapshots`.

    python -m bench.fixed_cost [--repeats 7] [--build NAME=REV ...] [--tool NAME=COMMAND ...]
                               [--modes embedded,persistent,running,running-warm]

A no-change backup of a tiny folder reads nothing and stores nothing: what it
costs is the command's fixed part (interpreter and imports, the password KDF,
the flow run's API calls, the run's start and end). Measured for each keepflow
build (``--tool after=/tmp/hv/bin/keepflow --tool before='env PYTHONPATH=/tmp/kf-before
.venv/bin/python -P -c "from flows.cli import main; main()"'``: a command line,
split with shlex; or ``--build before=37b8b25 --build after=HEAD``: a frozen,
byte-compiled copy of that revision made here, so that neither an edit in the
working tree nor PYTHONDONTWRITEBYTECODE (every import compiled again from
source) reaches the figures) on each kind of Prefect API:

- ``embedded``: no server and no PREFECT_API_URL (what a newcomer gets: Prefect
  starts a temporary server for the command and stops it after);
- ``persistent``: ``keepflow server start`` in the tool's PREFECT_HOME, then plain
  commands (they find it with no variable set);
- ``running``: a ``prefect server start --host 127.0.0.1`` and PREFECT_API_URL;
- ``running-warm``: the same, after ``keepflow server start`` with that PREFECT_API_URL
  (which then starts only the warm process for it).

and restic 0.14 (``restic backup`` of the same folder into a repository v2 with
its default compression) as the yardstick. Every mode has its own PREFECT_HOME
and repository per tool; the first backup into each is untimed; the folder is
older than the 2-second racy window. Tools and repeats alternate, so a slow
moment of a shared machine falls on all of them. Each timed command records
wall time and user+system CPU of the command and its children (the temporary
server of the embedded mode included), and the CPU used by everything else
meanwhile, and the load average at its start. The password is in KEEPFLOW_PASSWORD / RESTIC_PASSWORD; the
repositories use keepflow's default KDF (Argon2id t=4, m=128 MiB), so the KDF is
part of the figure, as it is for a user.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import RESTIC_PASSWORD, cpu_busy, free_port, log

MODES = ("embedded", "persistent", "running", "running-warm")


@dataclass
class Sample:
    wall: float
    cpu: float
    others: float
    load: float = 0.0           # 1-minute load average when the command started


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    def spread(self) -> str:
        walls = [s.wall for s in self.samples]
        return f"{statistics.median(walls):.2f} s [{min(walls):.2f}-{max(walls):.2f}]"

    def loads(self) -> str:
        loads = [s.load for s in self.samples]
        return f"{min(loads):.1f}-{max(loads):.1f}"


def timed(cmd: list[str], env: dict) -> Sample:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = cpu_busy(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(wall, cpu, max(0.0, cpu_busy() - busy0 - cpu), load)


def frozen_build(rev: str, parent: Path) -> str:
    """A byte-compiled copy of keepflow at ``rev`` under ``parent``; the command line that runs it.

    The layout of the installed package (keepflow/, with tasks/ and flows/ inside, as
    pyproject.toml's package-dir maps them), on PYTHONPATH; ``-P`` keeps the current
    folder (a checkout, perhaps) off sys.path.
    """
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    root = parent / f"build-{commit}"
    if not root.exists():
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "keepflow", "tasks", "flows"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        for name in ("tasks", "flows"):
            (root / name).rename(root / "keepflow" / name)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root)], check=True)
    return shlex.join(["env", f"PYTHONPATH={root}", sys.executable, "-P", "-m", "keepflow"])


def make_tree(root: Path) -> None:
    root.mkdir(parents=True)
    for i in range(20):
        (root / f"f{i:02d}.txt").write_bytes(os.urandom(100 * (i + 1)))
    old = time.time() - 3600
    for p in root.iterdir():
        os.utime(p, (old, old))


class FixedCost:
    def __init__(self, a):
        self.work = Path(tempfile.mkdtemp(prefix="kf-fixed-cost-", dir=a.work))
        self.repeats = a.repeats
        self.tools = {name: frozen_build(rev, self.work) for name, rev in (b.split("=", 1) for b in a.build)}
        self.tools.update(t.split("=", 1) for t in a.tool)
        self.tools = self.tools or {"keepflow": shutil.which("keepflow") or "keepflow"}
        self.modes = [m for m in a.modes.split(",") if m]
        self.src = self.work / "src"
        self.cells: dict[tuple[str, str, str], Cell] = {}
        self.servers: list[subprocess.Popen] = []
        self.stop: list[tuple[list[str], dict]] = []     # `keepflow server stop` per persistent home
        self.base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                     "KEEPFLOW_PASSWORD": RESTIC_PASSWORD, "RESTIC_PASSWORD": RESTIC_PASSWORD}
        self.base.pop("PREFECT_API_URL", None)
        self.base.pop("KEEPFLOW_KDF", None)       # the default KDF, as a user has it

    def env(self, tool: str, mode: str) -> dict:
        env = dict(self.base, PREFECT_HOME=str(self.work / f"home-{tool}-{mode}"))
        if mode.startswith("running"):
            env["PREFECT_API_URL"] = self.running_url
        return env

    def start_running_server(self) -> None:
        port = free_port()
        home = self.work / "home-running-server"
        env = dict(self.base, PREFECT_HOME=str(home))
        prefect = str(Path(sys.executable).parent / "prefect")
        self.servers.append(subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.running_url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.running_url + "/health", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the Prefect server did not answer within 120 s") from None
                time.sleep(0.5)

    def prepare(self) -> None:
        make_tree(self.src)
        if any(m.startswith("running") for m in self.modes):
            self.start_running_server()
        for tool, command in self.tools.items():
            for mode in self.modes:
                env = self.env(tool, mode)
                if mode in ("persistent", "running-warm"):
                    subprocess.run([*shlex.split(command), "server", "start"], env=env, check=True,
                                   capture_output=True, timeout=180)
                    self.stop.append(([*shlex.split(command), "server", "stop"], env))
                repo = self.work / f"repo-{tool}-{mode}"
                subprocess.run([*shlex.split(command), "init", str(repo)], env=env, check=True, capture_output=True,
                               timeout=180)
                subprocess.run([*shlex.split(command), "backup", str(self.src), str(repo)], env=env, check=True,
                               capture_output=True, timeout=300)
        subprocess.run(["restic", "init", "-q", "-r", str(self.work / "restic")], env=self.base, check=True,
                       capture_output=True)
        subprocess.run(["restic", "backup", "-q", "-r", str(self.work / "restic"), str(self.src)], env=self.base,
                       check=True, capture_output=True)
        time.sleep(3)

    def commands(self):
        for tool, command in self.tools.items():
            for mode in self.modes:
                repo = str(self.work / f"repo-{tool}-{mode}")
                yield (tool, mode, "no-change backup"), [*shlex.split(command), "backup", str(self.src), repo], \
                    self.env(tool, mode)
                yield (tool, mode, "snapshots"), [*shlex.split(command), "snapshots", repo], self.env(tool, mode)
        r = str(self.work / "restic")
        yield ("restic", "-", "no-change backup"), ["restic", "backup", "-q", "-r", r, str(self.src)], self.base
        yield ("restic", "-", "snapshots"), ["restic", "snapshots", "-q", "-r", r], self.base

    def run(self) -> None:
        todo = list(self.commands())
        for k in range(self.repeats):
            order = todo[k % len(todo):] + todo[:k % len(todo)]      # rotate: no tool always first
            for key, cmd, env in order:
                s = timed(cmd, env)
                self.cells.setdefault(key, Cell()).samples.append(s)
                log(f"r{k + 1} {'/'.join(key)}: {s.wall:.2f} s (CPU {s.cpu:.2f} s, others {s.others:.2f} CPU-s, "
                    f"load {s.load:.2f})")

    def close(self) -> None:
        for cmd, env in self.stop:
            subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        for p in self.servers:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    def table(self) -> str:
        restic = self.cells[("restic", "-", "no-change backup")].median("wall")
        lines = ["| build | Prefect API | command | wall, median [min-max] | CPU (median) | others' CPU | "
                 "load (1 min) | / restic backup |", "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
        for (tool, mode, what), cell in sorted(self.cells.items(), key=lambda kv: (kv[0][2] != "no-change backup",
                                                                                    MODES.index(kv[0][1])
                                                                                    if kv[0][1] in MODES else 9)):
            ratio = f"{cell.median('wall') / restic:.2f}x" if what == "no-change backup" else ""
            lines.append(f"| {tool} | {mode} | {what} | {cell.spread()} | {cell.median('cpu'):.2f} s | "
                         f"{cell.median('others'):.2f} s | {cell.loads()} | {ratio} |")
        return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fixed_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--build", action="append", default=[], metavar="NAME=REV",
                   help="a frozen, byte-compiled copy of keepflow at this git revision")
    p.add_argument("--tool", action="append", default=[], metavar="NAME=COMMAND")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--work", default=None, help="parent folder for the work folder (default: the temporary folder)")
    a = p.parse_args(argv)
    b = FixedCost(a)
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}")
    for name, command in b.tools.items():
        print(f"tool {name}: {command}")
    try:
        b.prepare()
        b.run()
    finally:
        b.close()
    print(f"end {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}")
    print(b.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
