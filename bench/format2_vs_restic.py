"""Repository format 2 against restic: the same work (encrypt + compress) on the same trees.

    python -m bench.format2_vs_restic [--repeats 3] [--only small,large,text] [--out bench/RESULTS.md]
                                      [--workdir /work/bench-tmp] [--keep]

Issue 9's targets, each measured in one run with both tools on the same tree
state (bench/README.md has the hygiene this follows):

- small (``bench.gentree small``, 100,000 files of ~4 KiB): first backup,
  no-change backup and full restore, keepflow at most 1.0x restic (aim 0.75x).
  The tree is made older than the 2 s racy-timestamp window before the first
  backup (the run waits until the newest file is 3 s old), so the no-change
  backup reads nothing.
- large (``bench.gentree large``, 20 x 100 MiB): first backup at most 0.6x
  restic, no-change at most 2x; then ``bench.gentree change`` (1 MiB rewritten
  inside one 100 MiB file) and a backup with both tools: the repository bytes
  each adds (keepflow within 1.5x restic's); then a full restore (repeat 1
  only, informational).
- text (``text_tree`` below: this venv's site-packages ``*.py`` files and
  generated logs): the stored size of one backup, keepflow at most 1.1x
  restic's (whole repository, and packs/data alone).

Each repeat has its own repositories: ``keepflow init REPO`` and ``restic
init`` run untimed before the first backup, with ``KEEPFLOW_PASSWORD`` /
``RESTIC_PASSWORD`` in the environment. keepflow runs against one Prefect
server started first (bench.run.Bench: its start-up is not timed). Caches
are warm: before each timed command its input is read once and ``sync`` runs
(untimed). Tool order alternates between repeats. The results go into the
``<!-- format2-vs-restic-LABEL -->`` section of ``--out`` (``--label``, by
default the run's UTC date and time, so a run never replaces an earlier one
or text written around it; give a label again to replace that run's
section); the rest of the file is left as it is (it is re-read just before
writing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import gentree
from bench.run import Bench, Run, machine, same_bytes, warm

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
PASSWORD = "keepflow-bench"
SECTION = "format2-vs-restic"
TOOLS = ("keepflow", "restic")
RACY_WAIT = 3.0          # the racy-timestamp window is 2 s (tasks/core/diff.py)
# (tree, scenario) -> allowed keepflow/restic ratio (issue 9)
TARGETS = {("small", "first"): 1.0, ("small", "nochange"): 1.0, ("small", "restore"): 1.0,
           ("large", "first"): 0.6, ("large", "nochange"): 2.0}
AIMS = {("small", "first"): 0.75, ("small", "nochange"): 0.75, ("small", "restore"): 0.75}
LOG_SEED = 20261202


def log(msg: str) -> None:
    print(f"[f2-vs-restic {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def repo_bytes(path: Path) -> tuple[int, int]:
    """(all bytes under path, bytes of data packs: keepflow packs/, restic data/)."""
    total = data = 0
    for folder, _, files in os.walk(path):
        rel = os.path.relpath(folder, path).split(os.sep)[0]
        for name in files:
            n = os.lstat(os.path.join(folder, name)).st_size
            total += n
            if rel in ("packs", "data"):
                data += n
    return total, data


# -- the text tree ----------------------------------------------------------------------------

_LEVELS = ["INFO"] * 14 + ["DEBUG"] * 4 + ["WARNING"] * 2 + ["ERROR"]
_PATHS = ["/api/v1/items", "/api/v1/users", "/api/v1/orders", "/healthz", "/api/v2/search", "/static/app.js",
          "/api/v1/items/{n}", "/api/v1/users/{n}/settings", "/login", "/api/v1/reports/{n}/export"]
_MSGS = ["request finished", "cache miss", "retrying upstream call", "slow query", "user logged in",
         "token refreshed", "connection reset by peer", "scheduled job started", "scheduled job finished",
         "payload validated"]
_USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory"]


def log_lines(rng: random.Random, n: int, start: float) -> str:
    """``n`` lines of a web service's log, from ``rng.random()`` only (stable across Python versions)."""
    out = []
    t = start
    pick = gentree._randint
    for _ in range(n):
        t += rng.random() * 0.05
        stamp = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        path = _PATHS[pick(rng, len(_PATHS))].replace("{n}", str(pick(rng, 100000)))
        out.append(f"{stamp}Z {_LEVELS[pick(rng, len(_LEVELS))]:7s} [worker-{pick(rng, 8)}] "
                   f"{_MSGS[pick(rng, len(_MSGS))]} method=GET path={path} "
                   f"status={[200, 200, 200, 201, 204, 304, 404, 500][pick(rng, 8)]} "
                   f"duration_ms={rng.random() * 250:.1f} user={_USERS[pick(rng, len(_USERS))]} "
                   f"request_id={pick(rng, 2**32):08x}{pick(rng, 2**32):08x}\n")
    return "".join(out)


