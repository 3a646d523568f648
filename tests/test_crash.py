"""Crashes: SIGKILL the real ``keepflow`` command at seeded random moments.

For backup, restore, replicate and prune in turn, the command runs on a real-ish
tree (a few thousand small files, a few multi-MiB ones, symlinks, modes) and is
killed with SIGKILL, which leaves it no chance to clean up, at a random moment
while its flow run is ``Running`` (measured on a clean run of the same command
first). Then what a user relies on after a crash:

* the repository (and a replica) verifies clean structurally;
* ``keepflow unlock`` (even rounds, while the killed process is still an
  unreaped zombie) or the next run (odd rounds) marks the killed flow run
  ``Crashed`` in Prefect, found through the run registry (tasks/core/runs.py);
* the next run completes (exit 0);
* a restore of the latest snapshot equals the source exactly (content, mode,
  mtime, symlinks, folders), no ``.kf-tmp-`` name is left in a restore target
  and no dead writer's temporary in the repository's ``tmp/``.

``KEEPFLOW_CRASH_SEED`` and ``KEEPFLOW_CRASH_KILLS`` (kills per operation,
default 2) vary the moments; every assertion message names the seed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from keepflow.tasks.core import liveness, runs, treeinfo
from keepflow.tasks.core.repository import RepoConfig, Repository
from keepflow.tasks.core.verify import check_structure

from tests import core_helpers
from tests.conftest import KEEPFLOW, age_tree, run_cli

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("KEEPFLOW_CRASH_SEED", "20261201"))
KILLS = int(os.environ.get("KEEPFLOW_CRASH_KILLS", "2"))
SMALL_FILES = 3000
BIG_FILES, BIG_MIB = 3, 12


# -- the tree ------------------------------------------------------------------------

def build_tree(root: Path, rng: random.Random) -> Path:
    for i in range(SMALL_FILES):
        p = root / f"d{i % 60:02d}" / f"s{i % 3}" / f"f{i:05d}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(100, 6000)))
        if i % 7 == 0:
            p.chmod(0o600)
        elif i % 11 == 0:
            p.chmod(0o755)
    for i in range(BIG_FILES):
        (root / "big").mkdir(exist_ok=True)
        (root / "big" / f"b{i}.bin").write_bytes(rng.randbytes(BIG_MIB << 20))
    (root / "big" / "b0.bin").chmod(0o640)
    (root / "links").mkdir()
    os.symlink("../d00/s0/f00000.dat", root / "links" / "to-file")
    os.symlink("../d01", root / "links" / "to-dir")
    os.symlink("nowhere/at/all", root / "links" / "dangling")
    (root / "empty").mkdir()
    (root / "d05" / "private").mkdir(mode=0o700)
    age_tree(root)
    return root


def change_tree(root: Path, rng: random.Random, round_no: int) -> None:
    """New content for a third of the small files and one big file, some deletions."""
    files = sorted(p for p in root.rglob("*.dat") if p.is_file() and not p.is_symlink())
    for p in files[round_no % 3::3]:
        p.write_bytes(rng.randbytes(rng.randint(100, 6000)))
    for p in files[1::97]:
        if p.name != "f00000.dat":
            p.unlink()
    (root / "big" / f"b{round_no % BIG_FILES}.bin").write_bytes(rng.randbytes(BIG_MIB << 20))
    age_tree(root, seconds=10 + round_no)


def assert_same_tree(expected: Path, actual: Path, what: str) -> None:
    want, got = treeinfo.describe(str(expected)), treeinfo.describe(str(actual))
    assert want == got, f"{what} (seed {SEED}): " + "; ".join(treeinfo.differences(want, got))


def temporaries_in(target: Path) -> list[Path]:
    return sorted(target.rglob(".kf-tmp-*"))


def dead_writers_temporaries(repo: Path) -> list[str]:
    tmp = repo / "tmp"
    names = os.listdir(tmp) if tmp.exists() else []
    return [n for n in names if (w := liveness.parse_tag(n[:-33])) is not None and liveness.gone(w)]


def assert_clean_structure(url: str, when: str) -> None:
    problems = check_structure(url).problems
    assert problems == [], f"{url} {when} (seed {SEED}): {problems[:5]}"


# -- killing -------------------------------------------------------------------------

def _record_of(pid: int):
    return next((r for r in runs.records(runs.default_folder()) if r.pid == pid), None)


def _spawn(args, env, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([KEEPFLOW, *map(str, args)], env=env, stdout=out, stderr=subprocess.STDOUT)


def measure(args, env, log: Path, phase=None) -> float:
    """Run to the end; return how long its flow run was Running (its registry record
    existed), or how long ``phase()`` held while it was."""
    proc = _spawn(args, env, log)
    appeared = ended = None
    while proc.poll() is None:
        present = _record_of(proc.pid) is not None and (phase is None or phase())
        now = time.monotonic()
        if present and appeared is None:
            appeared = now
        elif not present and appeared is not None and ended is None:
            ended = now
        time.sleep(0.005)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert appeared is not None, "the flow run never registered itself (or never reached the phase)"
    return (ended or time.monotonic()) - appeared


@dataclass
class Kill:
    proc: subprocess.Popen
    delay: float
    record: runs.RunRecord | None        # None: the run had finished before the signal (a miss)
    finished_record: runs.RunRecord | None = None   # a miss that left its record behind


def kill_while_running(args, env, log: Path, running_s: float, rng: random.Random, phase=None) -> Kill:
    """Start the command, wait until its flow run is Running (and ``phase()`` holds), SIGKILL it
    a random moment later. The child is left unreaped (a zombie) for the caller to decide."""
    proc = _spawn(args, env, log)
    deadline = time.monotonic() + 120
    record = None
    while record is None:
        record = _record_of(proc.pid)
        if record is not None and phase is not None and not phase():
            record = None
        assert proc.poll() is None or record, f"{args[0]} ended before its flow run was Running: {log.read_text()}"
        assert time.monotonic() < deadline, "no flow run record within 120 s"
        time.sleep(0.005)
    delay = rng.uniform(0.0, 0.9 * running_s)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    while (st := liveness.proc_stat(proc.pid)) is not None and st[0] != "Z":
        time.sleep(0.005)
    still = _record_of(proc.pid)
    if still is not None and _state(still.flow_run_id).is_final():
        # The kill landed after the final state was recorded but before the
        # ``_ended`` hook removed the record: the run finished, nothing is to be
        # marked Crashed (crash_dead_runs only drops such a record). A miss.
        return Kill(proc, delay, None, finished_record=still)
    return Kill(proc, delay, still)


def _state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


class Scenario:
    """Kill, recover, check: the part every operation shares."""

    def __init__(self, name, env, tmp: Path, seed_offset: int):
        self.name, self.env, self.tmp = name, env, tmp
        self.rng = random.Random(SEED + seed_offset)
        self.hits = 0
        self.report: list[str] = []

    def crash(self, round_no: int, args, running_s: float, repos: list[str], next_args, left=None,
              phase=None) -> Kill:
        """``left()`` describes what the kill left behind (for the report), before anything cleans up;
        ``phase()``: kill only once it holds (and ``running_s`` is how long it lasts)."""
        log = self.tmp / f"{self.name}-{round_no}.log"
        k = kill_while_running(args, self.env, log, running_s, self.rng, phase)
        leases = sum(len(os.listdir(Path(u) / "locks")) for u in repos if (Path(u) / "locks").exists())
        found = f"{leases} leases" + (f", {left()}" if left else "")
        for url in repos:
            if (Path(url) / "keepflow.json").exists():
                assert_clean_structure(url, f"after {self.name} was killed {k.delay:.2f}s into its run")
        if k.record is not None:
            self.hits += 1
            if round_no % 2 == 0:
                # Even rounds: unlock while the killed process is still a zombie (issue 11).
                out = run_cli(["unlock", repos[0]], env=self.env)
                assert out.returncode == 0, out.stderr
                assert f"marked flow run {k.record.flow_run_name} Crashed" in out.stdout, out.stdout + out.stderr
                assert _state(k.record.flow_run_id).is_crashed()
        k.proc.wait()
        nxt = run_cli(next_args, env=self.env)
        assert nxt.returncode == 0, f"next {self.name} (seed {SEED}): {nxt.stdout[-1500:]}{nxt.stderr[-1500:]}"
        if k.finished_record is not None:
            # The next run drops the finished run's stale record and leaves its state alone.
            assert _record_of(k.proc.pid) is None
            assert _state(k.finished_record.flow_run_id).is_completed()
        if k.record is not None:
            state = _state(k.record.flow_run_id)
            assert state.is_crashed(), f"killed {self.name} run is {state.name} (seed {SEED})"
            assert _record_of(k.proc.pid) is None
        for url in repos:
            assert_clean_structure(url, f"after the next {self.name}")
            assert dead_writers_temporaries(Path(url)) == []
        window = "while Running" if phase is None else "in the phase"
        self.report.append(f"{self.name} round {round_no}: killed {k.delay:.2f}s into {running_s:.2f}s {window} "
                           f"({'hit' if k.record else 'missed: already finished'}); left {found}")
        return k

    def done(self) -> None:
        print("\n".join(self.report))
        assert self.hits >= 1, f"no kill of {self.name} landed while it ran (seed {SEED}): {self.report}"


# -- the scenarios ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    src = build_tree(root / "src", random.Random(SEED))
    return root, src


def test_killed_backups(world, cli_env, tmp_path):
    _, src = world
    s = Scenario("backup", cli_env, tmp_path, 1)
    running = measure(["backup", src, tmp_path / "repo-measure"], cli_env, tmp_path / "measure.log")
    for k in range(KILLS):
        repo = tmp_path / f"repo-{k}"          # a fresh repository: the kill meets the full work
        # Created first: a kill that lands before the backup has created it
        # would leave nothing for the `unlock` of even rounds to open (exit 10).
        Repository.init(str(repo))
        s.crash(k, ["backup", src, repo], running, [str(repo)], ["backup", src, repo],
                left=lambda repo=repo: f"{len(os.listdir(repo / 'tmp')) if (repo / 'tmp').exists() else 0} in tmp/")
        left = os.listdir(repo / "tmp") if (repo / "tmp").exists() else []
        assert left == [], left        # a dead writer's copy is removed by the next backup
        out = tmp_path / f"out-{k}"
        core_helpers.restore(repo, out)
        assert_same_tree(src, out, f"restore after killed backup round {k}")
    s.done()


def test_killed_backup_leaves_tmp_named_after_it_and_the_next_backup_removes_it(world, cli_env, tmp_path):
    """Format 1: a kill during a large-file copy leaves its tmp/ file; its name says whose it was.

    (Format 2 has no tmp/ copy: large files are chunked into packs; its leftover
    is the test below.)"""
    _, src = world
    big = tmp_path / "bigsrc"
    big.mkdir()
    (big / "huge.bin").write_bytes(random.Random(SEED).randbytes(160 << 20))
    age_tree(big)
    for attempt in range(4):
        repo = tmp_path / f"repo-{attempt}"     # a fresh one: a finished attempt would make the next one a no-op
        Repository.init(str(repo), config=RepoConfig())          # format 1: large files go through tmp/
        proc = _spawn(["backup", big, repo], cli_env, tmp_path / f"big-{attempt}.log")
        tmp = repo / "tmp"
        seen = []
        while proc.poll() is None and not seen:
            seen = os.listdir(tmp) if tmp.exists() else []
            time.sleep(0.002)
        if seen:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = os.listdir(tmp) if tmp.exists() else []
        if left:
            break
    assert left, "no large-file temporary seen in 4 attempts"
    assert all(liveness.parse_tag(n[:-33]).pid == proc.pid for n in left), left
    assert dead_writers_temporaries(repo) == left
    assert_clean_structure(str(repo), "after a kill during a large-file copy")
    assert run_cli(["backup", big, repo], env=cli_env).returncode == 0
    assert os.listdir(tmp) == []
    out = tmp_path / "out"
    core_helpers.restore(repo, out)
    assert_same_tree(big, out, "restore after a killed large-file backup")


def pack_temporaries(repo: Path) -> list[str]:
    """The ``.tmp-`` names under packs/ (a pack being written: storage.write_once's temporary)."""
    found = []
    try:
        folders = list(os.scandir(repo / "packs"))
    except FileNotFoundError:
        return found
    for folder in folders:
        try:
            found += [e.name for e in os.scandir(folder.path) if ".tmp-" in e.name]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


def test_killed_format2_backup_leaves_only_pack_temporaries_named_after_it_and_prune_removes_them(
        world, cli_env, tmp_path):
    """Format 2: a large file becomes chunks in packs, so a kill mid-write leaves a pack's
    temporary (never a partial pack under a real name), named after the killed process;
    the repository verifies (ciphertext too), the next backup completes and restores
    exactly, and the next prune removes the dead writer's temporary at once (not after
    the one-hour rule)."""
    from keepflow.tasks.core.verify import check_ciphertext

    big = tmp_path / "bigsrc"
    big.mkdir()
    (big / "huge.bin").write_bytes(random.Random(SEED + 6).randbytes(160 << 20))
    age_tree(big)
    left = []
    for attempt in range(6):
        repo = tmp_path / f"repo-{attempt}"
        Repository.init(str(repo))
        proc = _spawn(["backup", big, repo], cli_env, tmp_path / f"big-{attempt}.log")
        seen = []
        while proc.poll() is None and not seen:
            seen = pack_temporaries(repo)          # a pack write lasts milliseconds: poll without sleeping
        if seen:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = pack_temporaries(repo)
        if left:
            break
    assert left, "no pack temporary seen in 6 attempts"
    assert Repository.open(str(repo)).version == 2
    assert not (repo / "tmp").exists() or os.listdir(repo / "tmp") == []       # no large-file copy
    writers = {n: liveness.parse_tag(n.split(".tmp-", 1)[1][:-9]) for n in left}
    assert all(w is not None and w.pid == proc.pid and liveness.gone(w) for w in writers.values()), writers
    assert_clean_structure(str(repo), "after a kill during a pack write")
    ciphertext = check_ciphertext(str(repo), 100)
    assert ciphertext.problems == [], ciphertext.problems[:5]

    assert run_cli(["backup", big, repo], env=cli_env).returncode == 0
    out = tmp_path / "out"
    core_helpers.restore(repo, out)
    assert_same_tree(big, out, "restore after a killed format 2 backup")
    # Still there (a backup lists no packs): the prune removes them.
    assert set(left) <= set(pack_temporaries(repo))
    pruned = run_cli(["prune", repo, "--keep-last", "1"], env=cli_env)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert pack_temporaries(repo) == []
    assert_clean_structure(str(repo), "after the prune")


def test_killed_restores(world, cli_env, tmp_path):
    _, src = world
    repo = tmp_path / "repo"
    core_helpers.backup(src, repo)
    s = Scenario("restore", cli_env, tmp_path, 2)
    first = tmp_path / "measured"
    running = measure(["restore", repo, first], cli_env, tmp_path / "measure.log")
    assert_same_tree(src, first, "clean restore")
    target = tmp_path / "target"
    for k in range(KILLS):
        # Round 0 into a new folder; later rounds rewrite a complete one (--overwrite always),
        # so temporaries appear all over a folder that already holds the tree.
        args = ["restore", repo, target] + (["--overwrite", "always"] if k else [])
        s.crash(k, args, running, [str(repo)], ["restore", repo, target],
                left=lambda: f"{len(temporaries_in(target))} temporaries in the target")
        assert temporaries_in(target) == [], temporaries_in(target)[:5]
        assert_same_tree(src, target, f"rerun after killed restore round {k}")
    s.done()


def test_killed_restore_leaves_only_owner_only_temporaries(world, cli_env, tmp_path):
    """What a kill mid-write leaves in the target: temporaries, readable by the owner only."""
    _, src = world
    repo = tmp_path / "repo"
    core_helpers.backup(src / "big", repo)
    target = tmp_path / "target"
    for attempt in range(4):
        proc = _spawn(["restore", repo, target, "--overwrite", "always"], cli_env, tmp_path / f"r-{attempt}.log")
        seen = []
        while proc.poll() is None and not seen:
            seen = temporaries_in(target) if target.exists() else []
            time.sleep(0.002)
        if seen:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = temporaries_in(target) if target.exists() else []
        if left:
            break
    assert left, "no temporary seen in 4 attempts"
    modes = {stat.S_IMODE(os.lstat(p).st_mode) for p in left if p.is_file() and not p.is_symlink()}
    assert modes == {0o600}, modes
    assert run_cli(["restore", repo, target], env=cli_env).returncode == 0
    assert temporaries_in(target) == []
    assert_same_tree(src / "big", target, "rerun after a restore killed mid-write")


def test_killed_replications(world, cli_env, tmp_path):
    _, src = world
    repo = tmp_path / "repo"
    core_helpers.backup(src, repo)
    s = Scenario("replicate", cli_env, tmp_path, 3)
    running = measure(["replicate", repo, tmp_path / "replica-measure"], cli_env, tmp_path / "measure.log")
    for k in range(KILLS):
        replica = tmp_path / f"replica-{k}"
        s.crash(k, ["replicate", repo, replica], running, [str(repo), str(replica)],
                ["replicate", repo, replica])
        out = tmp_path / f"out-{k}"
        core_helpers.restore(replica, out)
        assert_same_tree(src, out, f"restore from the replica after killed replicate round {k}")
    s.done()


def test_killed_prunes(world, cli_env, tmp_path):
    _, src0 = world
    src = tmp_path / "src"
    shutil.copytree(src0, src, symlinks=True)
    rng = random.Random(SEED + 40)
    prune_args = ["--keep-last", "1", "--grace", "0"]

    def history(repo: Path, round_no: int) -> None:
        """Two snapshots with different content, so the prune has data to delete."""
        core_helpers.backup(src, repo)
        change_tree(src, rng, round_no)
        core_helpers.backup(src, repo)

    def sweeping(repo: Path):
        """While the sweep deletes, it holds the prune lease."""
        locks = repo / "locks"
        return lambda: locks.exists() and any(n.startswith("prune-") for n in os.listdir(locks))

    repo, measured = tmp_path / "repo", tmp_path / "repo-measure"
    history(repo, 0)
    for copy in ("a", "b"):                              # the same work, measured on copies
        shutil.copytree(repo, measured / copy, symlinks=True)
    running = measure(["prune", measured / "a", *prune_args], cli_env, tmp_path / "measure-a.log")
    sweep = measure(["prune", measured / "b", *prune_args], cli_env, tmp_path / "measure-b.log",
                    sweeping(measured / "b"))
    s = Scenario("prune", cli_env, tmp_path, 4)
    for k in range(KILLS):
        if k:
            history(repo, k)        # new garbage (the previous round left one snapshot)
        # Odd rounds are killed while the sweep deletes, even ones anywhere in the run.
        s.crash(k, ["prune", repo, *prune_args], sweep if k % 2 else running, [str(repo)],
                ["prune", repo, *prune_args], phase=sweeping(repo) if k % 2 else None)
        out = tmp_path / f"out-{k}"
        core_helpers.restore(repo, out)
        assert_same_tree(src, out, f"restore after killed prune round {k}")
    s.done()


def test_killed_run_on_the_embedded_server(tmp_path):
    """The default set-up: no PREFECT_API_URL, a temporary server inside the command. The
    killed run's server outlives it (an orphan nobody stops); unlock marks the run Crashed
    in the database in PREFECT_HOME and stops that orphan; the next backup completes."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    folder = home / "keepflow" / "runs"
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(SEED + 5)
    for i in range(500):
        (src / f"f{i}").write_bytes(rng.randbytes(rng.randint(100, 4000)))
    (src / "big.bin").write_bytes(rng.randbytes(64 << 20))
    age_tree(src)
    repo = tmp_path / "repo"
    proc = _spawn(["backup", src, repo], env, tmp_path / "killed.log")
    try:
        _kill_embedded_and_recover(proc, folder, env, home, src, repo, rng, tmp_path)
    finally:
        for r in runs.records(str(folder)):
            runs.stop_orphaned_helper(r)      # never leave a server behind, even when failing
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_embedded_and_recover(proc, folder, env, home, src, repo, rng, tmp_path):
    import sqlite3

    deadline = time.monotonic() + 180          # a cold temporary server: 10-15 s (PREFECT_NOTES)
    record = None
    while record is None:
        record = next((r for r in runs.records(str(folder)) if r.pid == proc.pid), None)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert record.api_url is None and record.helper_pid
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    server = liveness.proc_stat(record.helper_pid)
    assert server is not None and server[1] == record.helper_start     # the orphan lives on

    out = run_cli(["unlock", repo], env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert f"marked flow run {record.flow_run_name} Crashed" in out.stdout, out.stdout
    deadline = time.monotonic() + 20
    while liveness.proc_stat(record.helper_pid) is not None:
        assert time.monotonic() < deadline, "the orphaned temporary server was not stopped"
        time.sleep(0.05)
    with sqlite3.connect(home / "prefect.db") as db:
        (state,) = db.execute("select state_type from flow_run where id = ?", (record.flow_run_id,)).fetchone()
    assert state == "CRASHED"
    assert runs.records(str(folder)) == []

    nxt = run_cli(["backup", src, repo], env=env)
    assert nxt.returncode == 0, nxt.stderr
    assert dead_writers_temporaries(repo) == []
    out_dir = tmp_path / "out"
    core_helpers.restore(repo, out_dir)
    assert_same_tree(src, out_dir, "restore after a killed backup on the embedded server")
