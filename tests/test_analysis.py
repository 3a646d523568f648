"""``tasks.core.analysis``, ``keepflow stats`` and DuckDB on real repositories.

The repository is made by the real backup steps (``tests.core_helpers``, no
Prefect): four snapshots of a tree whose history is known exactly, so every
answer can be checked against a number worked out here by hand or against
another reader (the files on disk, ``keepflow diff``'s own comparison,
footers). The same repository copied into ``memory://`` must give the same
answers; ``keepflow stats`` is run as the real command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core import analysis, manifest, snapshot_diff, snapshots as core_snapshots
from tasks.core.errors import UsageError
from tasks.core.repository import Repository
from tests import core_helpers
from tests.conftest import KEEPFLOW, age_tree, make_tree

ROOT = Path(__file__).resolve().parent.parent
BIG = os.urandom(2 * 1024 * 1024)  # above the 1 MiB threshold: stored whole under objects/
V1 = {
    "src/a.py": "print('a')\n",
    "src/b.py": "print('b')\n",
    "docs/readme.md": "R" * 1000,
    "docs/copy.md": "R" * 1000,       # same content as readme.md: stored once
    "data/big.bin": BIG,
    "logs/app.log": "x",
    "Makefile": "all:\n",
    "emptydir": None,
    "link": ("link", "Makefile"),
}
LOG = {1: "xx", 2: "xxx", 3: "xxxx"}  # logs/app.log after runs 2, 3, 4: changes every run


def _distinct_size(contents) -> int:
    seen = {c.encode() if isinstance(c, str) else c for c in contents}
    return sum(len(c) for c in seen)


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    src, repo = base / "src", base / "repo"
    make_tree(src, V1)
    age_tree(src)
    core_helpers.backup(src, repo)
    shutil.copytree(repo, base / "copy-after-1")
    # run 2: log changes, a file is added, the duplicate is deleted
    (src / "logs/app.log").write_text(LOG[1])
    (src / "src/c.py").write_text("print('c')\n")
    (src / "docs/copy.md").unlink()
    age_tree(src)
    core_helpers.backup(src, repo)
    shutil.copytree(repo, base / "copy-after-2")
    # run 3: log changes, a.py changes content at the same size
    (src / "logs/app.log").write_text(LOG[2])
    (src / "src/a.py").write_text("print('A')\n")
    age_tree(src)
    core_helpers.backup(src, repo)
    # run 4: log changes, a second copy of the big file (no new storage for it)
    (src / "logs/app.log").write_text(LOG[3])
    (src / "data/big2.bin").write_bytes(BIG)
    age_tree(src)
    core_helpers.backup(src, repo)
    infos = core_snapshots.list_snapshots(Repository.open(str(repo)))
    assert len(infos) == 4
    return {"base": base, "src": src, "repo": str(repo), "infos": infos,
            "copy1": str(base / "copy-after-1"), "copy2": str(base / "copy-after-2")}


@pytest.fixture(scope="module")
def mem_repo(hist):
    """The same repository in memory:// (fsspec's in-process filesystem)."""
    fs = fsspec.filesystem("memory")
    fs.put(hist["repo"], "/analysis-test/repo", recursive=True)
    yield "memory://analysis-test/repo"
    fs.rm("/analysis-test", recursive=True)


def disk_bytes(repo: str, *folders: str) -> dict[str, int]:
    out = {}
    for folder in folders:
        for d, _, files in os.walk(os.path.join(repo, folder)):
            for f in files:
                p = os.path.join(d, f)
                out[os.path.relpath(p, repo)] = os.path.getsize(p)
    return out


# -- snapshots and manifests ---------------------------------------------------------------

