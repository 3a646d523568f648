"""Every mistake a user can make gets one line and the documented exit code.

Through the real ``keepflow`` command (fixture ``cli``): each bad input must
print exactly one line on stderr starting ``keepflow: error:``, no traceback
anywhere, nothing on stdout, and exit with the code documented in
``tasks/core/errors.py``: 2 usage, 1 failed / no snapshot, 10 repository
missing or unusable. Locations that are refused must be left untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks.core import backup as core_backup
from tasks.core import index as core_index
from tasks.core import manifest as core_manifest
from tasks.core import snapshots as core_snapshots
from tasks.core.errors import EXIT_FAILED, EXIT_NO_REPO, EXIT_USAGE
from tasks.core.repository import Repository

from tests.conftest import age_tree, make_tree


def assert_one_error(proc, exit_code: int, *fragments: str) -> str:
    """The one-line error contract; returns the message."""
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("keepflow: error: "), lines[0]
    assert proc.stdout == "", f"stdout should be empty on error, got:\n{proc.stdout}"
    assert proc.returncode == exit_code, f"exit {proc.returncode}, expected {exit_code}: {lines[0]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def snapshot_tree(path: Path) -> dict[str, bytes | None]:
    """Everything under ``path`` (file contents, folders as None), to prove it was left alone."""
    out = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), path)] = None
        for name in files:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = Path(full).read_bytes()
    return out


@pytest.fixture
def src(tmp_path):
    root = make_tree(tmp_path / "src", {"a.txt": "alpha\n", "sub/b.txt": "beta\n", "sub/c.bin": b"\0\1\2" * 50})
    age_tree(root)
    return root


def core_snapshot(source: Path, repo: Path, tags=()) -> str:
    """Make one snapshot with the core steps (what the flow's tasks call), without Prefect."""
    plan = core_backup.prepare(str(source), str(repo), tags=tags)
    plan_d = plan.to_dict()
    summaries = [core_backup.store_range(plan_d, i, s, e) for i, (s, e) in enumerate(plan.batches)]
    return core_backup.commit(plan_d, summaries).info.id


# -- argument errors (argparse, no flow) ----------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["frobnicate"], "invalid choice"),
    (["backup", "--frobnicate", "a", "b"], "--frobnicate"),
    (["backup", "only-one-argument"], "required"),
    (["restore", "repo", "target", "--overwrite", "bogus"], "bogus"),
    (["snapshots"], "required"),
    (["--no-such-flag", "snapshots", "repo"], "--no-such-flag"),
])
def test_usage_errors_exit_2(cli, tmp_path, args, fragment):
    proc = cli(*args, cwd=tmp_path)
    assert_one_error(proc, EXIT_USAGE, fragment)
    assert os.listdir(tmp_path) == []  # nothing was created by a refused command


def test_no_command_prints_help_and_exits_2(cli):
    proc = cli()
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "backup" in proc.stderr and "restore" in proc.stderr


# -- source errors ----------------------------------------------------------------

def test_missing_source(cli, tmp_path):
    repo = tmp_path / "repo"
    proc = cli("backup", tmp_path / "no-such-folder", repo)
    assert_one_error(proc, EXIT_USAGE, "no-such-folder", "does not exist")
    assert not (repo / "snapshots").exists() or list((repo / "snapshots").iterdir()) == []