def text_tree(root: Path, site_packages: Path) -> dict:
    """The text-heavy tree: ``py/`` = every ``*.py`` under site_packages (copied, sorted), ``logs/`` =
    40 generated logs (10 of ~6 MiB: chunked, 30 of ~100 KiB), seed LOG_SEED."""
    t0 = time.perf_counter()
    root.mkdir(parents=True)
    n_py = py_bytes = 0
    for src in sorted(site_packages.rglob("*.py")):
        if not src.is_file() or src.is_symlink():
            continue
        dest = root / "py" / src.relative_to(site_packages)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        n_py += 1
        py_bytes += dest.stat().st_size
    (root / "logs").mkdir()
    rng = random.Random(LOG_SEED)
    log_bytes = 0
    for i in range(40):
        lines = 40_000 if i < 10 else 650
        data = log_lines(rng, lines, 1_790_000_000 + i * 86400).encode()
        (root / "logs" / f"service-{i:02d}.log").write_bytes(data)
        log_bytes += len(data)
    return {"py_files": n_py, "py_bytes": py_bytes, "log_files": 40, "log_bytes": log_bytes,
            "seconds": time.perf_counter() - t0, "site_packages": str(site_packages)}


def newest_mtime(root: Path) -> float:
    newest = 0.0
    for folder, _, files in os.walk(root):
        for name in files:
            newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


# -- the run ----------------------------------------------------------------------------------

