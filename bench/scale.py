"""Scale scenario: time and peak memory of keepflow and restic on a tree of a million small files.

    python -m bench.scale [--files 1000000] [--sizes MIN:MAX] [--format 2] [--label NAME]
                          [--tools keepflow,keepflow-warm,keepflow-w1,keepflow-w2,restic] [--src DIR]
                          [--code DIR] [--out bench/RESULTS.md] [--keep]

What it does (the method of bench/run.py, at scale; see bench/README.md):

1. generates ``bench.gentree small`` with ``--files`` files (sizes uniform in
   ``--sizes``) into a fresh folder, or uses ``--src``, a tree made the same
   way (the 1% change is then applied to it in place); then waits until the
   newest mtime in the tree is out of keepflow's 2-second racy window (plus a
   second), so the no-change backup trusts every file;
2. starts a Prefect server (as bench/run.py does) and points keepflow at it;
   ``keepflow init --format N`` and ``restic init`` (repository version 2:
   encrypted, compression "auto") are run untimed; keepflow's password is
   ``KEEPFLOW_PASSWORD``, restic's ``RESTIC_PASSWORD``;
3. per scenario, every tool in turn, with the input read once and ``sync`` run
   first (warm cache, untimed): first backup -> no-change backup -> the 1%
   change (``gentree.apply_change``) -> changed backup -> full restore of the
   latest snapshot into a fresh folder. The tools are ``keepflow`` (a
   process of its own per command), ``keepflow-warm`` (the same commands
   after ``keepflow server start`` for the bench's API: each runs in the warm
   process's forked child; its memory and CPU are sampled there),
   ``keepflow-wN`` (``--workers N``: a local Dask
   cluster of N worker processes for the batches), ``keepflow-daskN``
   (``--dask ADDRESS`` of a cluster started beforehand, untimed, as a user
   starts one: a ``dask scheduler`` and N ``dask worker`` processes of one
   thread each, with their own working folders and TMPDIR; the summary's
   ``ran_on`` says which worker ran how many batches, and the workers' CPU
   and RSS are counted as the command's) and ``restic``; each has
   its own repository;
4. records wall time, user and system CPU, and two peak memory figures per
   command: ``ru_maxrss`` of the waited-for child (the largest single process
   of the command: for keepflow the ``keepflow`` process, Prefect engine
   included) and the highest sum of RSS over the command's whole process
   tree, sampled every 0.2 s (what ``--workers`` adds in worker processes;
   it counts shared library pages once per process, so it is an upper
   bound). The Prefect server is a separate process and is not counted. Also
   the load average before/after and the CPU everything else used;
5. checks each restore as soon as it is done (names and sizes of every file,
   contents of 1,000 sampled files), then deletes it and waits until file
   creation is fast again (a 5M-file tree and its restores would not fit in
   the inode budget together), and writes a section ``<!-- scale-LABEL -->``
   into bench/RESULTS.md (replacing an older one of the same label;
   bench/run.py keeps such sections).

``--code DIR`` runs keepflow from a source checkout (``PYTHONPATH=DIR python
-m keepflow.flows.cli``, or ``flows.cli`` for a checkout from before the
``keepflow`` namespace), e.g. ``git archive <commit> | tar -x -C DIR`` for a
before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import gentree
from bench.run import HERE, RESTIC_PASSWORD, Bench, Run, log, machine, same_bytes, settle_probe, warm

SCENARIOS = ("first", "nochange", "changed", "restore")
TITLES = {"first": "first backup", "nochange": "no-change backup", "changed": "1%-changed backup",
          "restore": "full restore (latest)"}
# (scenario) -> allowed keepflow/restic wall-time factor (issue 10, at 1M files)
TARGETS = {"first": 0.85, "nochange": 0.4}
RSS_TARGET_MIB = 500          # issue 10: 1M files, the whole `keepflow backup` command
RSS_TARGET_5M_MIB = 1536      # issue 10: 5M files, backup and restore
SAMPLED_CONTENTS = 1000
SAMPLE_EVERY = 0.2            # seconds between process-tree RSS samples
PAGE = os.sysconf("SC_PAGE_SIZE")


def workers_of(tool: str) -> int | None:
    """``keepflow-w2`` -> 2; ``keepflow`` -> None (the default thread pool)."""
    m = re.fullmatch(r"keepflow-w(\d+)", tool)
    return int(m.group(1)) if m else None


def dask_workers_of(tool: str) -> int | None:
    """``keepflow-dask2`` -> 2 (a cluster of 2 workers started beforehand); anything else -> None."""
    m = re.fullmatch(r"keepflow-dask(\d+)", tool)
    return int(m.group(1)) if m else None


def is_keepflow(tool: str) -> bool:
    return tool in ("keepflow", WARM) or workers_of(tool) is not None or dask_workers_of(tool) is not None


WARM = "keepflow-warm"     # commands run in the warm process of `keepflow server start` (for the bench's API)


def _processes() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


TICK = os.sysconf("SC_CLK_TCK")


def _tree_memory(skip: set[int], roots: list[int] = (), cpu: dict[int, float] | None = None
                 ) -> tuple[int, int, int]:
    """Bytes of RSS and of PSS summed over each child process tree of this process (but the ``skip``
    pids) and the trees of ``roots`` (the warm process's children), and the largest single RSS.

    RSS counts a page shared by several processes (libraries, and what forked batch processes share
    with the process they were forked from) once per process; PSS (``/proc/PID/smaps_rollup``)
    splits it between them, so the PSS sum is what the tree holds of the machine's memory.
    ``cpu``: filled with each ``roots`` descendant's own user+system CPU seconds so far.
    """
    kids = _processes()
    rss = pss = largest = 0
    todo = [(p, False) for p in kids.get(os.getpid(), []) if p not in skip] + [(p, True) for p in roots]
    while todo:
        pid, warm = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                one = int(f.read().split()[1]) * PAGE
            rss, largest = rss + one, max(largest, one)
            pss += _pss(pid)
            if warm and cpu is not None:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu[pid] = (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            pass
        todo.extend((k, warm) for k in kids.get(pid, []))
    return rss, pss, largest


def newest_mtime(root: str) -> tuple[float, int, int]:
    """(the newest mtime of anything under root, root included; regular files; their bytes)."""
    newest, files, size = os.lstat(root).st_mtime, 0, 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                newest = max(newest, st.st_mtime)
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files, size = files + 1, size + st.st_size
    return newest, files, size


class Cluster:
    """A Dask cluster started the way a user starts one: ``dask scheduler`` and ``dask worker`` processes.

    Each process has its own working directory and TMPDIR under ``root``; the
    workers get the command's environment (PREFECT_API_URL, PYTHONPATH of
    ``--code``), one thread each. Started before the commands and untimed,
    as a cluster someone keeps running.
    """

    def __init__(self, root: Path, dask: str, workers: int, env: dict[str, str]) -> None:
        from bench.run import free_port
        self.root, self.procs = root, []
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self._start("scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard", "--no-show"], env)
        self._wait_port(port)
        for i in range(workers):
            self._start(f"worker-{i}", [dask, "worker", self.address, "--nthreads", "1", "--nworkers", "1",
                                        "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"], env)
        self._wait_workers(workers)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        import subprocess
        home = self.root / name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        log_f = open(home / "log", "wb")    # noqa: SIM115 - stays open for the process's life
        self.procs.append(subprocess.Popen(cmd, cwd=home, env=dict(env, TMPDIR=str(home / "tmp")),
                                           stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True))

    def _wait_port(self, port: int) -> None:
        import socket
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"dask scheduler did not listen on {port}: see {self.root / 'scheduler' / 'log'}")

    def _wait_workers(self, n: int) -> None:
        from distributed import Client
        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(n, timeout=120)

    def pids(self) -> list[int]:
        """The cluster's processes and their children (a nanny's worker)."""
        found = [p.pid for p in self.procs]
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        todo = list(found)
        while todo:
            for k in kids.get(todo.pop(), []):
                found.append(k)
                todo.append(k)
        return found

    def cpu(self) -> float:
        from bench.run import tree_cpu
        return sum(tree_cpu(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck process is killed below
                os.killpg(p.pid, signal.SIGKILL)


def ran_on(out_file: Path) -> dict[str, int] | None:
    """``ran_on`` of a backup's ``--json`` summary (host:pid -> batches), if it has one."""
    import json
    try:
        text = out_file.read_text()
        return json.loads(text[text.index("{"):]).get("ran_on")
    except (OSError, ValueError, AttributeError):
        return None


