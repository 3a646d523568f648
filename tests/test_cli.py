"""The real ``keepflow`` command, end to end.

Every command here is run as a subprocess (``cli`` fixture / ``run_cli``)
against the session's Prefect test server, except the run-history test, which
uses the embedded default (no ``PREFECT_API_URL``) on purpose. Read-only
tests share one module-scoped repository with two snapshots; tests that add
snapshots make their own.

Not tested here: an unreadable file. The tests run as root, and root reads
a ``chmod 000`` file anyway, so the "skipped, exit 3" path cannot be caused
for real; ``test_unreadable_file_is_skipped_with_exit_3`` runs only when the
suite is run as an ordinary user.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from keepflow.tasks.core import snapshots as core_snapshots
from keepflow.tasks.core.repository import Repository
from keepflow.tasks.core.treeinfo import describe, differences

from tests import core_helpers
from tests.conftest import KEEPFLOW, VENV_BIN, age_tree, make_tree, run_cli

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = {"snapshot", "files_new", "files_changed", "files_unchanged", "files_deleted",
                "bytes_read", "bytes_stored", "skipped"}


def jrun(run, *args):
    """Run a command with ``--json``; stdout must be exactly one JSON value."""
    proc = run(*args, "--json")
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return json.loads(proc.stdout)  # raises if anything else is on stdout


def set_past_mtime(*paths: Path, seconds: int = 60) -> None:
    for p in paths:
        t = os.lstat(p).st_mtime_ns - seconds * 10**9
        os.utime(p, ns=(t, t), follow_symlinks=False)


def core_backup(source: Path, repo: Path) -> str:
    """One snapshot through the core steps the backup flow's tasks run (no Prefect)."""
    committed, _, _ = core_helpers.backup(source, repo)
    return committed.info.id


def core_restore(repo: Path, target: Path, **kw) -> list:
    """Restore through the core steps the restore flow's tasks run; returns the errors."""
    return core_helpers.restore(repo, target, **kw)[2]


def same_tree(expected: dict, got: dict) -> None:
    assert got == expected, "\n".join(differences(expected, got))


# -- a shared repository with two snapshots --------------------------------------------

V1 = {
    "keep.txt": "unchanged content\n",
    "change.txt": "version one\n",
    "gone.txt": "will be deleted\n",
    "sub/nested.txt": "nested file\n",
    "sub/deeper/data.bin": bytes(range(256)) * 4,
    "empty-dir": None,
    "link-to-keep": ("link", "keep.txt"),
}


@pytest.fixture(scope="module")
def hist(prefect_api_url, tmp_path_factory):
    """Source, repository, the two backups' JSON, and the tree described after each."""
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)

    def run(*args, **kw):
        return run_cli(args, env=env, **kw)

    base = tmp_path_factory.mktemp("hist")
    src, repo = make_tree(base / "src", V1), base / "repo"
    os.chmod(src / "sub", 0o700)
    age_tree(src, 100)
    first = jrun(run, "backup", src, repo, "--tag", "v1", "--tag", "first")
    desc1 = describe(str(src))

    (src / "change.txt").write_text("version two, longer\n")
    (src / "gone.txt").unlink()
    (src / "sub" / "added.txt").write_text("new file\n")
    # Only the touched entries get a past mtime: aging everything would change
    # every ctime and make the backup re-read unchanged files.
    set_past_mtime(src / "change.txt", src / "sub" / "added.txt", src / "sub", src)
    second = jrun(run, "backup", src, repo)
    desc2 = describe(str(src))
    return SimpleNamespace(src=src, repo=repo, first=first, second=second, desc1=desc1, desc2=desc2, env=env)


def test_backup_json_is_one_object_with_the_documented_keys(hist):
    for summary in (hist.first, hist.second):
        assert isinstance(summary, dict)
        assert set(summary) >= SUMMARY_KEYS
        assert summary["skipped"] == [] and summary["exit_code"] == 0
        assert len(summary["snapshot"]) == 16


def test_first_backup_counts(hist):
    s = hist.first
    files = sum(1 for v in V1.values() if isinstance(v, (str, bytes)))
    total = sum(len(v.encode() if isinstance(v, str) else v) for v in V1.values() if isinstance(v, (str, bytes)))
    assert (s["files_new"], s["files_changed"], s["files_unchanged"], s["files_deleted"]) == (files, 0, 0, 0)
    assert s["bytes_read"] == total == s["bytes_stored"]
    assert s["parent"] is None
    assert sorted(s["tags"]) == ["first", "v1"]