def test_source_is_a_file(cli, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("not a folder")
    proc = cli("backup", f, tmp_path / "repo", "--json")
    assert_one_error(proc, EXIT_USAGE, "file.txt", "not a directory")


# -- repository errors ------------------------------------------------------------

def test_backup_into_foreign_folder_is_refused_and_untouched(cli, src, tmp_path):
    foreign = make_tree(tmp_path / "photos", {"holiday.jpg": b"\xff\xd8jpeg", "notes/todo.txt": "milk"})
    before = snapshot_tree(foreign)
    proc = cli("backup", src, foreign)
    assert_one_error(proc, EXIT_NO_REPO, str(foreign), "not a keepflow repository")
    assert snapshot_tree(foreign) == before


@pytest.mark.parametrize("command", ["init", "snapshots", "ls"])
def test_foreign_folder_refused_by_other_commands(cli, tmp_path, command):
    foreign = make_tree(tmp_path / "data", {"report.csv": "a,b\n1,2\n"})
    before = snapshot_tree(foreign)
    proc = cli(command, foreign)
    assert_one_error(proc, EXIT_NO_REPO, "not a keepflow repository")
    assert snapshot_tree(foreign) == before


def _make_future_repo(cli, tmp_path) -> Path:
    repo = tmp_path / "repo"
    cli("init", repo, check=True)
    config_path = repo / "keepflow.json"
    config = json.loads(config_path.read_text())
    config["version"] = 99
    config_path.write_text(json.dumps(config))
    return repo


@pytest.mark.parametrize("command", ["snapshots", "ls"])
def test_newer_repository_version_is_refused(cli, tmp_path, command):
    repo = _make_future_repo(cli, tmp_path)
    proc = cli(command, repo)
    assert_one_error(proc, EXIT_NO_REPO, "version 99", "upgrade keepflow")


def test_backup_into_newer_repository_is_refused_and_untouched(cli, src, tmp_path):
    repo = _make_future_repo(cli, tmp_path)
    before = snapshot_tree(repo)
    proc = cli("backup", src, repo)
    assert_one_error(proc, EXIT_NO_REPO, "version 99", "upgrade keepflow")
    assert snapshot_tree(repo) == before


def test_damaged_config_is_refused(cli, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keepflow.json").write_text("{not json")
    proc = cli("snapshots", repo)
    assert_one_error(proc, EXIT_NO_REPO, "keepflow.json")


@pytest.mark.parametrize("command", ["snapshots", "ls"])
def test_read_commands_on_missing_repository(cli, tmp_path, command):
    proc = cli(command, tmp_path / "nothing-here")
    assert_one_error(proc, EXIT_NO_REPO, "no keepflow repository", "keepflow init")
    assert not (tmp_path / "nothing-here").exists()


def test_restore_from_missing_repository(cli, tmp_path):
    proc = cli("restore", tmp_path / "nothing-here", tmp_path / "target")
    assert_one_error(proc, EXIT_NO_REPO, "no keepflow repository")
    assert not (tmp_path / "nothing-here").exists()
    assert not (tmp_path / "target").exists()


def test_init_twice(cli, tmp_path):
    repo = tmp_path / "repo"
    first = cli("init", repo, "--json")
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout)
    before = snapshot_tree(repo)
    proc = cli("init", repo)
    assert_one_error(proc, EXIT_NO_REPO, "already exists")
    assert snapshot_tree(repo) == before
    assert json.loads((repo / "keepflow.json").read_text())["id"] == created["id"]


def test_empty_repository_has_no_snapshots(cli, tmp_path):
    repo = tmp_path / "repo"
    cli("init", repo, check=True)
    proc = cli("ls", repo)
    assert_one_error(proc, EXIT_USAGE, "no snapshots yet")


# -- snapshot references ------------------------------------------------------------

@pytest.fixture
def repo_with_snapshots(src, tmp_path):
    """A repository whose snapshots include two ids sharing their first hex digit.

    Ids are random hex, so by pigeonhole 17 snapshots always contain such a
    pair; we stop as soon as one appears (usually after ~5). Made with the core
    steps, which are what the backup flow's tasks run.
    """
    repo = tmp_path / "repo"
    ids: list[str] = []
    for _ in range(17):
        ids.append(core_snapshot(src, repo))
        firsts = [i[0] for i in ids]
        shared = [c for c in set(firsts) if firsts.count(c) > 1]
        if shared:
            return repo, ids, shared[0]
    raise AssertionError("pigeonhole failed?")  # pragma: no cover


def test_unknown_snapshot_id(cli, repo_with_snapshots):
    repo, ids, _ = repo_with_snapshots
    proc = cli("ls", repo, "zz0000")
    assert_one_error(proc, EXIT_USAGE, "no snapshot matches 'zz0000'", "keepflow snapshots")
    proc = cli("diff", repo, ids[0], "zz0000", "--json")
    assert_one_error(proc, EXIT_USAGE, "zz0000")


def test_ambiguous_snapshot_prefix(cli, repo_with_snapshots):
    repo, ids, prefix = repo_with_snapshots
    proc = cli("ls", repo, prefix)
    assert_one_error(proc, EXIT_USAGE, "ambiguous", repr(prefix))
    # The full id still works.
    full = next(i for i in ids if i.startswith(prefix))
    ok = cli("ls", repo, full, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["snapshot"] == full


def test_restore_unknown_and_ambiguous_snapshot(cli, repo_with_snapshots, tmp_path):
    repo, _ids, prefix = repo_with_snapshots
    proc = cli("restore", repo, tmp_path / "t1", "--snapshot", "zz0000")
    assert_one_error(proc, EXIT_USAGE, "no snapshot matches")
    proc = cli("restore", repo, tmp_path / "t2", "--snapshot", prefix)
    assert_one_error(proc, EXIT_USAGE, "ambiguous")
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


@pytest.mark.parametrize("as_of, fragment", [
    ("next tuesday", "cannot read time"),
    ("1999-01-01 00:00", "no snapshot at or before"),
])
def test_restore_bad_as_of(cli, src, tmp_path, as_of, fragment):
    repo = tmp_path / "repo"
    core_snapshot(src, repo)
    proc = cli("restore", repo, tmp_path / "target", "--as-of", as_of)
    assert_one_error(proc, EXIT_USAGE, fragment)
    assert not (tmp_path / "target").exists()


# -- patterns -------------------------------------------------------------------------

def test_bad_exclude_pattern(cli, src, tmp_path):
    # Verified against pathspec: a lone '!' and a reversed range are rejected.
    proc = cli("backup", src, tmp_path / "repo", "--exclude", "!")
    assert_one_error(proc, EXIT_USAGE, "bad pattern '!'")
    proc = cli("backup", src, tmp_path / "repo", "--exclude", "*.tmp", "--exclude", "[z-a]")
    assert_one_error(proc, EXIT_USAGE, "bad pattern", "[z-a]")


def test_bad_pattern_in_ignore_file_names_the_file(cli, src, tmp_path):
    (src / "sub" / ".keepflowignore").write_text("*.log\n!\n")
    proc = cli("backup", src, tmp_path / "repo")
    assert_one_error(proc, EXIT_USAGE, "bad pattern", ".keepflowignore")


def test_bad_include_pattern_on_restore(cli, src, tmp_path):
    repo = tmp_path / "repo"
    core_snapshot(src, repo)
    proc = cli("restore", repo, tmp_path / "target", "--include", "[z-a]")
    assert_one_error(proc, EXIT_USAGE, "bad pattern")


# -- targets ----------------------------------------------------------------------------

def test_restore_into_a_path_below_a_regular_file(cli, src, tmp_path):
    repo = tmp_path / "repo"
    core_snapshot(src, repo)
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("i am a file")
    proc = cli("restore", repo, blocker / "inside")
    assert_one_error(proc, EXIT_USAGE, "cannot restore into", "blocker.txt")
    assert blocker.read_text() == "i am a file"


def test_restore_onto_a_regular_file(cli, src, tmp_path):
    repo = tmp_path / "repo"
    core_snapshot(src, repo)
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("i am a file")
    proc = cli("restore", repo, blocker)
    assert_one_error(proc, EXIT_USAGE, "cannot restore into", "not a folder")
    assert blocker.read_text() == "i am a file"


# -- corrupted data -------------------------------------------------------------------

def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_blobs_are_not_restored_under_their_names(cli, tmp_path):
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB: stored whole under objects/
    src = make_tree(tmp_path / "src", {"bad.txt": "this content gets corrupted\n", "good.txt": "fine\n",
                                       "sub/also-good.txt": "also fine\n", "sub/big.bin": big,
                                       "big-ok.bin": big[::-1]})
    age_tree(src)
    repo = tmp_path / "repo"
    cli("backup", src, repo, check=True)

    # Find where bad.txt's and big.bin's blobs live, through the repository's own index.
    r = Repository.open(str(repo))
    info = core_snapshots.resolve(r, "latest")
    hashes = dict(zip(*core_manifest.read_manifest(r, info, columns=["path", "hash"]).to_pydict().values()))
    where = {row["hash"]: row for row in core_index.load_index(r).to_pylist()}
    small, large = where[hashes["bad.txt"]], where[hashes["sub/big.bin"]]
    assert small["key"].startswith("packs/") and large["key"].startswith("objects/")
    _flip_byte(repo / small["key"], small["offset"] + 3)
    _flip_byte(repo / large["key"], large["length"] // 2)

    target = tmp_path / "target"
    proc = cli("restore", repo, target)
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_FAILED, out
    assert "Traceback" not in out
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("keepflow: error: ") and "2 files" in last
    assert "bad.txt" in proc.stderr and "sub/big.bin" in proc.stderr
    # No corrupt file under its real name, and no temporary left behind.
    assert not (target / "bad.txt").exists()
    assert not (target / "sub" / "big.bin").exists()
    leftovers = [p for p in target.rglob("*") if "kf-tmp" in p.name]
    assert leftovers == []
    # Everything else is restored intact.
    assert (target / "good.txt").read_text() == "fine\n"
    assert (target / "sub" / "also-good.txt").read_text() == "also fine\n"
    assert (target / "big-ok.bin").read_bytes() == big[::-1]