class Scale(Bench):
    def __init__(self, args):
        args.settle = 0.25
        super().__init__(args)
        self.tools = [t for t in args.tools.split(",") if t]
        self.kf_env["KEEPFLOW_PASSWORD"] = RESTIC_PASSWORD
        self.code = str(Path(args.code).resolve()) if args.code else None
        if self.code:
            self.kf_env["PYTHONPATH"] = self.code
        self.python = str(Path(self.kf).parent / "python")
        self.load: dict[tuple[str, str], tuple[str, str]] = {}
        self.tree_peak: dict[tuple[str, str], float] = {}     # (scenario, tool) -> MiB of RSS summed
        self.tree_pss: dict[tuple[str, str], float] = {}      # (scenario, tool) -> MiB of PSS summed
        self.settles: list[str] = []
        self.restore_tools = [t for t in (args.restore_tools or args.tools).split(",") if t]
        self.cluster: Cluster | None = None
        self.cluster_cpu: dict[tuple[str, str], float] = {}   # (scenario, tool) -> CPU-s of the dask workers
        self.ran_on: dict[tuple[str, str], dict[str, int]] = {}
        self.warm_env = dict(self.kf_env, PREFECT_HOME=str(self.work / "prefect-home-warm"))
        self.warm_pid: int | None = None
        self.warm_cpu: dict[tuple[str, str], float] = {}      # (scenario, tool) -> CPU-s in the warm process

    # ------------------------------------------------------------------ commands
    def keepflow(self, *args: str) -> list[str]:
        if self.code:
            flows = Path(self.code) / "keepflow" / "flows"     # cli.py, a package since the namespace's CLI split
            module = "keepflow.flows.cli" if (flows / "cli.py").exists() or (flows / "cli").is_dir() \
                else "flows.cli"
            return [self.python, "-m", module, *args]
        return [self.kf, *args]

    def repo(self, tree: str, tool: str, r: int) -> Path:
        return self.work / tool / "repo"

    def restore_dir(self, tree: str, tool: str, r: int) -> Path:
        return self.work / "restore" / tool

    def command(self, tree, tool: str, scenario: str, r: int):
        if not is_keepflow(tool):
            return super().command(tree, tool, scenario, r)
        repo = self.repo(tree.kind, tool, r)
        n = workers_of(tool)
        extra = ["--workers", str(n)] if n else []
        if dask_workers_of(tool):
            extra = ["--dask", self.cluster.address]
        if scenario == "restore":
            return self.keepflow("restore", str(repo), str(self.restore_dir(tree.kind, tool, r)), "--json",
                                 *extra), str(self.work), self.env_of(tool)
        return self.keepflow("backup", str(tree.src), str(repo), "--json", *extra), str(self.work), self.env_of(tool)

    def env_of(self, tool: str) -> dict[str, str]:
        return self.warm_env if tool == WARM else self.kf_env

    def start_warm(self) -> str:
        """``keepflow server start`` with the bench's PREFECT_API_URL: only the warm process for it."""
        self.warm_env["PREFECT_API_URL"] = self.kf_env["PREFECT_API_URL"]
        Path(self.warm_env["PREFECT_HOME"]).mkdir(exist_ok=True)
        p = subprocess.run(self.keepflow("server", "start", "--json"), env=self.warm_env, capture_output=True,
                           text=True, timeout=300)
        state = Path(self.warm_env["PREFECT_HOME"]) / "keepflow" / "warm.json"
        if p.returncode or not state.exists() or not json.loads(p.stdout).get("warm_process"):
            return f"`keepflow server start` gave no warm process (rc={p.returncode}): {p.stderr[-400:]}"
        self.warm_pid = int(json.loads(state.read_text())["pid"])
        log(f"warm process {self.warm_pid} for {self.warm_env['PREFECT_API_URL']}")
        return ""

    def stop_warm(self) -> None:
        if self.warm_pid:
            subprocess.run(self.keepflow("server", "stop"), env=self.warm_env, capture_output=True, timeout=120)
            self.warm_pid = None

    def prepare(self, tree: str, tool: str, r: int) -> str:
        if not is_keepflow(tool):
            return super().prepare(tree, tool, r)
        repo = self.repo(tree, tool, r)
        repo.parent.mkdir(parents=True, exist_ok=True)
        run = self.timed(Run(tree, "init", tool, 1), self.keepflow("init", str(repo), "--format",
                                                                  str(self.a.format), "--json"),
                         cwd=str(self.work), env=self.env_of(tool))
        return "" if run.ok else f"keepflow init failed (rc={run.rc}): {run.err_tail}"

    def timed(self, run: Run, cmd: list[str], *, cwd=None, env=None) -> Run:
        """Bench.timed, with the peak RSS of the command's whole process tree sampled alongside."""
        peak = [0, 0, 0]
        done = threading.Event()
        skip = {self.server.pid} if self.server else set()
        warm_cpu: dict[int, float] = {}
        warm = run.tool == WARM and self.warm_pid is not None
        cluster = self.cluster
        if cluster and not dask_workers_of(run.tool):
            skip |= set(cluster.pids())

        def sample():
            while not done.wait(SAMPLE_EVERY):
                # The warm tool: the warm process's children (the command's forked child and what it
                # starts) and the warm process itself, counted in full as if it were the command's.
                roots = ([self.warm_pid, *_processes().get(self.warm_pid, [])] if warm else [])
                rss, pss, largest = _tree_memory(skip, roots[1:], warm_cpu)
                if warm:
                    with contextlib.suppress(OSError, ValueError):
                        pss += _pss(self.warm_pid)
                peak[0], peak[1], peak[2] = max(peak[0], rss), max(peak[1], pss), max(peak[2], largest)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        cpu0 = cluster.cpu() if cluster else 0.0
        try:
            return super().timed(run, cmd, cwd=cwd, env=env)
        finally:
            done.set()
            t.join()
            self.tree_peak[(run.scenario, run.tool)] = peak[0] / 2**20
            self.tree_pss[(run.scenario, run.tool)] = peak[1] / 2**20
            if warm:            # the work ran in the warm process's child: its CPU and its RSS are the command's
                used = sum(warm_cpu.values())
                self.warm_cpu[(run.scenario, run.tool)] = used
                run.other_cpu = max(0.0, run.other_cpu - used)
                run.maxrss_mib = max(run.maxrss_mib, peak[2] / 2**20)
            if cluster:     # the workers' CPU is the command's work for a dask tool, nobody's otherwise
                used = max(0.0, cluster.cpu() - cpu0)
                run.other_cpu = max(0.0, run.other_cpu - used)
                if dask_workers_of(run.tool):
                    self.cluster_cpu[(run.scenario, run.tool)] = used

    # ------------------------------------------------------------------ scenarios
    def scenario(self, tree, scenario: str, failed: set) -> None:
        for tool in self.tools:
            run = Run(tree.kind, scenario, tool, 1)
            if scenario == "restore" and tool not in self.restore_tools:
                run.note = "not run (--restore-tools)"
                self.runs.append(run)
                continue
            if tool in failed:
                run.note = "skipped: an earlier step on this repository failed"
                self.runs.append(run)
                continue
            argv, cwd, env = self.command(tree, tool, scenario, 0)
            if not self.a.no_warm:
                warm(self.repo(tree.kind, tool, 0) if scenario == "restore" else tree.src)
            os.sync()
            before = Path("/proc/loadavg").read_text().split()[0]
            self.timed(run, argv, cwd=cwd, env=env)
            self.load[(scenario, tool)] = (before, Path("/proc/loadavg").read_text().split()[0])
            self.runs.append(run)
            if dask_workers_of(tool) and run.ok and scenario != "restore":
                got = ran_on(self.logs / f"{run.tree}-{run.scenario}-{run.tool}-r{run.repeat}.out")
                if got:
                    self.ran_on[(scenario, tool)] = got
                    log(f"  batches ran on: {got}")
            state = f"{run.seconds:.1f} s" if run.ok else f"FAILED rc={run.rc} {run.note}"
            log(f"{scenario:8s} {tool:12s} {state}  (user {run.user:.1f} s, sys {run.sys:.1f} s, "
                f"max RSS {run.maxrss_mib:.0f} MiB, tree {self.tree_peak[(scenario, tool)]:.0f} MiB "
                f"(PSS {self.tree_pss[(scenario, tool)]:.0f}), "
                f"load {self.load[(scenario, tool)][0]}-{self.load[(scenario, tool)][1]}, "
                f"others {run.other_cpu:.1f} CPU-s)")
            if not run.ok:
                failed.add(tool)
                if run.err_tail:
                    log("  " + run.err_tail[-600:].replace("\n", "\n  "))
            if scenario == "restore":
                self.verify_one(tree, tool)

    def verify_one(self, tree, tool: str) -> None:
        """Check one tool's restore against the source, then delete it (inode budget) and settle."""
        if not hasattr(self, "expected"):
            self.expected = gentree.list_files(str(tree.src))
            self.sample = random.Random(1).sample(self.expected, min(SAMPLED_CONTENTS, len(self.expected)))
        dest = self.restore_dir(tree.kind, tool, 0)
        if not dest.exists():
            tree.verify[tool] = "not restored"
        else:
            got = gentree.list_files(str(dest))
            if got != self.expected:
                tree.verify[tool] = (f"FAIL: {len(got):,} files vs {len(self.expected):,} expected "
                                     "(or sizes differ)")
            else:
                bad = [rel for rel, _ in self.sample if not same_bytes(tree.src / rel, dest / rel)]
                tree.verify[tool] = (f"OK (names and sizes of all {len(got):,} files, contents of "
                                     f"{len(self.sample):,})" if not bad
                                     else f"FAIL: {len(bad)} sampled files differ, e.g. {bad[:3]}")
            del got
            log(f"restore check {tool}: {tree.verify[tool]}")
            if not self.a.keep and tool != self.restore_tools[-1]:      # the last goes with the work folder
                t0 = time.perf_counter()
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                probes = []
                for i in range(36):          # wait (<= 3 min) until file creation is fast again
                    probes.append(settle_probe(self.work / "settle" / f"{tool}-{i}"))
                    if len(probes) >= 2 and max(probes[-2:]) <= self.a.settle:
                        break
                    time.sleep(5)
                self.settles.append(f"after {tool}'s restore: deleted in {time.perf_counter() - t0:.0f} s "
                                    f"incl. settling, probes {', '.join(f'{p:.2f}' for p in probes)} s")
                log(self.settles[-1])

    def main(self) -> int:
        from bench.run import Tree
        self.load_start = Path("/proc/loadavg").read_text().strip()
        try:
            if any(is_keepflow(t) for t in self.tools):
                self.start_server()
                if self.server_error:
                    log(f"Prefect server did not start: {self.server_error}")
                    return 1
            if WARM in self.tools:
                err = self.start_warm()
                if err:
                    log(err)
                    return 1
            n_dask = max((dask_workers_of(t) or 0 for t in self.tools), default=0)
            if n_dask:
                dask = str(Path(self.python).parent / "dask")
                log(f"starting a Dask cluster: dask scheduler + {n_dask} dask worker processes")
                self.cluster = Cluster(self.work / "dask", dask, n_dask, self.kf_env)
                log(f"Dask cluster at {self.cluster.address}")
            if self.a.src:
                tree = Tree("scale", Path(self.a.src).resolve())
                _, n, size = newest_mtime(str(tree.src))
                tree.gen = gentree.TreeStats("scale", str(tree.src), gentree.DEFAULT_SEED, n, 0, size, 0.0)
            else:
                tree = Tree("scale", self.work / "src")
                log(f"generating {self.a.files:,} files ({self.a.sizes} bytes) in {tree.src}")
                lo, hi = (int(x) for x in self.a.sizes.split(":"))
                tree.gen = gentree.generate("small", str(tree.src), n_files=self.a.files, small_sizes=(lo, hi))
                log(f"generated in {tree.gen.seconds:.0f} s")
            self.trees["scale"] = tree
            wait = newest_mtime(str(tree.src))[0] + 3 - time.time()    # out of the 2 s racy window
            log(f"waiting {max(0.0, wait):.1f} s for the racy window")
            time.sleep(max(0.0, wait))
            failed: set = set()
            for tool in self.tools:
                err = self.prepare("scale", tool, 0)
                if err:
                    failed.add(tool)
                    self.runs.append(Run("scale", "first", tool, 1, note=err))
            self.scenario(tree, "first", failed)
            self.scenario(tree, "nochange", failed)
            tree.change = gentree.apply_change(str(tree.src))
            log(f"applied the change: {tree.change.modified:,} modified, {tree.change.added:,} added, "
                f"{tree.change.deleted:,} deleted")
            time.sleep(max(0.0, newest_mtime(str(tree.src))[0] + 3 - time.time()))
            self.scenario(tree, "changed", failed)
            self.scenario(tree, "restore", failed)
        except KeyboardInterrupt:
            self.notes.append("Interrupted: the results below are incomplete.")
        finally:
            if self.cluster:
                self.cluster.stop()
            self.stop_warm()
            self.stop_server()
        out = Path(self.a.out)
        write_section(out, f"scale-{self.a.label}", self.section())
        log(f"wrote section scale-{self.a.label} of {out}")
        if not self.a.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0

    # ------------------------------------------------------------------ report
    def section(self) -> str:
        tree = self.trees.get("scale")
        res = {(x.scenario, x.tool): x for x in self.runs if x.scenario in SCENARIOS}
        files = tree.gen.files if tree and tree.gen else self.a.files
        info = machine(self)
        rss_target = RSS_TARGET_MIB if files <= 1_500_000 else RSS_TARGET_5M_MIB
        cmd = (f"python -m bench.scale --files {self.a.files} --sizes {self.a.sizes} --format {self.a.format} "
               f"--tools {self.a.tools} --label {self.a.label}"
               + (f" --restore-tools {self.a.restore_tools}" if self.a.restore_tools else "")
               + (" --no-warm" if self.a.no_warm else "")
               + (f" --src {self.a.src}" if self.a.src else "") + (f" --code {self.a.code}" if self.a.code else ""))
        L = [f"### Scale: {files:,} small files, keepflow format {self.a.format} ({self.a.label})", "",
             f"`{cmd}`, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; keepflow source: "
             + (f"`{self.a.code}`" if self.a.code else info.get("keepflow source", "?")) + ".", ""]
        L += [f"**{n}**" for n in self.notes]
        L += ["| scenario | tool | wall | CPU (user+sys) | peak RSS: largest process | peak RSS: process tree "
              "| peak PSS: process tree | x restic wall | load (1 min) before-after | others' CPU | target |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
        for sc in SCENARIOS:
            r = res.get((sc, "restic"))
            for tool in self.tools:
                x = res.get((sc, tool))
                if x is None or (x.rc is None and x.note.startswith("not run")):
                    cells = [x.note if x is not None else "not run", "", "", "", ""]
                elif not x.ok:
                    cells = [f"FAILED ({x.rc}) {x.note}", "", "", "", ""]
                else:
                    cpu = x.user + x.sys + self.cluster_cpu.get((sc, tool), 0.0) + self.warm_cpu.get((sc, tool), 0.0)
                    cells = [f"{x.seconds:.1f} s", f"{cpu:.1f} s", f"{x.maxrss_mib:.0f} MiB",
                             f"{self.tree_peak.get((sc, tool), 0):.0f} MiB",
                             f"{self.tree_pss.get((sc, tool), 0):.0f} MiB"]
                ok = x is not None and x.ok
                ratio = f"{x.seconds / r.seconds:.2f}x" if ok and r and r.ok and tool != "restic" else ""
                target = []
                if is_keepflow(tool) and ok:
                    if sc in TARGETS and ratio and files <= 1_500_000:
                        target.append(f"time <= {TARGETS[sc]}x: "
                                      + ("PASS" if x.seconds <= TARGETS[sc] * r.seconds else "FAIL"))
                    if sc != "restore" or files > 1_500_000:
                        # The whole command: its largest process, or its process tree's PSS when that is
                        # larger (batch processes, --workers), splitting the pages its processes share.
                        whole = max(x.maxrss_mib, self.tree_pss.get((sc, tool), 0))
                        target.append(f"memory <= {rss_target} MiB: "
                                      + ("PASS" if whole <= rss_target else "FAIL"))
                load = self.load.get((sc, tool))
                L.append(f"| {TITLES[sc]} | {tool} | " + " | ".join(cells) + f" | {ratio} | "
                         + (f"{load[0]}-{load[1]}" if load else "") + " | "
                         + (f"{x.other_cpu:.0f} CPU-s" if ok else "") + " | " + "; ".join(target) + " |")
        L += [""]
        if tree:
            g = tree.gen
            L += [f"- Tree: `bench.gentree small` with {g.files:,} files of {self.a.sizes} bytes "
                  f"({g.bytes / 2**30:.2f} GiB of content)"
                  + (f", generated in {g.seconds:.0f} s" if g.seconds else "") + "; "
                  + (f"1% change: {tree.change.modified:,} modified, {tree.change.added:,} added, "
                     f"{tree.change.deleted:,} deleted. " if tree.change else "")
                  + "Restore check: " + "; ".join(f"{t}: {v}" for t, v in tree.verify.items()) + "."]
        for (sc, tool), where in self.ran_on.items():
            L += [f"- {TITLES[sc]}, {tool}: batches per worker process (`ran_on` of the summary): "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(where.items()))
                  + (f"; the workers used {self.cluster_cpu[(sc, tool)]:.1f} CPU-s (in the CPU column)"
                     if (sc, tool) in self.cluster_cpu else "") + "."]
        if self.a.no_warm:
            L += ["- **Cache not warmed** (`--no-warm`): the tree does not fit in the page cache, so each command "
                  "found it as the step before left it; the first backup read most files from disk."]
        if WARM in self.tools:
            L += [f"- `{WARM}`: the same commands after `keepflow server start` with the bench's PREFECT_API_URL "
                  "(which starts only the warm process for that API, flows/cli/warm.py), so each runs in a child "
                  "forked from a process that has Prefect and the flows imported. Its CPU is the command's "
                  "rusage plus the warm process's descendants' own CPU, sampled every "
                  f"{SAMPLE_EVERY} s (a process that exits between samples loses at most that much); its "
                  "\"largest process\" is the largest RSS sampled; its PSS adds the warm process's own PSS "
                  "(counted in full, as if it were the command's)."]
        L += ["- Tools: `keepflow` is the command in a process of its own (batches in forked batch processes "
              "when there are two or more: tasks/core/batch_processes.py); `keepflow-wN` adds `--workers N` "
              "(a local Dask cluster of N single-threaded worker processes for the batches; its RSS target is "
              "judged on the process-tree figure); restic 0.14 repository version 2 (encrypted, compression "
              "\"auto\"), keepflow format 2 (encrypted, zstd \"auto\", chunked). Each tool has its own repository.",
              "- Peak RSS: \"largest process\" is `ru_maxrss` of the waited-for command (the largest process of "
              "its tree); \"process tree\" is the highest sum of RSS over the command and its descendants, "
              f"sampled every {SAMPLE_EVERY} s (counts shared pages once per process); \"peak PSS\" the highest sum "
              "of PSS over the same tree (`/proc/PID/smaps_rollup`: a page shared by n processes counts 1/n "
              "in each, so the sum is the tree's share of the machine's memory). The memory target is judged "
              "on the larger of the largest process and the tree's PSS. keepflow's Prefect server is a "
              "separate process, not counted. The CPU column is the command's `rusage` (itself and the "
              "descendants it waited for): keepflow's batch processes are reaped by their fork server, so "
              "their CPU is in \"others' CPU\".",
              "- Cache: " + ("not warmed, `sync` before every command" if self.a.no_warm else
                             "warm (input read once and `sync` before every command, untimed)")
              + ". `keepflow init` and "
              "`restic init` untimed. Each restore is checked and deleted before the next tool's restore, "
              "then the run waits until creating files is fast again"
              + (" (" + "; ".join(self.settles) + ")" if self.settles else "") + ".",
              f"- Load average at start: {getattr(self, 'load_start', '?')}.",
              f"- Machine: {info['CPU']}, {info['memory']}; {info['work folder filesystem']}; kernel "
              f"{info['kernel']}; {info['keepflow / prefect']}; restic: {info['restic']}.", ""]
        return "\n".join(L)


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name -->`` markers in ``path``, replacing an older one."""
    text = path.read_text() if path.exists() else ""
    block = f"<!-- {name} -->\n{body}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    found = pattern.search(text)
    text = pattern.sub(lambda _: block, text) if found else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--format", type=int, choices=[1, 2], default=2, help="keepflow repository format")
    p.add_argument("--code", help="run keepflow from this source checkout (PYTHONPATH)")
    p.add_argument("--label", default="1m", help="names the RESULTS.md section (scale-LABEL)")
    p.add_argument("--src", help="an existing gentree small tree to use (the 1%% change is applied to it)")
    p.add_argument("--sizes", default="1024:7168", help="MIN:MAX file sizes of the generated tree (bytes)")
    p.add_argument("--tools", default="keepflow,keepflow-w1,keepflow-w2,restic",
                   help="keepflow (default thread pool), keepflow-wN (--workers N), keepflow-daskN (--dask: a "
                        "cluster of N dask worker processes started beforehand), restic")
    p.add_argument("--restore-tools", help="the tools whose full restore is run (default: every tool); "
                   "at 5M files each restore costs its time plus a delete of 5M files")
    p.add_argument("--no-warm", action="store_true",
                   help="do not read the input before each command (a 5M-file tree does not fit in the page "
                        "cache here: reading it took ~19 min at ~4,400 files/s): the cache is as the last step left it")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--workdir", default="/work/bench-tmp")
    p.add_argument("--keepflow", help="keepflow executable (default .venv/bin/keepflow)")
    p.add_argument("--timeout", type=float, default=5400, help="per command, seconds")
    p.add_argument("--keep", action="store_true", help="keep the work folder (and every restore)")
    a = p.parse_args(argv)
    bad = [t for t in a.tools.split(",") if t and t != "restic" and not is_keepflow(t)]
    if bad:
        p.error(f"unknown tools {bad}: keepflow, keepflow-wN, keepflow-daskN, restic")
    if "restic" in a.tools.split(",") and not shutil.which("restic"):
        p.error("restic not found: apt-get install -y restic")

    def stop(signum, frame):
        raise KeyboardInterrupt
    # when started in the background (SIGINT ignored), kill -TERM still writes the partial results
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return Scale(a).main()


if __name__ == "__main__":
    sys.exit(main())