def test_incremental_backup_counts(hist):
    s = hist.second
    assert (s["files_new"], s["files_changed"], s["files_unchanged"], s["files_deleted"]) == (1, 1, 3, 1)
    assert s["parent"] == hist.first["snapshot"]
    # Only the new and the changed file were read and stored.
    expected = len("version two, longer\n") + len("new file\n")
    assert s["bytes_read"] == expected
    assert s["bytes_stored"] == expected


def test_snapshots_json(hist):
    snaps = jrun(lambda *a: run_cli(a, env=hist.env), "snapshots", hist.repo)
    assert [s["id"] for s in snaps] == [hist.first["snapshot"], hist.second["snapshot"]]
    assert sorted(snaps[0]["tags"]) == ["first", "v1"] and snaps[1]["tags"] == []
    assert snaps[1]["parent"] == snaps[0]["id"]
    assert snaps[0]["source"] == str(hist.src)
    assert snaps[1]["files"] == 5 and snaps[1]["dirs"] == 3


def test_snapshots_text(hist):
    proc = run_cli(["snapshots", hist.repo], env=hist.env)
    assert proc.returncode == 0
    assert hist.first["snapshot"][:8] in proc.stdout and hist.second["snapshot"][:8] in proc.stdout
    assert "v1,first" in proc.stdout or "first,v1" in proc.stdout
    assert proc.stdout.rstrip().endswith("2 snapshots")


def test_ls_json(hist):
    latest = jrun(lambda *a: run_cli(a, env=hist.env), "ls", hist.repo)
    assert latest["snapshot"] == hist.second["snapshot"]
    entries = {e["path"]: e for e in latest["entries"]}
    assert set(entries) == set(hist.desc2)
    assert entries["link-to-keep"]["type"] == "symlink" and entries["link-to-keep"]["link_target"] == "keep.txt"
    assert entries["empty-dir"]["type"] == "dir"
    assert entries["sub"]["mode"] & 0o777 == 0o700
    assert entries["sub/deeper/data.bin"]["size"] == 1024

    old = jrun(lambda *a: run_cli(a, env=hist.env), "ls", hist.repo, hist.first["snapshot"][:6])
    assert old["snapshot"] == hist.first["snapshot"]
    assert {e["path"] for e in old["entries"]} == set(hist.desc1)


def test_diff_json(hist):
    d = jrun(lambda *a: run_cli(a, env=hist.env), "diff", hist.repo, hist.first["snapshot"], hist.second["snapshot"])
    assert [r["path"] for r in d["added"]] == ["sub/added.txt"]
    assert [r["path"] for r in d["modified"]] == ["change.txt"]
    assert [r["path"] for r in d["deleted"]] == ["gone.txt"]
    assert d["modified"][0]["old_size"] == len("version one\n")
    assert d["summary"] == {"added": 1, "modified": 1, "deleted": 1, "bytes_added": len("new file\n"),
                            "bytes_deleted": len("will be deleted\n")}
    # Text form, and the reverse direction.
    text = run_cli(["diff", hist.repo, hist.second["snapshot"][:8], hist.first["snapshot"][:8]], env=hist.env)
    assert text.returncode == 0
    assert "+ gone.txt" in text.stdout and "- sub/added.txt" in text.stdout and "M change.txt" in text.stdout


def test_restore_latest_round_trip(cli, hist, tmp_path):
    summary = jrun(cli, "restore", hist.repo, tmp_path / "out")
    assert summary["snapshot"] == hist.second["snapshot"]
    assert summary["errors"] == [] and summary["files_written"] == 5
    same_tree(hist.desc2, describe(str(tmp_path / "out")))


def test_restore_older_snapshot_by_id_prefix(cli, hist, tmp_path):
    summary = jrun(cli, "restore", hist.repo, tmp_path / "out", "--snapshot", hist.first["snapshot"][:8])
    assert summary["snapshot"] == hist.first["snapshot"]
    same_tree(hist.desc1, describe(str(tmp_path / "out")))


