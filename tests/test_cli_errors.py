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
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core import chunk_lists, pack
from keepflow.tasks.core import index as core_index
from keepflow.tasks.core import manifest as core_manifest
from keepflow.tasks.core import snapshots as core_snapshots
from keepflow.tasks.core.errors import EXIT_FAILED, EXIT_NO_REPO, EXIT_USAGE, BadPatternError, SourceNotFoundError
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree, run_cli


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


def core_snapshot(source: Path, repo: Path, tags=()) -> str:
    """Make one snapshot with the core steps (what the flow's tasks call), without Prefect."""
    return core_helpers.backup(source, repo, tags=tags)[0].info.id


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


def test_version_is_the_installed_package_version(cli):
    from importlib import metadata

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"keepflow {metadata.version('keepflow')}\n", proc


def test_no_command_prints_help_and_exits_2(cli):
    proc = cli()
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "backup" in proc.stderr and "restore" in proc.stderr


# -- commands that run a flow: prepared once, run concurrently -------------------------
#
# Each of these pays Prefect's start-up in its own process (~3 s, mostly CPU in
# imports), so the module runs them all at once in a small thread pool before
# the tests look at their results. Every case gets its own folders.

class _Case(SimpleNamespace):
    proc: subprocess.CompletedProcess


def _setup_cases(base: Path) -> dict[str, _Case]:
    src = make_tree(base / "src", {"a.txt": "alpha\n", "sub/b.txt": "beta\n"})
    age_tree(src)
    repo = base / "repo"
    ids: list[str] = []
    # Snapshots until two ids share their first hex digit: random hex ids, so by
    # pigeonhole 17 always suffice (usually ~5). Made with the core steps.
    for _ in range(17):
        ids.append(core_snapshot(src, repo))
        firsts = [i[0] for i in ids]
        if len(set(firsts)) < len(firsts):
            break
    shared = next(c for c in set(i[0] for i in ids) if sum(i[0] == c for i in ids) > 1)

    cases: dict[str, _Case] = {}

    def case(name, *args, **ctx):
        folder = base / name
        folder.mkdir()
        cases[name] = _Case(args=[str(a) for a in args], folder=folder, **ctx)
        return folder

    case("missing_source", "backup", base / "no-such-folder", base / "missing_source" / "repo")
    (base / "source_is_file.txt").write_text("not a folder")
    case("source_is_file", "backup", base / "source_is_file.txt", base / "source_is_file" / "repo", "--json")

    foreign = make_tree(base / "foreign-data", {"holiday.jpg": b"\xff\xd8jpeg", "notes/todo.txt": "milk"})
    case("foreign", "backup", src, foreign, before=snapshot_tree(foreign), where=foreign)

    future = make_future_repo(base / "future-repo")
    case("future", "backup", src, future, before=snapshot_tree(future), where=future)

    case("restore_missing_repo", "restore", base / "nothing-here", base / "restore_missing_repo" / "target")
    case("restore_unknown", "restore", repo, base / "restore_unknown" / "target", "--snapshot", "zz0000")
    case("restore_ambiguous", "restore", repo, base / "restore_ambiguous" / "target", "--snapshot", shared,
             prefix=shared)
    case("as_of_garbage", "restore", repo, base / "as_of_garbage" / "target", "--as-of", "next tuesday")
    case("as_of_too_early", "restore", repo, base / "as_of_too_early" / "target", "--as-of", "1999-01-01 00:00")
    case("bad_include", "restore", repo, base / "bad_include" / "target", "--include", "[z-a]")

    # Verified against pathspec: a lone '!' and a reversed range are rejected.
    case("bad_exclude", "backup", src, base / "bad_exclude" / "repo", "--exclude", "*.tmp", "--exclude", "!")
    ignored = make_tree(base / "ignored-src", {"a.txt": "a", "sub/.keepflowignore": "*.log\n[z-a]\n"})
    case("bad_ignore_file", "backup", ignored, base / "bad_ignore_file" / "repo")

    blocker = base / "blocker.txt"
    blocker.write_text("i am a file")
    case("below_file", "restore", repo, blocker / "inside", blocker=blocker)
    case("onto_file", "restore", repo, blocker, blocker=blocker)
    return cases


def make_future_repo(repo: Path) -> Path:
    """A repository written by a newer keepflow (format version 99)."""
    Repository.init(str(repo))
    config_path = repo / "keepflow.json"
    config = json.loads(config_path.read_text())
    config["version"] = 99
    config_path.write_text(json.dumps(config))
    return repo


