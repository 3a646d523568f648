"""Time keepflow against restic and rsync on the same reproducible trees, in the same run.

    python -m bench.run [--repeats 3] [--only small|large] [--out bench/RESULTS.md]
                        [--tools keepflow,restic,rsync] [--keep] [--scale 0.1]

What it does (see bench/README.md for the why):

1. starts a Prefect server (`prefect server start --host 127.0.0.1 --port P`, its own
   PREFECT_HOME, analytics off), times how long it takes to answer /api/health, and points
   keepflow at it with PREFECT_API_URL;
2. for each tree (small: 100,000 files of ~4 KiB in 1,000 folders; large: 20 files of
   100 MiB), generated with bench.gentree into a fresh folder:
   first backup -> no-change backup -> (apply the 1% change once) -> changed backup ->
   full restore of the latest snapshot, each scenario for every repeat and every tool,
   each repeat with its own fresh repository / mirror / restore folder;
3. verifies every restore against the source (names and sizes; contents for repeat 1);
4. writes medians, ratios and PASS/FAIL against the targets to bench/RESULTS.md.

Hygiene: nothing is deleted until the very end (on these VMs creating files right after a
large delete is several times slower for a minute or more); before every timed command the
input is read once (warm page cache) and `sync` is run (untimed), so every tool starts from
the same warm cache and no earlier write-back competes with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import gentree

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
TOOLS = ("keepflow", "restic", "rsync")
SCENARIOS = ("first", "nochange", "changed", "restore")
SCENARIO_TITLES = {
    "first": "first backup",
    "nochange": "no-change backup",
    "changed": "1%-changed backup",
    "restore": "full restore (latest)",
}
# Figures quoted in the issue for this class of machine (seconds), shown next to ours.
REFERENCE = {("small", "first", "restic"): 8.0, ("small", "nochange", "restic"): 3.4,
             ("small", "restore", "restic"): 10.0, ("large", "first", "rsync"): 2.9}
# Targets: (tree, scenario) -> (baseline tool, allowed factor)
TARGETS = {("small", "first"): ("restic", 1.0), ("small", "nochange"): ("restic", 1.0),
           ("small", "restore"): ("restic", 1.0), ("large", "first"): ("rsync", 2.0)}
RESTIC_PASSWORD = "keepflow-bench"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd: list[str], **kw) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
        return (r.stdout or r.stderr).strip()
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unavailable ({e})"


def warm(root: str | Path) -> tuple[int, int]:
    """Read every file under root once (page cache warm, metadata cached)."""
    n = b = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    fd = os.open(e.path, os.O_RDONLY)
                    try:
                        while chunk := os.read(fd, 1 << 20):
                            b += len(chunk)
                    finally:
                        os.close(fd)
                    n += 1
    return n, b


def cpu_busy() -> float:
    """Seconds of CPU time used by everything on the machine so far (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int | None) -> float:
    """CPU seconds used so far by process pid and its live descendants (0 if gone)."""
    if not pid:
        return 0.0
    kids: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    tck = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(rest[1]), []).append(int(d))
        stats[int(d)] = sum(int(x) for x in rest[11:15]) / tck  # utime stime cutime cstime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(kids.get(p, []))
    return total