def test_restore_as_of(cli, hist, tmp_path):
    snaps = core_snapshots.list_snapshots(Repository.open(str(hist.repo)))
    # A moment after the first backup ended and before the second started.
    summary = jrun(cli, "restore", hist.repo, tmp_path / "out", "--as-of", snaps[0].end_time)
    assert summary["snapshot"] == hist.first["snapshot"]
    same_tree(hist.desc1, describe(str(tmp_path / "out")))


def test_restore_include(cli, hist, tmp_path):
    out = tmp_path / "out"
    summary = jrun(cli, "restore", hist.repo, out, "--include", "sub", "--include", "keep.txt")
    assert summary["errors"] == []
    expected = {p: d for p, d in hist.desc2.items() if p == "keep.txt" or p == "sub" or p.startswith("sub/")}
    same_tree(expected, describe(str(out)))


def test_restore_include_folder_pattern_keeps_folder_metadata(hist, tmp_path):
    # Through the core steps the restore flow runs (cheap); `keepflow restore REPO OUT
    # --include sub/` shows the same (sub comes back 0o755 instead of 0o700).
    out = tmp_path / "out"
    assert core_restore(hist.repo, out, includes=["sub/"]) == []
    got = describe(str(out))
    assert set(got) == {p for p in hist.desc2 if p == "sub" or p.startswith("sub/")}
    assert got["sub"] == hist.desc2["sub"]  # mode 0o700 and mtime
    same_tree({p: d for p, d in hist.desc2.items() if p in got}, got)


def test_restore_overwrite_modes(cli, hist, tmp_path):
    out = tmp_path / "out"
    first = jrun(cli, "restore", hist.repo, out)
    assert first["files_written"] == 5
    keep, change = out / "keep.txt", out / "change.txt"
    keep_inode = keep.stat().st_ino
    change.write_text("local edit\n")

    never = jrun(cli, "restore", hist.repo, out, "--overwrite", "never")
    assert change.read_text() == "local edit\n"
    assert (never["files_written"], never["files_kept"]) == (0, 5)

    if_changed = jrun(cli, "restore", hist.repo, out, "--overwrite", "if-changed")
    assert change.read_text() == "version two, longer\n"
    assert (if_changed["files_written"], if_changed["files_identical"]) == (1, 4)
    assert keep.stat().st_ino == keep_inode  # identical file not rewritten
    same_tree(hist.desc2, describe(str(out)))

    change.write_text("local edit again\n")
    always = jrun(cli, "restore", hist.repo, out, "--overwrite", "always")
    assert always["files_written"] == 5 and always["files_identical"] == 0
    assert change.read_text() == "version two, longer\n"
    assert keep.stat().st_ino != keep_inode  # rewritten even though identical
    same_tree(hist.desc2, describe(str(out)))


