"""A real installed tree through the real ``keepflow`` command: this environment's site-packages.

Generated trees are tidy; an installed Python environment is not. Its
site-packages holds tens of thousands of files, most of them small, many of
them identical (licences, empty ``__init__.py``, typing stubs), next to large
compiled extensions, and it is present on every machine that can run the
tests. The scenario, all through the CLI against the session's Prefect
server (batches run on the flows' thread pool):

backup -> restore, exact compare -> verify --read-data 100% -> change and
delete files -> backup -> prune (forget the first snapshot, --grace 0, twice)
-> verify --read-data 100% -> restore the surviving snapshot, exact compare.

The tree is copied to tmp_path first, so nothing can change under the test
(Python writes ``__pycache__`` files into site-packages while the suite runs).
The whole of site-packages is copied when it is small enough for the time
budget; otherwise the ``*.dist-info`` folders, the top-level files and whole
packages, most files per byte first, until there are ``TARGET_FILES`` files,
leaving out packages that do not fit in ``BYTES_BUDGET``. Measured here (2
cores shared with other test runs, 900 MB and 38,700 files installed):
creating a file costs about 1 ms on this disk, so the copy and each restore
of 21,000 files take 13-40 s, and the whole tree would take the test far
past its 2-minute budget; 21,000 files of 240 MB keep it near it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sysconfig
from pathlib import Path

import blake3
import pytest

from tests.conftest import age_tree
from tests.treecompare import Difference, compare, format_differences

MiB = 1 << 20
SITE = Path(sysconfig.get_paths()["purelib"])
MIN_FILES, MIN_BYTES = 20_000, 30 * MiB          # what the scenario must cover to mean something
WHOLE_FILES, WHOLE_BYTES = 40_000, 500 * MiB     # copy all of site-packages below both
TARGET_FILES, BYTES_BUDGET = 21_000, 240 * MiB  # otherwise: packages, most files first, within the budget
# Python's own bytecode writer: <name>.pyc.<number> exists for an instant, then
# is renamed; a copy must not trip over one vanishing.
SKIP_WHILE_COPYING = shutil.ignore_patterns("*.pyc.[0-9]*")


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under ``root``, symlinks not followed."""
    files = size = 0
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def choose_entries(site: Path) -> list[str]:
    """Top-level names of ``site`` to copy (all of them if the whole is within budget)."""
    sizes = {}
    for entry in sorted(os.listdir(site)):
        path = site / entry
        sizes[entry] = tree_size(path) if path.is_dir() and not path.is_symlink() else (1, os.lstat(path).st_size)
    files = sum(f for f, _ in sizes.values())
    if files <= WHOLE_FILES and sum(b for _, b in sizes.values()) <= WHOLE_BYTES:
        return sorted(sizes)
    chosen = [e for e in sizes if e.endswith(".dist-info") or not (site / e).is_dir()]
    count = sum(sizes[e][0] for e in chosen)
    # Most files per byte first: many small files are what makes a tree awkward.
    packages = sorted((e for e in sizes if e not in chosen and e != "__pycache__"),
                      key=lambda e: (-sizes[e][0] / max(sizes[e][1], 1), e))
    nbytes = sum(sizes[e][1] for e in chosen)
    for entry in packages:
        if count >= TARGET_FILES:
            break
        if nbytes + sizes[entry][1] <= BYTES_BUDGET:
            chosen.append(entry)
            count += sizes[entry][0]
            nbytes += sizes[entry][1]
    return sorted(chosen)


def copy_site_packages(dest: Path) -> list[str]:
    dest.mkdir()
    chosen = choose_entries(SITE)
    for entry in chosen:
        path = SITE / entry
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, dest / entry, symlinks=True, ignore=SKIP_WHILE_COPYING)
        else:
            shutil.copy2(path, dest / entry, follow_symlinks=False)
    return chosen


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if p.is_file() and not p.is_symlink())


def add_awkward_entries(src: Path, first: str, last: str) -> int:
    """Symlinks of every kind, identical content far apart, odd modes; returns the duplicated bytes."""
    some_file = python_files(src / first)[0]
    extras = src / "zz-keepflow-extras"
    extras.mkdir()
    os.symlink(os.path.relpath(some_file, extras), extras / "relative-link")
    os.symlink(str(some_file), extras / "absolute-link")
    os.symlink("no/such/file", extras / "dangling-link")
    os.symlink(f"../{first}", extras / "link-to-a-folder")
    small, large = os.urandom(300_000), os.urandom(3 * MiB + 17)   # a packed blob and a whole object
    deep = src / first / "kf-deep" / "a" / "b"
    deep.mkdir(parents=True)
    for folder in (deep, src / last):
        (folder / "kf-same-small.bin").write_bytes(small)
        (folder / "kf-same-large.bin").write_bytes(large)
    private = extras / "private"
    private.mkdir(mode=0o700)
    (private / "secret.txt").write_text("only for the owner\n")
    os.chmod(private / "secret.txt", 0o600)
    (extras / "empty-folder").mkdir()
    (extras / "empty-file").write_bytes(b"")
    return len(small) + len(large)


def unique_content_bytes(root: Path) -> int:
    """Bytes of distinct file contents (what a deduplicating store must write)."""
    by_size: dict[int, list[str]] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                by_size.setdefault(os.lstat(path).st_size, []).append(path)
    total = 0
    for size, paths in by_size.items():
        if len(paths) == 1 or size == 0:
            total += size
            continue
        digests = {blake3.blake3().update_mmap(p).hexdigest() for p in paths}
        total += size * len(digests)
    return total


def run_json(cli, *args) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, f"keepflow {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