def settle_probe(root: Path, n: int = 3000) -> float:
    """Seconds to create n 4 KiB files in a fresh folder (left in place until the end)."""
    root.mkdir(parents=True)
    data = b"\0" * 4096
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(root / f"p{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.close(fd)
    return time.perf_counter() - t0


def tail(path: Path, lines: int = 15, chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


@dataclass
class Run:
    tree: str
    scenario: str
    tool: str
    repeat: int
    cmd: str = ""
    seconds: float | None = None
    user: float = 0.0
    sys: float = 0.0
    maxrss_mib: float = 0.0
    rc: int | None = None
    ok: bool = False
    note: str = ""
    err_tail: str = ""
    out_head: str = ""
    other_cpu: float = 0.0  # CPU seconds used by other processes during the command
    server_cpu: float = 0.0  # ... of which by our Prefect server (keepflow's API calls)


@dataclass
class Tree:
    kind: str
    src: Path
    gen: gentree.TreeStats | None = None
    change: gentree.ChangeStats | None = None
    verify: dict = field(default_factory=dict)  # (tool, repeat) -> str


class Bench:
    def __init__(self, args):
        self.a = args
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.work = Path(args.workdir).resolve() / f"run-{stamp}-{os.getpid()}"
        self.work.mkdir(parents=True)
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.runs: list[Run] = []
        self.trees: dict[str, Tree] = {}
        self.tools = [t for t in args.tools.split(",") if t]
        self.notes: list[str] = []
        self.kf = args.keepflow or str(PROJECT / ".venv/bin/keepflow")
        if not Path(self.kf).exists():
            self.kf = shutil.which("keepflow") or self.kf
        venv_bin = Path(self.kf).parent
        self.prefect = str(venv_bin / "prefect") if (venv_bin / "prefect").exists() \
            else (shutil.which("prefect") or str(PROJECT / ".venv/bin/prefect"))
        self.server: subprocess.Popen | None = None
        self.server_startup: float | None = None
        self.server_error = ""
        self.prefect_home = self.work / "prefect-home"
        self.kf_env = dict(os.environ)
        self.kf_env.update(PREFECT_HOME=str(self.prefect_home),
                           PREFECT_SERVER_ANALYTICS_ENABLED="false")
        self.kf_env.pop("PREFECT_API_URL", None)
        self.restic_env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD)
        self.restic_cache = self.work / "restic-cache"
        self.kf_unavailable = ""
        self.cold_start: list[float] = []
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------ processes
    def timed(self, run: Run, cmd: list[str], *, cwd=None, env=None) -> Run:
        """Run cmd, timing wall clock and collecting the child's rusage; never raises."""
        run.cmd = shlex.join(cmd)
        base = self.logs / f"{run.tree}-{run.scenario}-{run.tool}-r{run.repeat}"
        out_p, err_p = base.with_suffix(".out"), base.with_suffix(".err")
        with open(out_p, "wb") as out, open(err_p, "wb") as err:
            server_pid = self.server.pid if self.server else None
            srv0, busy0 = tree_cpu(server_pid), cpu_busy()
            t0 = time.perf_counter()
            try:
                p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                run.note, run.rc = f"could not start: {e}", None
                return run
            status, ru = None, None
            deadline = t0 + self.a.timeout
            try:
                while True:
                    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.perf_counter() > deadline:
                        os.killpg(p.pid, signal.SIGKILL)  # the group this Popen created
                        pid, status, ru = os.wait4(p.pid, 0)
                        run.note = f"killed after {self.a.timeout:.0f} s timeout"
                        break
                    time.sleep(0.005)
            except BaseException:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # don't leave our child running
                    os.wait4(p.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                raise
            run.seconds = time.perf_counter() - t0
            run.server_cpu = max(0.0, tree_cpu(server_pid) - srv0)
            run.other_cpu = max(0.0, cpu_busy() - busy0 - ru.ru_utime - ru.ru_stime
                                - run.server_cpu)
            p.returncode = os.waitstatus_to_exitcode(status)
        run.rc = p.returncode
        run.user, run.sys = ru.ru_utime, ru.ru_stime
        run.maxrss_mib = ru.ru_maxrss / 1024
        run.ok = run.rc == 0 and not run.note
        if not run.ok:
            run.err_tail = tail(err_p) or tail(out_p)
        run.out_head = out_p.read_text(errors="replace")[:1500]
        return run

    def start_server(self) -> None:
        port = free_port()
        env = dict(os.environ, PREFECT_HOME=str(self.prefect_home),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        self.prefect_home.mkdir(exist_ok=True)
        cmd = [self.prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        self.server_cmd = shlex.join(cmd)
        log(f"starting Prefect server: {self.server_cmd}")
        t0 = time.perf_counter()
        try:
            with open(self.logs / "prefect-server.log", "wb") as slog:    # the server has its own copy
                self.server = subprocess.Popen(cmd, env=env, stdout=slog, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self.server_error = f"could not start: {e}"
            return
        url = f"http://127.0.0.1:{port}/api"
        while time.perf_counter() - t0 < 180:
            if self.server.poll() is not None:
                self.server_error = f"exited with {self.server.returncode}: " \
                    + tail(self.logs / "prefect-server.log")
                return
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.server_startup = time.perf_counter() - t0
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            self.server_error = "did not answer /api/health within 180 s"
            return
        self.kf_env["PREFECT_API_URL"] = url
        log(f"Prefect server healthy after {self.server_startup:.1f} s at {url}")

    def start_keepflow_server(self) -> None:
        """``keepflow server start`` of the tool under test, in its PREFECT_HOME: the persistent
        server and its warm process (flows/cli/warm.py); commands then find it with nothing set."""
        self.prefect_home.mkdir(exist_ok=True)
        port = free_port()
        cmd = [self.kf, "server", "start", "--port", str(port), "--json"]
        self.server_cmd = shlex.join(cmd)
        log(f"starting the persistent server: {self.server_cmd}")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=self.kf_env, capture_output=True, text=True)
        if p.returncode:
            self.server_error = f"`{self.server_cmd}` exited {p.returncode}: {p.stderr[-600:]}"
            return
        self.server_startup = time.perf_counter() - t0
        self.keepflow_server = True
        log(f"persistent server after {self.server_startup:.1f} s: {p.stdout.strip()}")

    def stop_server(self) -> None:
        if getattr(self, "keepflow_server", False):
            subprocess.run([self.kf, "server", "stop"], env=self.kf_env, capture_output=True)
            self.keepflow_server = False
        if not self.server or self.server.poll() is not None:
            return
        try:
            os.killpg(self.server.pid, signal.SIGTERM)  # its own session, started above
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(10)
        except ProcessLookupError:
            pass

    def check_keepflow(self) -> None:
        if "keepflow" not in self.tools:
            return
        for i in range(3):
            r = self.timed(Run("-", "cold-start", "keepflow", i), [self.kf, "--help"],
                           env=self.kf_env)
            if not r.ok:
                self.kf_unavailable = f"`keepflow --help` failed (rc={r.rc}): {r.note}\n{r.err_tail}"
                log(f"keepflow unavailable, skipping it: {r.note} {r.err_tail[-300:]}")
                return
            self.cold_start.append(r.seconds)
        log(f"keepflow --help: median {statistics.median(self.cold_start):.2f} s")

    # ------------------------------------------------------------------ tools
    def repo(self, tree: str, tool: str, r: int) -> Path:
        base = {"keepflow": "repo", "restic": "repo", "rsync": "mirror"}[tool]
        return self.work / tree / tool / f"{base}-r{r + 1}"

    def restore_dir(self, tree: str, tool: str, r: int) -> Path:
        return self.work / tree / "restore" / f"{tool}-r{r + 1}"

    def prepare(self, tree: str, tool: str, r: int) -> str:
        """Untimed set-up; returns an error text or ''."""
        repo = self.repo(tree, tool, r)
        repo.parent.mkdir(parents=True, exist_ok=True)
        if tool == "restic":
            p = subprocess.run(["restic", "-r", str(repo), "--cache-dir", str(self.restic_cache),
                                "init", "-q"], env=self.restic_env, capture_output=True, text=True)
            return "" if p.returncode == 0 else f"restic init failed: {p.stderr[-500:]}"
        if tool == "rsync":
            repo.mkdir()
        # keepflow: `keepflow backup` creates the repository (timed as part of the first backup)
        return ""

    def command(self, tree: Tree, tool: str, scenario: str, r: int):
        """(argv, cwd, env) of the timed command."""
        repo, src = self.repo(tree.kind, tool, r), tree.src
        if tool == "keepflow":
            if scenario == "restore":
                return [self.kf, "restore", str(repo), str(self.restore_dir(tree.kind, tool, r)),
                        "--json"], None, self.kf_env
            return [self.kf, "backup", str(src), str(repo), "--json"], None, self.kf_env
        if tool == "restic":
            base = ["restic", "-r", str(repo), "--cache-dir", str(self.restic_cache)]
            if scenario == "restore":
                return base + ["restore", "latest", "--target",
                               str(self.restore_dir(tree.kind, tool, r))], None, self.restic_env
            # backed up from inside the tree so that restore puts it at the target's root
            return base + ["backup", ".", "--quiet"], str(src), self.restic_env
        if tool == "rsync":
            if scenario == "restore":
                return ["rsync", "-a", f"{repo}/", f"{self.restore_dir(tree.kind, tool, r)}/"], \
                    None, None
            return ["rsync", "-a", "--delete", f"{src}/", f"{repo}/"], None, None
        raise ValueError(tool)

    # ------------------------------------------------------------------ phases
    def phase(self, tree: Tree, scenario: str, failed: set) -> None:
        tools = [t for t in self.tools if not (t == "keepflow" and self.kf_unavailable)]
        for r in range(self.a.repeats):
            order = tools[r % len(tools):] + tools[:r % len(tools)] if tools else []
            for tool in order:
                run = Run(tree.kind, scenario, tool, r + 1)
                if (tool, r) in failed:
                    run.note = "skipped: an earlier step on this repository failed"
                    self.runs.append(run)
                    continue
                argv, cwd, env = self.command(tree, tool, scenario, r)
                # warm the input of this command, then flush earlier writes (both untimed)
                warm(self.repo(tree.kind, tool, r) if scenario == "restore" else tree.src)
                os.sync()
                self.timed(run, argv, cwd=cwd, env=env)
                self.runs.append(run)
                state = f"{run.seconds:.2f} s" if run.ok else f"FAILED rc={run.rc} {run.note}"
                log(f"{tree.kind:5s} {scenario:8s} r{r + 1} {tool:8s} {state}"
                    f"  (user {run.user:.1f} s, sys {run.sys:.1f} s, rss {run.maxrss_mib:.0f} MiB, "
                    f"Prefect server {run.server_cpu:.1f} CPU-s, "
                    f"other processes {run.other_cpu:.1f} CPU-s)")
                if not run.ok:
                    failed.add((tool, r))
                    if run.err_tail:
                        log("  " + run.err_tail[-600:].replace("\n", "\n  "))

    def verify_restores(self, tree: Tree) -> None:
        expected = gentree.list_files(str(tree.src))
        for run in [x for x in self.runs if x.tree == tree.kind and x.scenario == "restore"]:
            key = f"{run.tool} r{run.repeat}"
            if not run.ok:
                tree.verify[key] = "not restored"
                continue
            dest = self.restore_dir(tree.kind, run.tool, run.repeat - 1)
            try:
                got = gentree.list_files(str(dest))
            except OSError as e:
                tree.verify[key] = f"FAIL: {e}"
                continue
            if got != expected:
                missing = len(set(expected) - set(got))
                extra = len(set(got) - set(expected))
                tree.verify[key] = (f"FAIL: {len(got)} files vs {len(expected)} expected "
                                    f"({missing} missing or different size, {extra} unexpected)")
                continue
            if run.repeat == 1:
                bad = [rel for rel, _ in expected
                       if not same_bytes(tree.src / rel, dest / rel)]
                tree.verify[key] = ("OK (names, sizes, contents)" if not bad
                                    else f"FAIL: {len(bad)} files differ, e.g. {bad[:3]}")
            else:
                tree.verify[key] = "OK (names, sizes)"
            run_note = tree.verify[key]
            if run_note.startswith("FAIL"):
                run.note = "restore incorrect: " + run_note
        log(f"{tree.kind}: restore verification: {tree.verify}")

    def run_tree(self, kind: str) -> None:
        src = self.work / kind / "src"
        n_files = None
        if self.a.scale != 1.0:
            base = gentree.SMALL_FILES if kind == "small" else gentree.LARGE_FILES
            n_files = max(2, int(base * self.a.scale))
        log(f"{kind}: generating tree in {src}")
        tree = Tree(kind, src)
        tree.gen = gentree.generate(kind, str(src), n_files=n_files)
        log(f"{kind}: {tree.gen.files} files, {tree.gen.bytes / 2**20:.0f} MiB "
            f"in {tree.gen.seconds:.1f} s")
        self.trees[kind] = tree
        failed: set = set()
        for tool in self.tools:
            if tool == "keepflow" and self.kf_unavailable:
                continue
            for r in range(self.a.repeats):
                err = self.prepare(kind, tool, r)
                if err:
                    failed.add((tool, r))
                    self.runs.append(Run(kind, "first", tool, r + 1, note=err))
        self.phase(tree, "first", failed)
        self.phase(tree, "nochange", failed)
        tree.change = gentree.apply_change(str(src))
        log(f"{kind}: applied change: {tree.change.modified} modified, {tree.change.added} "
            f"added, {tree.change.deleted} deleted")
        self.phase(tree, "changed", failed)
        self.phase(tree, "restore", failed)
        self.verify_restores(tree)

    def extra_keepflow_info(self) -> None:
        """Cheap informational timings: read-only `keepflow snapshots` on the small repo."""
        if "keepflow" not in self.tools or self.kf_unavailable or "small" not in self.trees:
            return
        repo = self.repo("small", "keepflow", 0)
        if not repo.exists():
            return
        for i in range(3):
            r = self.timed(Run("small", "snapshots", "keepflow", i + 1),
                           [self.kf, "snapshots", str(repo), "--json"], env=self.kf_env)
            self.runs.append(r)

    # ------------------------------------------------------------------ main
    def settle(self) -> None:
        """Wait (up to ~3 min) until small-file creation speed is steady: a large delete
        shortly before the run makes file creation several times slower for a while."""
        self.probes: list[float] = []
        for i in range(36):
            self.probes.append(settle_probe(self.work / "settle" / f"p{i}"))
            if len(self.probes) >= 2 and max(self.probes[-2:]) <= self.a.settle:
                break
            time.sleep(5)
        else:
            self.notes.append(f"File creation was still slow after 3 minutes (last probes "
                              f"{self.probes[-2]:.2f} s, {self.probes[-1]:.2f} s > "
                              f"{self.a.settle} s): figures are likely pessimistic.")
        log("file-creation probe (3,000 x 4 KiB files), seconds: "
            + ", ".join(f"{p:.2f}" for p in self.probes))

    def main(self) -> int:
        need = estimate_disk(self.a)
        free = shutil.disk_usage(self.work).free
        log(f"work dir {self.work}; needs about {need / 2**30:.0f} GiB, "
            f"{free / 2**30:.0f} GiB free")
        if need > free * 0.95:
            log("not enough free space; use --repeats 1, --only small, or --workdir")
            return 2
        self.load_start = Path("/proc/loadavg").read_text().strip()
        try:
            self.settle()
            if "keepflow" in self.tools:
                self.start_server()
                if self.server_error:
                    self.kf_unavailable = f"Prefect server did not start: {self.server_error}"
                    log(self.kf_unavailable)
                else:
                    self.check_keepflow()
            for kind in (["small", "large"] if not self.a.only else [self.a.only]):
                self.run_tree(kind)
            self.extra_keepflow_info()
        except KeyboardInterrupt:
            self.notes.append("Interrupted: the results below are incomplete.")
            log("interrupted; writing what we have")
        finally:
            self.stop_server()
        out = Path(self.a.out)
        out.write_text(self.report() + kept_sections(out))
        log(f"wrote {out} after {(time.perf_counter() - self.t_start) / 60:.1f} min")
        if self.a.keep:
            log(f"kept {self.work}")
        else:
            log(f"removing {self.work}")
            shutil.rmtree(self.work, ignore_errors=True)
        return 0

    # ------------------------------------------------------------------ report
    def median(self, tree: str, scenario: str, tool: str):
        runs = [x for x in self.runs if (x.tree, x.scenario, x.tool) == (tree, scenario, tool)]
        ok = [x.seconds for x in runs if x.ok and not x.note]
        if not runs:
            return None, ""
        if len(ok) < len(runs):
            return None, f"FAILED ({len(runs) - len(ok)}/{len(runs)})"
        return statistics.median(ok), ""

    def report(self) -> str:
        a = self.a
        fmt = lambda v: "" if v is None else f"{v:.2f} s"  # noqa: E731
        L: list[str] = []
        now = dt.datetime.now().astimezone()
        L += ["# keepflow benchmark results", "",
              f"Generated by `python -m bench.run --repeats {a.repeats}"
              + (f" --only {a.only}" if a.only else "")
              + (f" --tools {a.tools}" if a.tools != ",".join(TOOLS) else "")
              + (f" --scale {a.scale}" if a.scale != 1.0 else "")
              + f"` on {now:%Y-%m-%d %H:%M %Z}, total run time "
              f"{(time.perf_counter() - self.t_start) / 60:.1f} min. "
              f"Times are wall-clock medians of {a.repeats} repeat(s); every repeat uses a fresh "
              "repository, mirror and restore folder.", ""]
        if a.scale != 1.0:
            L += [f"**Scaled run (--scale {a.scale}): not the benchmark trees; "
                  "figures are not comparable with the targets.**", ""]
        for n in self.notes:
            L += [f"**{n}**", ""]
        if self.kf_unavailable:
            head, _, rest = self.kf_unavailable.partition("\n")
            L += ["**keepflow was not measured:** " + head, ""]
            if rest.strip():
                L += ["```", self.strip(rest.strip()), "```", ""]

        # ---- summary table
        L += ["## Results", "",
              "| tree | scenario | keepflow | restic | rsync | keepflow/restic | keepflow/rsync "
              "| target | result |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for tree in self.trees:
            for sc in SCENARIOS:
                cells, med = [], {}
                for tool in TOOLS:
                    m, fail = self.median(tree, sc, tool)
                    med[tool] = m
                    ref = REFERENCE.get((tree, sc, tool))
                    c = fail or fmt(m) or ("n/a" if tool in self.tools else "not run")
                    spread = [x.seconds for x in self.runs if x.ok and x.seconds is not None
                              and (x.tree, x.scenario, x.tool) == (tree, sc, tool)]
                    if m is not None and len(spread) > 1:
                        c += f" [{min(spread):.2f}-{max(spread):.2f}]"
                    if ref is not None:
                        c += f" (issue: {ref:g} s)"
                    cells.append(c)
                ratio = lambda b: (f"{med['keepflow'] / med[b]:.2f}x"  # noqa: E731
                                   if med["keepflow"] and med[b] else "")
                tgt, res = "", ""
                if (tree, sc) in TARGETS:
                    base, factor = TARGETS[(tree, sc)]
                    tgt = f"keepflow <= {'' if factor == 1 else f'{factor:g}x '}{base}"
                    if med["keepflow"] and med[base]:
                        res = "PASS" if med["keepflow"] <= factor * med[base] else "FAIL"
                    elif "keepflow" in self.tools:
                        res = "FAIL (keepflow not measured)" if not med["keepflow"] else "n/a"
                L.append(f"| {tree} | {SCENARIO_TITLES[sc]} | " + " | ".join(cells)
                         + f" | {ratio('restic')} | {ratio('rsync')} | {tgt} | {res} |")
        L += ["", "Cells: median [min-max] over the repeats; \"issue\" is the figure quoted in the "
              "issue for this machine class.", "",
              "rsync rows are a plain mirror (`rsync -a --delete`), not a versioned backup: "
              "the floor for copying the same bytes. Its \"restore\" is a copy of the mirror "
              "into a fresh folder.", ""]

        L += ["## Prefect server and start-up", ""]
        if self.server_startup is not None:
            L += [f"- Prefect server start-up (spawn to first `200` from `/api/health`, fresh "
                  f"PREFECT_HOME with SQLite): **{self.server_startup:.1f} s**. It is started "
                  "once before the benchmark and is not part of any keepflow figure; every "
                  "keepflow command runs with `PREFECT_API_URL` pointing at it."]
        elif "keepflow" in self.tools:
            L += [f"- Prefect server did not start: {self.server_error}"]
        if self.cold_start:
            L += [f"- `keepflow --help` (interpreter start + imports): median "
                  f"{statistics.median(self.cold_start):.2f} s of {len(self.cold_start)}."]
        snaps = [x for x in self.runs if x.scenario == "snapshots"]
        if snaps:
            ok = [x.seconds for x in snaps if x.ok]
            L += ["- `keepflow snapshots REPO --json` (read-only, no flow run) on the small "
                  "repository: " + (f"median {statistics.median(ok):.2f} s"
                                     if len(ok) == len(snaps) else "FAILED")]
        L += [""]

        # ---- trees
        L += ["## Trees", ""]
        for t in self.trees.values():
            g = t.gen
            L += [f"- **{t.kind}**: `python -m bench.gentree {t.kind} DEST` (seed {g.seed}): "
                  f"{g.files:,} files, {g.folders:,} folders, {g.bytes / 2**20:,.0f} MiB; "
                  f"generated in {g.seconds:.1f} s."]
            if t.change:
                c = t.change
                L += [f"  1% change (`bench.gentree.apply_change`, seed {c.seed}): {c.modified:,} "
                      f"file(s) modified in place, {c.added:,} added, {c.deleted:,} deleted "
                      f"({c.bytes_written / 2**20:.1f} MiB written)."]
            if t.verify:
                L += ["  Restore check against the source: "
                      + "; ".join(f"{k}: {v}" for k, v in t.verify.items()) + "."]
        L += [""]

        # ---- method
        L += ["## Method and cache state", "",
              "- Order per tree: generate -> first backup (all repeats, all tools) -> no-change "
              "backup -> apply the 1% change once -> changed backup -> restore of the latest "
              "snapshot into a fresh folder. Every tool therefore sees exactly the same tree "
              "state in each scenario. Tool order rotates between repeats.",
              "- **Caches are warm**: immediately before each timed command the benchmark reads "
              "every file of that command's input (the source tree for backups, the repository "
              "or mirror for restores) and runs `sync` (neither is timed). Nothing is evicted "
              "on purpose; cold-cache figures would be slower for every tool.",
              f"- Before starting, the run waited until small-file creation was fast again "
              f"(3,000 x 4 KiB files per probe, at most {self.a.settle} s twice; seconds: "
              f"{', '.join(f'{p:.2f}' for p in getattr(self, 'probes', []))}). "
              f"Load average at start: {getattr(self, 'load_start', '?')}.",
              self.contention_note(),
              "- Writes go into fresh folders and nothing is deleted until the end of the run "
              "(on these VMs, file creation right after a large delete is several times slower "
              "for a minute or more).",
              "- Timed: wall clock of the one command, from spawn to exit. No tool is asked to "
              "fsync beyond its defaults. `restic init` is not timed; keepflow creates its "
              "repository inside its (timed) first backup.",
              ""]

        # ---- commands
        L += ["## Commands", "", "`$W` is the run's work folder.", "", "```"]
        seen = set()
        order = {t: i for i, t in enumerate(TOOLS)}
        for x in sorted(self.runs, key=lambda x: (order.get(x.tool, 9), x.tree != "small")):
            if not x.cmd or x.repeat != 1 or (x.tool, x.scenario, x.tree) in seen:
                continue
            seen.add((x.tool, x.scenario, x.tree))
            env = {"restic": f"RESTIC_PASSWORD={RESTIC_PASSWORD} ",
                   "keepflow": "PREFECT_HOME=$W/prefect-home PREFECT_API_URL=http://127.0.0.1:$P/api "}.get(x.tool, "")
            cwd = " (run in the source folder)" if x.tool == "restic" and x.scenario != "restore" \
                else ""
            L.append(f"# {x.tree} {x.scenario}{cwd}\n{env}{self.strip(x.cmd)}")
        if "restic" in self.tools:
            L.append(f"# restic set-up (untimed)\nRESTIC_PASSWORD={RESTIC_PASSWORD} restic -r "
                     f"$W/<tree>/restic/repo-rN --cache-dir $W/restic-cache init")
        if self.server_startup is not None or self.server_error:
            L.append("# Prefect server (once)\nPREFECT_HOME=$W/prefect-home "
                     "PREFECT_SERVER_ANALYTICS_ENABLED=false "
                     + self.strip(self.server_cmd).rsplit(" ", 1)[0] + " $P")
        L += ["```", ""]

        # ---- machine
        L += ["## Machine and versions", ""] + [f"- {k}: {v}" for k, v in machine(self).items()]
        L += [""]

        # ---- raw
        L += ["## All measurements", "",
              "| tree | scenario | tool | repeat | wall | user CPU | sys CPU | max RSS | Prefect server CPU "
              "| everything else's CPU | exit | note |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for x in self.runs:
            L.append(f"| {x.tree} | {x.scenario} | {x.tool} | {x.repeat} | {fmt(x.seconds)} | "
                     f"{x.user:.1f} s | {x.sys:.1f} s | {x.maxrss_mib:.0f} MiB | "
                     f"{x.server_cpu:.1f} s | {x.other_cpu:.1f} s | "
                     f"{'' if x.rc is None else x.rc} | {x.note.replace('|', '/')} |")
        L += [""]
        failures = [x for x in self.runs if not x.ok and x.err_tail]
        if failures:
            L += ["## Failures", ""]
            for x in failures:
                L += [f"**{x.tree} {x.scenario} {x.tool} r{x.repeat}** (exit {x.rc}) "
                      f"`{self.strip(x.cmd)}`", "", "```", self.strip(x.err_tail), "```", ""]
        kf_out = next((x for x in self.runs if x.tool == "keepflow" and x.ok and x.out_head
                       and x.scenario == "first"), None)
        if kf_out:
            L += ["## Sample keepflow output (first small backup, `--json`)", "", "```",
                  self.strip(kf_out.out_head.strip())[:1500], "```", ""]
        return "\n".join(L)

    def contention_note(self) -> str:
        timed = [x for x in self.runs if x.seconds and x.scenario in SCENARIOS]
        if not timed:
            return "- No command was timed."
        wall = sum(x.seconds for x in timed)
        other = sum(x.other_cpu for x in timed)
        worst = max(timed, key=lambda x: x.other_cpu / x.seconds)
        text = (f"- CPU used by everything else (other processes, and kernel threads such as "
                f"write-back of the tool's own writes; not the tool, not our Prefect server): "
                f"{other / wall:.2f} CPUs on average during the timed commands (the machine has "
                f"{os.cpu_count()}); the highest was {worst.tree} {worst.scenario} {worst.tool} "
                f"r{worst.repeat} ({worst.other_cpu / worst.seconds:.2f} CPUs). Restores and "
                "first backups cause some of it themselves (write-back); a large figure on a "
                "no-change backup means other work on the machine. The Prefect server's CPU "
                "during keepflow commands is keepflow's own cost and is listed separately.")
        quiet = [x.other_cpu / x.seconds for x in timed if x.scenario == "nochange"]
        if quiet and statistics.median(quiet) > 0.2:
            text += (" **Other work was running on the machine during the benchmark (median "
                     f"{statistics.median(quiet):.2f} CPUs during no-change backups): treat "
                     "these figures as noisy.**")
        return text

    def strip(self, s: str) -> str:
        return s.replace(str(self.work), "$W")


def kept_sections(path: Path) -> str:
    """Sections other benchmarks own in RESULTS.md (``<!-- name -->`` ... ``<!-- /name -->``), kept as they are."""
    if not path.exists():
        return ""
    found = re.findall(r"\n(<!-- ([a-z0-9-]+) -->.*?<!-- /\2 -->)", path.read_text(), flags=re.S)
    return "".join(f"\n{block}\n" for block, _ in found)


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def machine(b: Bench) -> dict:
    info = {}
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    fs = sh(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(b.work)])
    info["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info["CPU"] = f"{cpu}, `nproc` = {os.cpu_count()}"
    info["memory"] = mem
    info["work folder filesystem"] = f"`{fs}`"
    info["kernel"] = platform.release()
    info["python"] = f"{platform.python_version()} ({sys.executable})"
    info["restic"] = sh(["restic", "version"]) if "restic" in b.tools else "not run"
    info["rsync"] = sh(["rsync", "--version"]).splitlines()[0] if "rsync" in b.tools else "not run"
    py = str(Path(b.kf).parent / "python")
    ver = "import importlib.metadata as m\nfor d in ('keepflow','prefect'):\n" \
          "  try: print(d, m.version(d))\n  except Exception as e: print(d, 'not installed')"
    info["keepflow / prefect"] = sh([py, "-c", ver]).replace("\n", ", ") if Path(py).exists() \
        else "unknown"
    rev = sh(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", str(PROJECT), "status", "--porcelain", "--", "tasks", "flows"])
    info["keepflow source"] = f"git {rev}" + (" + uncommitted changes in tasks/ flows/"
                                              if dirty and "unavailable" not in dirty else "")
    return info


def estimate_disk(a) -> int:
    kinds = ["small", "large"] if not a.only else [a.only]
    size = {"small": 600 * 2**20, "large": 2100 * 2**20}  # on-disk, incl. block rounding
    n_tools = len([t for t in a.tools.split(",") if t])
    return int(sum(size[k] * a.scale * (1 + 2 * n_tools * a.repeats) for k in kinds))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["small", "large"])
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--tools", default=",".join(TOOLS),
                   help="comma-separated subset of keepflow,restic,rsync")
    p.add_argument("--workdir", default="/work/bench-tmp",
                   help="parent of the run's work folder (default /work/bench-tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--keepflow", help="keepflow executable (default .venv/bin/keepflow)")
    p.add_argument("--timeout", type=float, default=900, help="per command, seconds")
    p.add_argument("--settle", type=float, default=0.25,
                   help="start once creating 3,000 4 KiB files takes at most this many seconds "
                        "twice in a row (normal here: 0.05-0.1 s; up to 3 min of waiting)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="shrink the trees' file counts for a smoke test (e.g. 0.01)")
    a = p.parse_args(argv)
    bad = set(a.tools.split(",")) - set(TOOLS)
    if bad:
        p.error(f"unknown tools: {bad}")
    for tool in ("restic", "rsync"):
        if tool in a.tools.split(",") and not shutil.which(tool):
            p.error(f"{tool} not found: apt-get install -y restic rsync")

    def stop(signum, frame):
        raise KeyboardInterrupt
    # also when started in the background (where SIGINT is ignored): Ctrl-C or kill -TERM
    # writes the partial results, stops the Prefect server and cleans up
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return Bench(a).main()


if __name__ == "__main__":
    sys.exit(main())