def test_load_snapshots_one_row_per_snapshot_from_footers(hist):
    df = analysis.load_snapshots(hist["repo"])
    assert list(df["id"]) == [i.id for i in hist["infos"]]
    assert list(df.columns) == analysis.SNAPSHOT_COLUMNS
    assert list(df["files"]) == [7, 7, 7, 8]
    assert list(df["added"]) == [7, 1, 0, 1]
    assert list(df["deleted"]) == [0, 1, 0, 0]
    assert df["time"].is_monotonic_increasing and str(df["time"].dt.tz) == "UTC"
    assert df["bytes"].iloc[-1] == 2 * len(BIG) + 2000 // 2 + 11 * 3 + len(LOG[3]) + len("all:\n")
    assert df["parent"].iloc[1] == df["id"].iloc[0]
    assert (df["duration_s"] >= 0).all()


def test_load_snapshots_reads_no_rows(hist, monkeypatch):
    def no_rows(*a, **k):
        raise AssertionError("load_snapshots must read footers only")

    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, no_rows)
    monkeypatch.setattr(pq, "read_table", no_rows)
    assert len(analysis.load_snapshots(hist["repo"])) == 4


def test_load_manifests_all_entries_with_a_snapshot_column(hist):
    repo = Repository.open(hist["repo"])
    df = analysis.load_manifests(hist["repo"], columns=["path", "size"])
    assert list(df.columns) == ["snapshot", "path", "size"]
    assert str(df["snapshot"].dtype) == "category"
    expected = sum(manifest.read_manifest(repo, i, columns=["path"]).num_rows for i in hist["infos"])
    assert len(df) == expected
    per = df.groupby("snapshot", observed=True).size()
    for info in hist["infos"]:
        assert per[info.id] == manifest.read_manifest(repo, info, columns=["path"]).num_rows
    latest = df[df["snapshot"] == hist["infos"][-1].id].set_index("path")["size"]
    assert latest["data/big2.bin"] == len(BIG) and latest["logs/app.log"] == len(LOG[3])


def test_load_manifests_chooses_snapshots_types_filters_and_columns(hist):
    import pyarrow.dataset as ds

    first, last = hist["infos"][0], hist["infos"][-1]
    df = analysis.load_manifests(hist["repo"], snapshots=[first.id[:6], "latest"], columns="path", types="file")
    assert set(df["snapshot"]) == {first.id, last.id}
    assert len(df) == 7 + 8
    snaps = analysis.load_snapshots(hist["repo"]).iloc[1:3]
    assert set(analysis.load_manifests(hist["repo"], snapshots=snaps, columns=["type"])["snapshot"]) == set(snaps["id"])
    big = analysis.load_manifests(hist["repo"], columns=["path"], filter=ds.field("size") > 1024 * 1024)
    assert sorted(set(big["path"])) == ["data/big.bin", "data/big2.bin"]
    links = analysis.load_manifests(hist["repo"], "latest", columns=["path", "link_target"], types=["symlink"])
    assert links[["path", "link_target"]].values.tolist() == [["link", "Makefile"]]
    table = analysis.load_manifests(hist["repo"], "latest", columns=["path", "hash"], arrow=True)
    assert isinstance(table, pa.Table) and table.column_names == ["snapshot", "path", "hash"]
    assert pa.types.is_dictionary(table.schema.field("snapshot").type)
    with pytest.raises(UsageError, match="unknown manifest column"):
        analysis.load_manifests(hist["repo"], columns=["path", "nope"])


def test_an_empty_repository_gives_empty_frames(tmp_path):
    Repository.init(str(tmp_path / "empty"))
    url = str(tmp_path / "empty")
    assert analysis.load_snapshots(url).empty
    df = analysis.load_manifests(url, columns=["path", "size"])
    assert df.empty and list(df.columns) == ["snapshot", "path", "size"]
    stats = analysis.dedup_stats(url)
    assert stats.per_snapshot.empty and stats.overall["stored_bytes"] == 0
    assert analysis.churn_by_directory(url).empty and analysis.growth(url).empty
    assert analysis.repository_summary(url)["snapshots"] == 0


# -- differences ---------------------------------------------------------------------------