@pytest.fixture(scope="module")
def flow_errors(prefect_api_url, tmp_path_factory):
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    cases = _setup_cases(tmp_path_factory.mktemp("flow-errors"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_cli, c.args, env=env) for name, c in cases.items()}
        for name, fut in futures.items():
            cases[name].proc = fut.result()
    return cases


def test_missing_source(flow_errors):
    c = flow_errors["missing_source"]
    assert_one_error(c.proc, EXIT_USAGE, "no-such-folder", "does not exist or is not a directory")
    repo = c.folder / "repo"
    assert not (repo / "snapshots").exists() or list((repo / "snapshots").iterdir()) == []


def test_source_is_a_file(flow_errors):
    assert_one_error(flow_errors["source_is_file"].proc, EXIT_USAGE, "source_is_file.txt", "not a directory")


def test_refused_backup_creates_no_repository(tmp_path):
    # Core step the plan task runs; `keepflow backup NOSUCH REPO` leaves REPO/keepflow.json too.
    with pytest.raises(SourceNotFoundError):
        core_backup.prepare(str(tmp_path / "no-such-folder"), str(tmp_path / "repo1"))
    with pytest.raises(BadPatternError):
        core_backup.prepare(str(tmp_path), str(tmp_path / "repo2"), excludes=["!"])
    assert not (tmp_path / "repo1").exists()
    assert not (tmp_path / "repo2").exists()


def test_backup_into_foreign_folder_is_refused_and_untouched(flow_errors):
    c = flow_errors["foreign"]
    assert_one_error(c.proc, EXIT_NO_REPO, str(c.where), "not a keepflow repository")
    assert snapshot_tree(c.where) == c.before


def test_backup_into_newer_repository_is_refused_and_untouched(flow_errors):
    c = flow_errors["future"]
    assert_one_error(c.proc, EXIT_NO_REPO, "version 99", "upgrade keepflow")
    assert snapshot_tree(c.where) == c.before


def test_restore_from_missing_repository(flow_errors):
    c = flow_errors["restore_missing_repo"]
    assert_one_error(c.proc, EXIT_NO_REPO, "no keepflow repository", "nothing-here")
    assert not (c.folder.parent / "nothing-here").exists()
    assert not (c.folder / "target").exists()


def test_restore_unknown_snapshot(flow_errors):
    c = flow_errors["restore_unknown"]
    assert_one_error(c.proc, EXIT_USAGE, "no snapshot matches 'zz0000'", "keepflow snapshots")
    assert not (c.folder / "target").exists()


def test_restore_ambiguous_snapshot_prefix(flow_errors):
    c = flow_errors["restore_ambiguous"]
    assert_one_error(c.proc, EXIT_USAGE, "ambiguous", repr(c.prefix))
    assert not (c.folder / "target").exists()


@pytest.mark.parametrize("name, fragment", [("as_of_garbage", "cannot read time 'next tuesday'"),
                                            ("as_of_too_early", "no snapshot at or before 1999-01-01")])
def test_restore_bad_as_of(flow_errors, name, fragment):
    c = flow_errors[name]
    assert_one_error(c.proc, EXIT_USAGE, fragment)
    assert not (c.folder / "target").exists()


def test_bad_exclude_pattern(flow_errors):
    assert_one_error(flow_errors["bad_exclude"].proc, EXIT_USAGE, "bad pattern", "'!'", "gitignore syntax")


def test_bad_pattern_in_ignore_file_names_the_file(flow_errors):
    assert_one_error(flow_errors["bad_ignore_file"].proc, EXIT_USAGE, "bad pattern", "sub/.keepflowignore")


def test_bad_include_pattern_on_restore(flow_errors):
    c = flow_errors["bad_include"]
    assert_one_error(c.proc, EXIT_USAGE, "bad pattern", "[z-a]")
    assert not (c.folder / "target").exists()


def test_restore_into_a_path_below_a_regular_file(flow_errors):
    c = flow_errors["below_file"]
    assert_one_error(c.proc, EXIT_USAGE, "cannot restore into", "blocker.txt")
    assert c.blocker.read_text() == "i am a file"


def test_restore_onto_a_regular_file(flow_errors):
    c = flow_errors["onto_file"]
    assert_one_error(c.proc, EXIT_USAGE, "cannot restore into", "not a folder")
    assert c.blocker.read_text() == "i am a file"