def assert_verified_clean(cli, repo: Path) -> dict:
    result = run_json(cli, "verify", repo, "--read-data", "100%")
    assert result["problems"] == []
    assert result["keys_read"] == result["keys"] > 0 and result["bytes_read"] > 0
    return result


def assert_same_tree(expected: Path, actual: Path) -> None:
    diffs = compare(expected, actual, owner=True)   # the copy and the restore are both ours (or root's)
    assert diffs == [], format_differences(diffs)


@pytest.mark.slow
def test_site_packages_round_trip_through_backup_prune_and_restore(tmp_path, cli, cli_env):
    # Exactly once per content needs one known-blob set: batches in two child
    # processes (the default) may each store a content first met at the same
    # time (1.5% more bytes on this tree, measured), so this test keeps them in
    # the command's process; tests/test_batch_processes.py covers the children.
    cli_env["KEEPFLOW_BATCH_PROCESSES"] = "0"
    src, repo = tmp_path / "src", tmp_path / "repo"
    packages = [e for e in copy_site_packages(src) if (src / e).is_dir() and not e.endswith(".dist-info")
                and python_files(src / e)]
    assert len(packages) >= 3, packages
    edited, last = packages[0], packages[-1]
    gone = max(packages[1:-1], key=lambda e: tree_size(src / e)[1])   # the most bytes: whole packs die
    duplicated = add_awkward_entries(src, edited, last)
    age_tree(src)
    files, size = tree_size(src)
    assert files >= MIN_FILES and size >= MIN_BYTES, (files, size)

    first = run_json(cli, "backup", src, repo)
    assert first["exit_code"] == 0 and first["skipped"] == []
    assert first["files_new"] == files and first["bytes_read"] == size
    # Stored once per content: licences, empty files, the pairs planted far apart.
    unique = unique_content_bytes(src)
    assert unique <= size - duplicated
    assert first["bytes_stored"] == unique

    out1 = tmp_path / "restore-1"
    restored = run_json(cli, "restore", repo, out1)
    assert restored["errors"] == [] and restored["files_written"] == files
    assert_same_tree(src, out1)
    shutil.rmtree(out1)                  # 240 MB less for pytest to keep (and to walk at teardown)
    assert_verified_clean(cli, repo)

    # Garbage for prune: a whole package and one copy of each planted pair go,
    # some files change (not aged again: that would change every ctime and make
    # the backup re-read everything).
    deleted = tree_size(src / gone)[0] + 2
    shutil.rmtree(src / gone)
    (src / last / "kf-same-large.bin").unlink()
    (src / last / "kf-same-small.bin").unlink()
    changed = python_files(src / edited)[:50]
    for p in changed:
        p.write_bytes(p.read_bytes() + b"\n# changed by test_real_tree\n")

    second = run_json(cli, "backup", src, repo)
    assert second["exit_code"] == 0 and second["parent"] == first["snapshot"]
    assert second["files_changed"] == len(changed) and second["files_deleted"] == deleted
    assert second["bytes_read"] < size // 10                 # the parent was trusted: only changes read

    prunes = [run_json(cli, "prune", repo, "--keep-last", "1", "--grace", "0") for _ in range(2)]
    assert [s["id"] for s in prunes[0]["forgotten"]] == [first["snapshot"]] and prunes[1]["forgotten"] == []
    assert sum(p["swept"]["keys_deleted"] for p in prunes) > 0 and sum(p["bytes_freed"] for p in prunes) > 0
    assert prunes[1]["swept"]["index_files_after"] == 1            # compacted into one index file
    assert [s["id"] for s in run_json(cli, "snapshots", repo)] == [second["snapshot"]]
    assert_verified_clean(cli, repo)

    out2 = tmp_path / "restore-2"
    restored = run_json(cli, "restore", repo, out2)
    assert restored["errors"] == [] and restored["files"] == files - deleted
    assert_same_tree(src, out2)
    shutil.rmtree(out2)


# -- the comparison helper finds what it claims to find ---------------------------------

def test_treecompare_reports_every_property(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "d").mkdir(parents=True)
        (root / "same").write_bytes(b"x" * 5000)
        (root / "content").write_bytes(b"abcdef")
        (root / "size").write_bytes(b"abc")
        (root / "mode").write_bytes(b"m")
        (root / "kind").write_bytes(b"k")
        (root / "mtime").write_bytes(b"t")
        os.symlink("same", root / "link")
    (a / "only-a").write_bytes(b"")
    (b / "only-b").write_bytes(b"")
    (b / "content").write_bytes(b"abcXef")
    (b / "size").write_bytes(b"abcd")
    os.chmod(b / "mode", 0o600)
    (b / "kind").unlink()
    (b / "kind").mkdir()
    (b / "link").unlink()
    os.symlink("other", b / "link")
    for root in (a, b):                       # one mtime everywhere, but for the one that differs
        for p in root.iterdir():
            os.utime(p, ns=(0, 10**18), follow_symlinks=False)
    os.utime(b / "mtime", ns=(0, 10**18 + 1))
    os.utime(b, ns=(0, 1))                    # the roots themselves are not compared
    diffs = compare(a, b)
    assert {(d.path, d.prop) for d in diffs} == {
        ("only-a", "missing"), ("only-b", "extra"), ("content", "content"), ("size", "size"),
        ("mode", "mode"), ("kind", "type"), ("mtime", "mtime_ns"), ("link", "link_target")}
    assert Difference("content", "content", None, 3) in diffs
    assert "content: content differs at byte 3" in format_differences(diffs)
    assert compare(a, a) == []
    assert {d.prop for d in compare(a, b, mtimes=False, modes=False)} == {"missing", "extra", "content", "size",
                                                                           "type", "link_target"}