def test_snapshot_diff_agrees_with_keepflow_diff(hist):
    repo = Repository.open(hist["repo"])
    a, b = hist["infos"][0], hist["infos"][1]
    df = analysis.snapshot_diff(hist["repo"], a.id, b.id[:8])
    core = snapshot_diff.compare(repo, a.id, b.id)
    for kind in ("added", "modified", "deleted"):
        assert sorted(df.loc[df["change"] == kind, "path"]) == sorted(r["path"] for r in core[kind])
    rows = {r.path: r for r in df.itertuples()}
    assert rows["logs/app.log"].old_size == 1 and rows["logs/app.log"].size == 2
    assert rows["src/c.py"].change == "added" and rows["docs/copy.md"].change == "deleted"
    assert rows["docs/copy.md"].size_delta == -1000
    assert df.attrs == {"a": a.id, "b": b.id}
    # same size, new content: still modified; the files only touched by age_tree are not
    d34 = analysis.snapshot_diff(hist["repo"], hist["infos"][1].id, hist["infos"][2].id)
    assert sorted(d34["path"]) == ["logs/app.log", "src/a.py"]


def test_changes_churn_and_files_that_change_every_run(hist):
    ch = analysis.changes(hist["repo"])
    assert ch.attrs["pairs"] == 3
    assert set(ch["snapshot"]) == {i.id for i in hist["infos"][1:]}
    churn = analysis.churn_by_directory(hist["repo"], depth=1)
    assert churn.to_dict("records") == [
        {"directory": "logs", "added": 0, "modified": 3, "deleted": 0, "changes": 3,
         "bytes_written": sum(len(v) for v in LOG.values()), "bytes_deleted": 0},
        {"directory": "src", "added": 1, "modified": 1, "deleted": 0, "changes": 2,
         "bytes_written": 22, "bytes_deleted": 0},
        {"directory": "data", "added": 1, "modified": 0, "deleted": 0, "changes": 1,
         "bytes_written": len(BIG), "bytes_deleted": 0},
        {"directory": "docs", "added": 0, "modified": 0, "deleted": 1, "changes": 1,
         "bytes_written": 0, "bytes_deleted": 1000},
    ]
    every = analysis.frequently_changed(hist["repo"])
    assert every[["path", "times_modified", "runs", "fraction", "last_size"]].values.tolist() == \
        [["logs/app.log", 3, 3, 1.0, 4]]
    sometimes = analysis.frequently_changed(hist["repo"], min_fraction=0.3)
    assert list(sometimes["path"]) == ["logs/app.log", "src/a.py"]
    # only the last two snapshots: one pair
    last_two = [i.id for i in hist["infos"][2:]]
    assert analysis.changes(hist["repo"], last_two).attrs["pairs"] == 1


def test_largest_files_and_folders_and_file_types(hist):
    files = analysis.largest(hist["repo"], n=3)
    assert list(files["path"]) == ["data/big.bin", "data/big2.bin", "docs/readme.md"]
    assert list(files.columns) == ["path", "size", "mtime", "hash"]
    first = analysis.largest(hist["repo"], hist["infos"][0].id[:8], n=3)
    assert list(first["path"]) == ["data/big.bin", "docs/copy.md", "docs/readme.md"]
    dirs = analysis.largest(hist["repo"], by="dirs")
    assert dirs.iloc[0].to_dict() == {"directory": "data", "bytes": 2 * len(BIG), "files": 2}
    assert set(dirs["directory"]) == {"data", "docs", "logs", "src"}
    types = analysis.file_types(hist["repo"]).set_index("extension")
    assert types.loc["bin", "files"] == 2 and types.loc["py", "files"] == 3
    assert types.loc["(none)", "files"] == 1  # Makefile
    assert types.index[0] == "bin" and abs(types["share"].sum() - 1) < 1e-9
    with pytest.raises(UsageError):
        analysis.largest(hist["repo"], by="sizes")


# -- storage -------------------------------------------------------------------------------