# -- read-only commands (no flow) ---------------------------------------------------------

@pytest.mark.parametrize("command", ["init", "snapshots", "ls"])
def test_foreign_folder_refused_by_other_commands(cli, tmp_path, command):
    foreign = make_tree(tmp_path / "data", {"report.csv": "a,b\n1,2\n"})
    before = snapshot_tree(foreign)
    proc = cli(command, foreign)
    assert_one_error(proc, EXIT_NO_REPO, "not a keepflow repository")
    assert snapshot_tree(foreign) == before


@pytest.mark.damages_repository
@pytest.mark.parametrize("command", ["snapshots", "ls"])
def test_newer_repository_version_is_refused(cli, tmp_path, command):
    repo = make_future_repo(tmp_path / "repo")
    proc = cli(command, repo)
    assert_one_error(proc, EXIT_NO_REPO, "version 99", "upgrade keepflow")


@pytest.mark.damages_repository
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


def test_unknown_and_ambiguous_snapshot_in_read_commands(cli, flow_errors):
    c = flow_errors["restore_ambiguous"]
    repo = c.args[1]
    proc = cli("ls", repo, "zz0000")
    assert_one_error(proc, EXIT_USAGE, "no snapshot matches 'zz0000'")
    proc = cli("diff", repo, "latest", "zz0000", "--json")
    assert_one_error(proc, EXIT_USAGE, "zz0000")
    proc = cli("ls", repo, c.prefix)
    assert_one_error(proc, EXIT_USAGE, "ambiguous", repr(c.prefix))
    # More characters of one of those ids resolve it.
    ids = [s["id"] for s in json.loads(cli("snapshots", repo, "--json").stdout)]
    full = next(i for i in ids if i.startswith(c.prefix))
    ok = cli("ls", repo, full[:12], "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["snapshot"] == full


# -- corrupted data -------------------------------------------------------------------

def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _a_data_blob_of(repo: Repository, row: dict, where: dict) -> dict:
    """The index row of a data blob holding part of the file whose content id's row is ``row``: that
    blob itself, or (format 2, a chunked file: a list blob) its middle chunk."""
    if row.get("type", pack.KIND_DATA) == pack.KIND_DATA:
        return row
    [chunks] = chunk_lists.read_lists(repo, pa.Table.from_pylist([row]))
    assert chunks and len(chunks) >= 2, chunks
    return where[chunks[len(chunks) // 2][0]]


@pytest.mark.damages_repository
@pytest.mark.parametrize("version", [2, 1], ids=["format2", "format1"])
def test_corrupted_blobs_are_not_restored_under_their_names(cli, tmp_path, version):
    # 5 MiB: stored whole under objects/ in format 1, content-defined chunks in packs in format 2.
    big = random.Random(9).randbytes(5 << 20)
    src = make_tree(tmp_path / "src", {"bad.txt": "this content gets corrupted\n", "good.txt": "fine\n",
                                       "sub/also-good.txt": "also fine\n", "sub/big.bin": big,
                                       "big-ok.bin": big[::-1]})
    age_tree(src)
    repo = tmp_path / "repo"
    Repository.init(str(repo), config=RepoConfig() if version == 1 else None)
    core_snapshot(src, repo)

    # Find where bad.txt's and big.bin's blobs live, through the repository's own index.
    r = Repository.open(str(repo))
    assert r.version == version
    info = core_snapshots.resolve(r, "latest")
    table = core_manifest.read_manifest(r, info, columns=["path", "hash"])
    hashes = dict(zip(table["path"].to_pylist(), table["hash"].to_pylist(), strict=True))
    where = {row["hash"]: row for row in core_index.load_index(r).to_pylist()}
    small, large = where[hashes["bad.txt"]], _a_data_blob_of(r, where[hashes["sub/big.bin"]], where)
    assert small["key"].startswith("packs/")
    assert large["key"].startswith("objects/" if version == 1 else "packs/")
    if version == 2:                                       # a chunked file: a chunk of it is damaged
        assert where[hashes["sub/big.bin"]]["type"] == pack.KIND_LIST and large["type"] == pack.KIND_DATA
    _flip_byte(repo / small["key"], small["offset"] + 3)
    _flip_byte(repo / large["key"], large["offset"] + large["length"] // 2)

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