def test_python_m_keepflow_backup_matches_keepflow_backup(hist, tmp_path):
    repo = tmp_path / "repo"
    proc = subprocess.run([sys.executable, "-m", "keepflow", "backup", str(hist.src), str(repo), "--json"],
                          capture_output=True, text=True, env=hist.env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert set(summary) == set(hist.first)
    assert summary["files_new"] == hist.second["files"] and summary["files_changed"] == 0
    assert summary["bytes_stored"] == hist.second["bytes"]
    snaps = jrun(lambda *a: run_cli(a, env=hist.env), "snapshots", repo)
    assert [s["id"] for s in snaps] == [summary["snapshot"]]


# -- dry run ----------------------------------------------------------------------------

def test_dry_run_stores_nothing(cli, tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": "aaaa", "b/c.bin": b"x" * 3000, "big.bin": b"\7" * (2 << 20)})
    age_tree(src)
    repo = tmp_path / "repo"
    dry = jrun(cli, "backup", src, repo, "--dry-run")
    assert not repo.exists()
    assert dry["snapshot"] is None and dry["dry_run"] is True
    assert dry["files_new"] == 3
    assert dry["bytes_stored"] == 4 + 3000 + (2 << 20)

    real = jrun(cli, "backup", src, repo)
    assert real["bytes_stored"] == dry["bytes_stored"]
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    (src / "new.bin").write_bytes(b"n" * 777)
    (src / "a.txt").write_text("AAAAA")
    set_past_mtime(src / "new.bin", src / "a.txt")
    dry2 = jrun(cli, "backup", src, repo, "--dry-run")
    assert (dry2["files_new"], dry2["files_changed"], dry2["files_unchanged"]) == (1, 1, 2)
    assert dry2["bytes_stored"] == 777 + 5
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before
    snaps = jrun(cli, "snapshots", repo)
    assert [s["id"] for s in snaps] == [real["snapshot"]]


# -- what gets left out ---------------------------------------------------------------

def test_exclude_ignore_files_and_repository_inside_source(cli, tmp_path):
    src = make_tree(tmp_path / "src", {
        "keep.txt": "k", "scratch.tmp": "t", "build/out.o": "o", "secret.key": "top-level secret is kept",
        "app/.keepflowignore": "secret.key\n*.log\n", "app/secret.key": "s", "app/run.log": "l",
        "app/deep/secret.key": "s2", "app/deep/code.py": "print()", "other/run.log": "kept: outside app/",
    })
    repo = src / "backups" / "repo"   # inside the source
    summary = jrun(cli, "backup", src, repo, "--exclude", "*.tmp", "--exclude", "build/")
    assert summary["exit_code"] == 0
    paths = {e["path"] for e in jrun(cli, "ls", repo)["entries"]}
    assert paths == {"keep.txt", "secret.key", "app", "app/.keepflowignore", "app/deep", "app/deep/code.py",
                     "other", "other/run.log", "backups"}
    # The repository existed when the source was scanned (the backup creates it
    # first), so it really was excluded, not merely absent.
    assert (repo / "keepflow.json").exists()


# -- special entries and names --------------------------------------------------------

AWKWARD = {
    "with space.txt": "space", "-rf": "dash", "--help": "double dash", "new\nline.txt": "newline",
    "Zoë Ünïcødé.txt": "unicode", "e\u0301-combining": "combining", "\u00e9-precomposed": "precomposed",
    "日本語/ファイル.txt": "cjk", ".hidden": "dot", "tab\there": "tab", "quote'\"": "quotes",
    "emoji 🙂/x": "emoji", "a" * 200: "long",
}


def test_special_entries_and_awkward_names_round_trip(cli, tmp_path):
    src = make_tree(tmp_path / "src", dict(AWKWARD, **{
        "passwd-link": ("link", "/etc/passwd"), "dangling": ("link", "does/not/exist"),
        "dir-link": ("link", "日本語"),
    }))
    os.mkfifo(src / "a-fifo")
    age_tree(src)
    expected = describe(str(src))
    repo = tmp_path / "repo"

    summary = jrun(cli, "backup", src, repo)
    assert summary["skipped"] == [] and summary["exit_code"] == 0
    assert summary["files"] == len(AWKWARD)
    entries = {e["path"]: e for e in jrun(cli, "ls", repo)["entries"]}
    assert entries["a-fifo"]["type"] == "fifo" and entries["a-fifo"]["hash"] is None   # an entry, no content
    link = entries["passwd-link"]
    assert (link["type"], link["link_target"], link["size"], link["hash"]) == ("symlink", "/etc/passwd", 0, None)
    assert entries["dir-link"]["type"] == "symlink"
    assert set(entries) == set(expected)

    out = tmp_path / "out"
    restored = jrun(cli, "restore", repo, out)
    assert restored["errors"] == []
    same_tree(expected, describe(str(out)))
    assert os.readlink(out / "passwd-link") == "/etc/passwd"
    assert stat.S_ISFIFO(os.lstat(out / "a-fifo").st_mode)
    for name, content in AWKWARD.items():
        assert (out / name).read_text() == content


def test_restore_of_longest_legal_multibyte_names(tmp_path):
    # Core steps (what the flows' tasks run); `keepflow restore` reports the same two
    # errors and exits 1.
    cjk, emoji = "語" * 85, "🙂" * 63  # 255 and 252 bytes
    src = make_tree(tmp_path / "src", {cjk: "cjk", emoji: ("link", "target")})
    age_tree(src)
    repo = tmp_path / "repo"
    core_backup(src, repo)
    assert core_restore(repo, tmp_path / "out") == []
    assert (tmp_path / "out" / cjk).read_text() == "cjk"
    assert os.readlink(tmp_path / "out" / emoji) == "target"


def test_non_utf8_file_name_does_not_fail_the_backup(cli, tmp_path):
    src = make_tree(tmp_path / "src", {"fine.txt": "ok"})
    with open(os.path.join(os.fsencode(src), b"latin1-\xe9t\xe9.txt"), "wb") as f:
        f.write(b"bytes")
    age_tree(src)
    proc = cli("backup", src, tmp_path / "repo", "--json")
    assert "unexpected" not in proc.stderr
    assert proc.returncode in (0, 3), proc.stderr
    assert json.loads(proc.stdout)["snapshot"]


def test_unreadable_file_is_skipped_with_exit_3(cli_env, tmp_path):
    """A real unreadable file. Root reads anything, so as root the command runs as
    the unprivileged user ``nobody`` (setpriv) in a folder it may write to."""
    import stat
    import subprocess
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="kf-unreadable-"))
    os.chmod(base, 0o777)
    src = make_tree(base / "src", {"ok.txt": "fine", "locked.txt": "secret"})
    for p in (src, src / "ok.txt"):
        os.chmod(p, os.stat(p).st_mode | stat.S_IROTH | stat.S_IXOTH)
    os.chmod(src / "locked.txt", 0)
    env = dict(cli_env, PREFECT_HOME=str(base / "prefect-home"), HOME=str(base))
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    try:
        proc = subprocess.run(prefix + [KEEPFLOW, "backup", str(src), str(base / "repo"), "--json"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 3, proc.stderr
        summary = json.loads(proc.stdout)
        assert [s["path"] for s in summary["skipped"]] == ["locked.txt"]
        assert "Permission denied" in summary["skipped"][0]["reason"]
        listing = subprocess.run([KEEPFLOW, "ls", str(base / "repo"), "--json"], capture_output=True, text=True,
                                 env=env, check=True)
        assert {e["path"] for e in json.loads(listing.stdout)["entries"]} == {"ok.txt"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- run history with the embedded default -----------------------------------------------

_READ_HISTORY = r"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
out = []
with get_client(sync_client=True) as client:
    for run in client.read_flow_runs():
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        out.append({
            "flow": client.read_flow(run.flow_id).name, "name": run.name, "logs": [x.message for x in logs],
            "state": run.state.type.value if run.state else None,
            "tasks": [{"name": t.name, "state": t.state.type.value if t.state else None,
                       "final": bool(t.state and t.state.is_final())} for t in tasks],
        })
print("HISTORY " + json.dumps(out))
"""


def test_run_history_is_complete_with_embedded_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=tempfile.mkdtemp(prefix="kf-home-", dir=tmp_path),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    src = make_tree(tmp_path / "my-photos", {"a.txt": "a", "b/c.txt": "c", "big.bin": b"\1" * (2 << 20)})
    age_tree(src)
    proc = subprocess.run([KEEPFLOW, "backup", str(src), str(tmp_path / "repo"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)

    reader = subprocess.run([str(VENV_BIN / "python"), "-c", _READ_HISTORY], capture_output=True, text=True,
                            env=env, timeout=300, cwd=tmp_path)
    assert reader.returncode == 0, reader.stderr
    line = next(ln for ln in reader.stdout.splitlines() if ln.startswith("HISTORY "))
    runs = json.loads(line[len("HISTORY "):])
    assert len(runs) == 1
    run = runs[0]
    assert run["flow"] == "backup"
    assert run["name"].startswith("backup-my-photos-")
    assert run["state"] == "COMPLETED"
    names = sorted(t["name"] for t in run["tasks"])
    assert len(names) == summary["task_runs"] == summary["batches"] + 2
    assert sum(n.startswith("plan-") for n in names) == 1
    assert sum(n.startswith("commit-") for n in names) == 1
    assert sum(n.startswith("store-b") for n in names) == summary["batches"] >= 1
    assert all(t["final"] and t["state"] == "COMPLETED" for t in run["tasks"]), run["tasks"]
    # The command ends with os._exit after the shutdown hooks (flows/cli/__init__.py:
    # console): the log worker was still drained, so the run's last log line is
    # recorded, and the temporary server was still stopped.
    assert any("Finished in state Completed" in m for m in run["logs"]), run["logs"][-5:]
    assert _processes_of_home(env["PREFECT_HOME"]) == []


def _processes_of_home(home: str) -> list[int]:
    """Live processes whose environment has PREFECT_HOME=home (a temporary server left behind)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ and state != "Z":
            found.append(int(pid))
    return found