def test_dedup_stats_per_snapshot_and_overall(hist):
    stats = analysis.dedup_stats(hist["repo"])
    per, overall = stats.per_snapshot, stats.overall
    v1_contents = [v for v in V1.values() if v is not None and not isinstance(v, tuple)]
    assert per["new_bytes"].iloc[0] == _distinct_size(v1_contents)  # readme.md/copy.md once
    assert per["logical_bytes"].iloc[0] == sum(len(c) for c in v1_contents)
    assert per["dedup_ratio"].iloc[0] > 1  # the duplicate inside snapshot 1
    assert per["new_bytes"].iloc[1] == len(LOG[1]) + len("print('c')\n")
    assert per["new_bytes"].iloc[3] == len(LOG[3])  # big2.bin is a duplicate: nothing new
    # what each backup run says it stored, worked out independently from the index here
    assert list(per["new_bytes"]) == [i.bytes_stored for i in hist["infos"]]
    assert per["stored_bytes_cumulative"].iloc[-1] == overall["referenced_bytes"]
    assert list(per["logical_bytes"]) == [i.bytes for i in hist["infos"]]
    on_disk = disk_bytes(hist["repo"], "packs", "objects")
    assert overall["stored_bytes"] == sum(on_disk.values())
    assert overall["objects"] == 1 and overall["packs"] == sum(k.startswith("packs/") for k in on_disk)
    assert overall["indexed_bytes"] == overall["referenced_bytes"] and overall["unreferenced_bytes"] == 0
    assert overall["missing_blobs"] == 0
    assert overall["logical_bytes"] == sum(i.bytes for i in hist["infos"])
    assert overall["dedup_ratio"] == pytest.approx(overall["logical_bytes"] / overall["stored_bytes"])
    assert overall["dedup_ratio"] > 3.5  # four snapshots of nearly the same data


def test_dedup_stats_for_some_snapshots_counts_older_blobs_as_known(hist):
    last_two = [i.id for i in hist["infos"][2:]]
    per = analysis.dedup_stats(hist["repo"], snapshots=last_two).per_snapshot
    assert list(per["id"]) == last_two
    assert list(per["new_bytes"]) == [i.bytes_stored for i in hist["infos"][2:]]