class VsRestic:
    def __init__(self, a):
        self.a = a
        self.section = f"{SECTION}-{a.label}"
        ns = argparse.Namespace(workdir=a.workdir, tools="keepflow,restic", keepflow=a.keepflow,
                                timeout=a.timeout, settle=a.settle)
        self.b = Bench(ns)
        self.work = self.b.work
        self.kf = self.b.kf
        # --before: another keepflow (e.g. a copy of the tree before a change) run alongside, as "before"
        self.exe = {"keepflow": self.kf, "before": a.before}
        self.tools = ["keepflow", "restic"] + (["before"] if a.before else [])
        self.kf_env = self.b.kf_env
        self.kf_env["KEEPFLOW_PASSWORD"] = PASSWORD
        self.restic_env = dict(os.environ, RESTIC_PASSWORD=PASSWORD)
        self.restic_cache = self.work / "restic-cache"
        self.runs: list[Run] = []
        self.sizes: dict[tuple[str, str, int, str], tuple[int, int]] = {}   # (tree, tool, repeat, when)
        self.trees: dict[str, dict] = {}
        self.notes: list[str] = []
        self.loads: list[str] = []
        self.t0 = time.perf_counter()

    def repo(self, tree: str, tool: str, r: int) -> Path:
        return self.work / tree / tool / f"repo-r{r}"

    def init(self, tree: str, tool: str, r: int) -> None:
        repo = self.repo(tree, tool, r)
        repo.parent.mkdir(parents=True, exist_ok=True)
        if tool == "restic":
            cmd = ["restic", "-r", str(repo), "--cache-dir", str(self.restic_cache), "init", "-q"]
            env = self.restic_env
        else:
            cmd = [self.exe[tool], "init", str(repo)]
            env = self.kf_env
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr[-800:]}")

    def command(self, tree: str, tool: str, scenario: str, r: int, src: Path):
        repo = self.repo(tree, tool, r)
        target = self.work / tree / "restore" / f"{tool}-r{r}"
        if tool != "restic":
            if scenario == "restore":
                return [self.exe[tool], "restore", str(repo), str(target), "--json"], None, self.kf_env
            return [self.exe[tool], "backup", str(src), str(repo), "--json"], None, self.kf_env
        base = ["restic", "-r", str(repo), "--cache-dir", str(self.restic_cache)]
        if scenario == "restore":
            return base + ["restore", "latest", "--target", str(target)], None, self.restic_env
        return base + ["backup", ".", "--quiet"], str(src), self.restic_env

    def phase(self, tree: str, scenario: str, src: Path, repeats: int) -> None:
        for r in range(1, repeats + 1):
            k = (r - 1) % len(self.tools)
            order = self.tools[k:] + self.tools[:k]       # rotate: each tool goes first in turn
            for tool in order:
                run = Run(tree, scenario, tool, r)
                if any(x.tree == tree and x.tool == tool and x.repeat == r and not x.ok for x in self.runs):
                    run.note = "skipped: an earlier step on this repository failed"
                    self.runs.append(run)
                    continue
                argv, cwd, env = self.command(tree, tool, scenario, r, src)
                warm(self.repo(tree, tool, r) if scenario == "restore" else src)
                os.sync()
                self.loads.append(Path("/proc/loadavg").read_text().split()[0])
                self.b.timed(run, argv, cwd=cwd, env=env)
                self.runs.append(run)
                if scenario != "restore":
                    self.sizes[(tree, tool, r, scenario)] = repo_bytes(self.repo(tree, tool, r))
                state = f"{run.seconds:.2f} s" if run.ok else f"FAILED rc={run.rc} {run.note} {run.err_tail[-400:]}"
                log(f"{tree:5s} {scenario:8s} r{r} {tool:8s} {state} (user {run.user:.1f} s, sys {run.sys:.1f} s, "
                    f"rss {run.maxrss_mib:.0f} MiB, other CPU {run.other_cpu:.1f} s, load {self.loads[-1]})")

    def check_restore(self, tree: str, src: Path, repeats: int, contents: bool) -> None:
        expected = gentree.list_files(str(src))
        for run in [x for x in self.runs if x.tree == tree and x.scenario == "restore" and x.ok]:
            dest = self.work / tree / "restore" / f"{run.tool}-r{run.repeat}"
            got = gentree.list_files(str(dest))
            if got != expected:
                run.note = f"restore incorrect: {len(got)} files, {len(expected)} expected"
            elif contents and run.repeat == 1:
                bad = [rel for rel, _ in expected if not same_bytes(src / rel, dest / rel)]
                if bad:
                    run.note = f"restore incorrect: {len(bad)} files differ"
            run.ok = run.ok and not run.note

    def wait_racy(self, src: Path) -> None:
        age = time.time() - newest_mtime(src)
        if age < RACY_WAIT:
            time.sleep(RACY_WAIT - age)

    def small(self) -> None:
        src = self.work / "small" / "src"
        st = gentree.generate("small", str(src))
        self.trees["small"] = {"files": st.files, "bytes": st.bytes, "seconds": st.seconds}
        log(f"small: {st.files} files, {st.bytes / 2**20:.0f} MiB in {st.seconds:.1f} s")
        for r in range(1, self.a.repeats + 1):
            for tool in self.tools:
                self.init("small", tool, r)
        self.wait_racy(src)
        self.phase("small", "first", src, self.a.repeats)
        self.phase("small", "nochange", src, self.a.repeats)
        self.phase("small", "restore", src, self.a.repeats)
        self.check_restore("small", src, self.a.repeats, contents=True)

    def large(self) -> None:
        src = self.work / "large" / "src"
        st = gentree.generate("large", str(src))
        self.trees["large"] = {"files": st.files, "bytes": st.bytes, "seconds": st.seconds}
        log(f"large: {st.files} files, {st.bytes / 2**20:.0f} MiB in {st.seconds:.1f} s")
        for r in range(1, self.a.repeats + 1):
            for tool in self.tools:
                self.init("large", tool, r)
        self.wait_racy(src)
        self.phase("large", "first", src, self.a.repeats)
        self.phase("large", "nochange", src, self.a.repeats)
        ch = gentree.apply_change(str(src))
        self.trees["large"]["change"] = (f"{ch.modified} file modified in place ({ch.bytes_written / 2**20:.0f} MiB "
                                         f"rewritten: {', '.join(ch.sample_modified)}), {ch.added} added, "
                                         f"{ch.deleted} deleted")
        self.wait_racy(src)
        self.phase("large", "changed", src, self.a.repeats)
        self.phase("large", "restore", src, 1)
        self.check_restore("large", src, 1, contents=True)

    def text(self) -> None:
        src = self.work / "text" / "src"
        site = Path(self.a.site_packages or next((PROJECT / ".venv/lib").glob("python*/site-packages")))
        self.trees["text"] = text_tree(src, site)
        info = self.trees["text"]
        log(f"text: {info['py_files']} .py files ({info['py_bytes'] / 2**20:.0f} MiB), "
            f"{info['log_files']} logs ({info['log_bytes'] / 2**20:.0f} MiB)")
        for tool in self.tools:
            self.init("text", tool, 1)
        self.wait_racy(src)
        self.phase("text", "first", src, 1)

    def main(self) -> int:
        only = [x for x in self.a.only.split(",") if x]
        self.load_start = Path("/proc/loadavg").read_text().strip()
        try:
            self.b.settle()
            if self.a.server == "keepflow":
                self.b.start_keepflow_server()
            else:
                self.b.start_server()
            if self.b.server_error:
                raise SystemExit(f"Prefect server did not start: {self.b.server_error}")
            for kind in only:
                getattr(self, kind)()
        except KeyboardInterrupt:
            self.notes.append("Interrupted: the results below are incomplete.")
        finally:
            self.b.stop_server()
        self.load_end = Path("/proc/loadavg").read_text().strip()
        text = self.report()
        out = Path(self.a.out)
        write_section(out, text, self.section)
        log(f"wrote the {self.section} section of {out} after {(time.perf_counter() - self.t0) / 60:.1f} min")
        if self.a.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0

    # -- report ---------------------------------------------------------------------------------
    def times(self, tree, scenario, tool):
        xs = [x for x in self.runs if (x.tree, x.scenario, x.tool) == (tree, scenario, tool)]
        ok = [x for x in xs if x.ok]
        if not xs or len(ok) < len(xs):
            return None, f"FAILED ({len(xs) - len(ok)}/{len(xs)})" if xs else ""
        return statistics.median(x.seconds for x in ok), ok

    def report(self) -> str:
        a = self.a
        L = [f"<!-- {self.section} -->", f"### Format 2 against restic ({a.label})", "",
             f"Generated by `.venv/bin/python -m bench.format2_vs_restic --repeats {a.repeats} --only {a.only}` "
             f"on {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} ({(time.perf_counter() - self.t0) / 60:.1f} min). "
             f"Both tools encrypt and compress: keepflow format 2 (`keepflow init`: AES-256-GCM, zstd level 3 "
             f"\"auto\", FastCDC 512 KiB/1 MiB/8 MiB) and restic {self.restic_version()} repository version 2 "
             "(`restic init`: compression \"auto\" by default). Wall-clock medians [min-max] over the repeats, "
             "each repeat with its own repositories; CPU = user + sys of the command (median).", ""]
        L += [f"**{n}**" for n in self.notes]
        before = "before" in self.tools
        L += ["| tree | scenario | keepflow | restic | keepflow/restic | target | result | keepflow CPU | restic CPU |"
              + (" keepflow before | before/restic | before CPU |" if before else ""),
              "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"
              + (" ---: | ---: | ---: |" if before else "")]
        for tree in self.trees:
            for sc in ("first", "nochange", "changed", "restore"):
                cells, med, cpu = {}, {}, {}
                for tool in self.tools:
                    m, ok = self.times(tree, sc, tool)
                    med[tool] = m
                    if m is None:
                        cells[tool] = ok or ""
                        cpu[tool] = ""
                        continue
                    seconds = [x.seconds for x in ok]
                    span = f" [{min(seconds):.2f}-{max(seconds):.2f}]" if len(ok) > 1 else ""
                    cells[tool] = f"{m:.2f} s{span}"
                    cpu[tool] = f"{statistics.median(x.user + x.sys for x in ok):.1f} s"
                if not any(cells.values()):
                    continue

                def ratio(tool):
                    return med[tool] / med["restic"] if med.get(tool) and med["restic"] else None

                r = ratio("keepflow")
                tgt = TARGETS.get((tree, sc))
                res = "" if tgt is None or r is None else ("PASS" if r <= tgt else "FAIL")
                if res == "PASS" and (tree, sc) in AIMS:
                    res += f" (aim {AIMS[(tree, sc)]:g}x: {'met' if r <= AIMS[(tree, sc)] else 'not met'})"
                row = (f"| {tree} | {sc} | {cells['keepflow']} | {cells['restic']} | "
                       f"{'' if r is None else f'{r:.2f}x'} | {'' if tgt is None else f'<= {tgt:g}x'} | "
                       f"{res} | {cpu['keepflow']} | {cpu['restic']} |")
                if before:
                    rb = ratio("before")
                    row += f" {cells['before']} | {'' if rb is None else f'{rb:.2f}x'} | {cpu['before']} |"
                L.append(row)
        L += [""]
        if before:
            L += [f"\"keepflow before\": `{a.before}`, the same tree with this work's files (tasks/core/chunker.py, "
                  "compress.py, store_v2.py, restore_chunks.py) as they were before it, run alternately with the "
                  "others on the same tree states.", ""]
        # sizes
        size_rows = []
        for tree in self.trees:
            for r in range(1, a.repeats + 1):
                for sc in ("first", "changed"):
                    kf, rs = self.sizes.get((tree, "keepflow", r, sc)), self.sizes.get((tree, "restic", r, sc))
                    if kf and rs:
                        size_rows.append((tree, r, sc, kf, rs))
        if size_rows:
            L += ["Stored bytes (sum of the repository's files; data = keepflow `packs/`, restic `data/`):", "",
                  "| tree | repeat | after | keepflow total | restic total | ratio | keepflow data | restic data "
                  "| ratio |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for tree, r, sc, kf, rs in size_rows:
                L.append(f"| {tree} | {r} | {sc} backup | {kf[0]:,} | {rs[0]:,} | {kf[0] / rs[0]:.3f}x | {kf[1]:,} | "
                         f"{rs[1]:,} | {kf[1] / rs[1]:.3f}x |")
            L += [""]
        added = []
        for r in range(1, a.repeats + 1):
            vals = {}
            for tool in TOOLS:
                before = self.sizes.get(("large", tool, r, "nochange"))
                after = self.sizes.get(("large", tool, r, "changed"))
                if before and after:
                    vals[tool] = (after[0] - before[0], after[1] - before[1])
            if len(vals) == 2:
                added.append((r, vals))
        if added:
            L += ["The 1% change inside large files: bytes the changed backup added to each repository "
                  "(target: keepflow within 1.5x restic's):", "",
                  "| repeat | keepflow added (all / packs) | restic added (all / data) | ratio (all) | result |",
                  "| ---: | ---: | ---: | ---: | --- |"]
            for r, v in added:
                ratio = v["keepflow"][0] / v["restic"][0] if v["restic"][0] else float("inf")
                L.append(f"| {r} | {v['keepflow'][0]:,} / {v['keepflow'][1]:,} | {v['restic'][0]:,} / "
                         f"{v['restic'][1]:,} | {ratio:.2f}x | {'PASS' if ratio <= 1.5 else 'FAIL'} |")
            L += [""]
        if "text" in self.trees:
            kf, rs = self.sizes.get(("text", "keepflow", 1, "first")), self.sizes.get(("text", "restic", 1, "first"))
            t = self.trees["text"]
            if kf and rs:
                raw = t["py_bytes"] + t["log_bytes"]
                L += [f"Text tree (`bench.format2_vs_restic.text_tree`): {t['py_files']:,} `*.py` files of "
                      f"{t['site_packages']} ({t['py_bytes']:,} bytes) and {t['log_files']} generated logs (seed "
                      f"{LOG_SEED}, {t['log_bytes']:,} bytes; 10 of ~6 MiB, chunked): {raw:,} bytes. keepflow "
                      f"stores {kf[0]:,} bytes ({kf[0] / raw:.3f} of raw), restic {rs[0]:,} ({rs[0] / raw:.3f}): "
                      f"**{kf[0] / rs[0]:.3f}x** (target <= 1.1x: {'PASS' if kf[0] <= 1.1 * rs[0] else 'FAIL'}); "
                      f"data packs alone {kf[1] / rs[1]:.3f}x.", ""]
        trees = "; ".join(f"{k}: `python -m bench.gentree {k}`, {v['files']:,} files, {v['bytes'] / 2**20:,.0f} MiB"
                          + (f"; change: {v['change']}" if v.get("change") else "")
                          for k, v in self.trees.items() if k != "text")
        L += [f"Method: {trees + '. ' if trees else ''}The tree is at least {RACY_WAIT:g} s old before its first "
              "backup (racy window 2 s). "
              "Before each timed command its input (the source tree, or the repository for a restore) is read "
              "once and `sync` runs, untimed: warm page cache. Restores go into fresh folders and are checked "
              "against the source (names, sizes; contents for repeat 1). keepflow runs with "
              + ("`keepflow server start` run once (not timed: the persistent server and its warm process, "
                 "flows/cli/warm.py)" if self.a.server == "keepflow" else "a Prefect server started once (not timed)")
              + " and `KEEPFLOW_PASSWORD` set; restic with `RESTIC_PASSWORD` and its own "
              "cache folder. Both derive their key from the password in every command (keepflow Argon2id "
              "t=4 m=128 MiB, restic scrypt as `restic init` calibrated it). "
              f"Load average (1 min) before the timed commands: {', '.join(self.loads)}; at start "
              f"{self.load_start}, at the end {self.load_end}. 2 shared cores: other engineers' jobs ran at the "
              "same time, so absolute times are noisy; both tools ran alternately on the same state.", ""]
        cmds = {}
        for x in self.runs:
            if x.cmd and x.repeat == 1:
                cmds.setdefault((x.tool, x.tree, x.scenario), b_strip(self.work, x.cmd))
        L += ["```"] + [f"# {tree} {sc} ({tool})\n{c}" for (tool, tree, sc), c in cmds.items()] + [
            "# set-up (untimed)\nKEEPFLOW_PASSWORD=... keepflow init $W/<tree>/keepflow/repo-rN\n"
            "RESTIC_PASSWORD=... restic -r $W/<tree>/restic/repo-rN --cache-dir $W/restic-cache init", "```", ""]
        L += ["Machine: " + "; ".join(f"{k}: {v}" for k, v in machine(self.b).items()
                                       if k not in ("rsync",)), ""]
        L += ["| tree | scenario | tool | repeat | wall | user | sys | max RSS | other CPU | note |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for x in self.runs:
            L.append(f"| {x.tree} | {x.scenario} | {x.tool} | {x.repeat} | "
                     f"{'' if x.seconds is None else f'{x.seconds:.2f} s'} | {x.user:.1f} s | {x.sys:.1f} s | "
                     f"{x.maxrss_mib:.0f} MiB | {x.other_cpu:.1f} s | {x.note.replace('|', '/')} |")
        L += ["", f"<!-- /{self.section} -->"]
        return "\n".join(L)

    def restic_version(self) -> str:
        try:
            return subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split()[1]
        except Exception:     # noqa: BLE001 - informational
            return "?"


def b_strip(work: Path, s: str) -> str:
    return s.replace(str(work), "$W")


def write_section(path: Path, section: str, name: str) -> None:
    """Put ``section`` (with its markers ``<!-- name -->``) in place of the old one in ``path``, or append it."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    found = pattern.search(text)
    text = pattern.sub(lambda _: section, text) if found else text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.format2_vs_restic", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="small,large,text", help="comma-separated: small, large, text")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--label", default=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d-%H%M"),
                   help="names the section <!-- format2-vs-restic-LABEL --> (default: now, UTC)")
    p.add_argument("--workdir", default="/work/bench-tmp")
    p.add_argument("--keepflow", help="keepflow executable (default .venv/bin/keepflow)")
    p.add_argument("--before", help="a second keepflow executable to run alongside (reported as 'before')")
    p.add_argument("--site-packages", help="where the text tree's *.py files come from (default: this venv's)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--settle", type=float, default=0.25)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--server", choices=["prefect", "keepflow"], default="prefect",
                   help="prefect: `prefect server start` and PREFECT_API_URL; keepflow: the tool's own "
                        "`keepflow server start` (persistent server and warm process), nothing set")
    a = p.parse_args(argv)
    bad = set(a.only.split(",")) - {"small", "large", "text", ""}
    if bad:
        p.error(f"unknown trees: {bad}")
    if not shutil.which("restic"):
        p.error("restic not found (apt-get install -y restic)")
    return VsRestic(a).main()


if __name__ == "__main__":
    sys.exit(main())