@pytest.mark.damages_repository
def test_dedup_stats_reports_blobs_missing_from_the_index(hist, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hist["repo"], broken)
    newest = max((broken / "index").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.unlink()  # the last run's index: its one new blob (app.log) is no longer findable
    per = analysis.dedup_stats(str(broken)).per_snapshot
    assert list(per["missing_blobs"]) == [0, 0, 0, 1]
    assert analysis.dedup_stats(str(broken)).overall["missing_blobs"] == 1


def test_growth(hist):
    g = analysis.growth(hist["repo"])
    assert list(g["id"]) == [i.id for i in hist["infos"]]
    assert g["logical_bytes_cumulative"].iloc[-1] == sum(i.bytes for i in hist["infos"])
    assert g["stored_bytes_cumulative"].is_monotonic_increasing
    assert list(g["files_delta"]) == [7, 0, 0, 1]
    assert g["logical_bytes_delta"].iloc[-1] == len(BIG) + 1


def test_same_answers_on_memory_url(hist, mem_repo):
    local, mem = hist["repo"], mem_repo
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(analysis.load_snapshots(local), analysis.load_snapshots(mem))
    pd.testing.assert_frame_equal(analysis.load_manifests(local, columns=["path", "size", "hash"]),
                                  analysis.load_manifests(mem, columns=["path", "size", "hash"]))
    pd.testing.assert_frame_equal(analysis.churn_by_directory(local), analysis.churn_by_directory(mem))
    pd.testing.assert_frame_equal(analysis.largest(local, by="dirs"), analysis.largest(mem, by="dirs"))
    a, b = analysis.dedup_stats(local), analysis.dedup_stats(mem)
    pd.testing.assert_frame_equal(a.per_snapshot, b.per_snapshot)
    assert a.overall == b.overall
    sa, sb = analysis.repository_summary(local), analysis.repository_summary(mem)
    assert {k: v for k, v in sa.items() if k != "repository"} == {k: v for k, v in sb.items() if k != "repository"}


def test_backup_straight_into_memory_url(tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": "one", "b/c.txt": "two", "b/d.txt": "two"})
    age_tree(src)
    url = "memory://analysis-direct/repo"
    try:
        core_helpers.backup(src, url)
        (src / "a.txt").write_text("three")
        age_tree(src)
        core_helpers.backup(src, url)
        assert list(analysis.load_snapshots(url)["files"]) == [3, 3]
        per = analysis.dedup_stats(url).per_snapshot
        assert list(per["new_bytes"]) == [6, 5]
        assert analysis.snapshot_diff(url, analysis.load_snapshots(url).id[0], "latest")["path"].tolist() == ["a.txt"]
    finally:
        fsspec.filesystem("memory").rm("/analysis-direct", recursive=True)


# -- several repositories ------------------------------------------------------------------

def test_replication_status_against_copies(hist, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(hist["repo"], full)
    damaged = tmp_path / "damaged"
    shutil.copytree(hist["repo"], damaged)
    pack = next(p for p in sorted((damaged / "packs").rglob("*")) if p.is_file())
    pack.write_bytes(pack.read_bytes()[:-1])  # same name, wrong size: still lacking
    foreign = tmp_path / "foreign"
    make_tree(foreign, {"holiday.jpg": "not a repository"})
    missing = tmp_path / "not-yet"
    fs = fsspec.filesystem("memory")
    fs.put(hist["copy1"], "/replication-test/replica", recursive=True)
    mem = "memory://replication-test/replica"
    replicas = [hist["copy2"], str(full), str(damaged), str(foreign), str(missing), mem]
    try:
        status = analysis.replication_status(hist["repo"], replicas).set_index("url")
    finally:
        fs.rm("/replication-test", recursive=True)
    primary_data = disk_bytes(hist["repo"], "packs", "objects")
    copy_data = disk_bytes(hist["copy2"], "packs", "objects")
    lacking = {k: s for k, s in primary_data.items() if k not in copy_data}

    c = status.loc[hist["copy2"]]
    ids = [i.id for i in hist["infos"]]
    assert (c.state, c.snapshots, c.missing_snapshots, c.missing_ids) == ("ok", 2, 2, ids[2:])
    assert c.missing_keys == len(lacking) and c.missing_bytes == sum(lacking.values()) > 0
    assert c.missing_index_files == 2 and c.missing_blobs == 3  # runs 3 and 4: a.py, app.log twice
    assert not c.in_sync
    f = status.loc[str(full)]
    assert (f.missing_snapshots, f.missing_keys, f.missing_bytes, f.missing_blobs, f.in_sync) == (0, 0, 0, 0, True)
    d = status.loc[str(damaged)]
    assert (d.missing_snapshots, d.missing_keys, d.missing_bytes) == (0, 1, pack.stat().st_size + 1)
    assert status.loc[str(foreign), "state"].startswith("error")
    assert not status.loc[str(foreign), "in_sync"]
    assert str(status["missing_bytes"].dtype) == "Int64"
    e = status.loc[str(missing)]
    assert (e.state, e.snapshots, e.missing_snapshots, e.missing_bytes) == ("empty", 0, 4, sum(primary_data.values()))
    m = status.loc[mem]
    assert (m.state, m.snapshots, m.missing_ids) == ("ok", 1, ids[1:])
    assert status.attrs["primary_snapshots"] == 4


def test_snapshot_presence_matrix(hist, tmp_path):
    urls = [hist["repo"], hist["copy1"], hist["copy2"], str(tmp_path / "nothing")]
    df = analysis.snapshot_presence(urls)
    assert list(df["id"]) == [i.id for i in hist["infos"]]
    assert df[urls].sum().tolist() == [4, 1, 2, 0]
    assert df[hist["copy2"]].tolist() == [True, True, False, False]


# -- keepflow stats (the real command) --------------------------------------------------------

def run_stats(*args):
    env = dict(os.environ, DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([KEEPFLOW, "stats", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_stats_json(hist):
    proc = run_stats(hist["repo"], "--json", "--last", "2")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    on_disk = disk_bytes(hist["repo"], "packs", "objects")
    assert s["snapshots"] == 4 and s["latest"] == hist["infos"][-1].id
    assert s["files"] == 8 and s["logical_bytes"] == hist["infos"][-1].bytes
    assert s["logical_bytes_all"] == sum(i.bytes for i in hist["infos"])
    assert s["stored_bytes"] == sum(on_disk.values())
    assert s["objects"] == 1 and s["packs"] + s["objects"] == len(on_disk)
    assert s["dedup_ratio"] == round(s["logical_bytes_all"] / s["stored_bytes"], 3)
    g = s["growth"]
    assert g["snapshots"] == 2 and [r["id"] for r in g["rows"]] == [i.id for i in hist["infos"][2:]]
    assert g["from"] == hist["infos"][1].id
    assert g["files_delta"] == 1 and g["stored_bytes_added"] == sum(i.bytes_stored for i in hist["infos"][2:])
    assert s == analysis.repository_summary(hist["repo"], last=2)


def test_stats_text_is_human_readable(hist):
    proc = run_stats(hist["repo"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "snapshots     4" in out
    assert "2.0 MiB" in out and "dedup ratio" in out
    assert "growth over the last 4 snapshots (since the first)" in out
    assert len([line for line in out.splitlines() if line[:8] in {i.short_id for i in hist["infos"]}]) == 4


def test_stats_errors_and_empty_repository(tmp_path):
    proc = run_stats(tmp_path / "nothing-here")
    assert proc.returncode == 10 and proc.stderr.startswith("keepflow: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    Repository.init(str(tmp_path / "empty"))
    proc = run_stats(tmp_path / "empty")
    assert proc.returncode == 0 and "snapshots     0" in proc.stdout
    proc = run_stats(tmp_path / "empty", "--last", "0")
    assert proc.returncode == 2 and "--last" in proc.stderr


def test_stats_imports_neither_prefect_nor_pandas(hist):
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from flows.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["stats", {hist["repo"]!r}, "--json"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "pandas"))
        print(json.dumps({{"rc": rc, "heavy": heavy[:5]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"rc": 0, "heavy": []}


# -- DuckDB, without keepflow ------------------------------------------------------------------

def test_duckdb_reads_the_manifests_directly(hist, tmp_path):
    pytest.importorskip("duckdb")
    glob = f"{hist['repo']}/snapshots/*.parquet"
    code = textwrap.dedent(f"""
        import json, sys
        import duckdb
        per_file = duckdb.sql(\"\"\"
            SELECT count(*) FILTER (type = 'file') AS files, sum(size) FILTER (type = 'file') AS bytes
            FROM read_parquet('{glob}', filename = true) GROUP BY filename ORDER BY filename\"\"\").fetchall()
        biggest = duckdb.sql(\"\"\"
            SELECT DISTINCT path, size FROM read_parquet('{glob}')
            WHERE type = 'file' ORDER BY size DESC, path LIMIT 2\"\"\").fetchall()
        facts = duckdb.sql(\"\"\"
            SELECT json_extract_string(decode(value), '$.id') AS id
            FROM parquet_kv_metadata('{glob}') WHERE decode(key) = 'keepflow.snapshot'
            ORDER BY file_name\"\"\").fetchall()
        print(json.dumps({{"per_file": per_file, "biggest": biggest, "ids": [r[0] for r in facts],
                          "keepflow_loaded": any(m.split(".")[0] in ("tasks", "flows") for m in sys.modules)}}))
    """)
    # run from an empty folder, so nothing of keepflow is importable from the working directory
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["per_file"] == [[i.files, i.bytes] for i in hist["infos"]]
    assert got["biggest"] == [["data/big.bin", len(BIG)], ["data/big2.bin", len(BIG)]]
    assert got["ids"] == [i.id for i in hist["infos"]]
    assert got["keepflow_loaded"] is False
