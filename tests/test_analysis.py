"""``keepflow.tasks.core.analysis``, ``keepflow stats``, ``keepflow diff`` and DuckDB on real repositories.

The repository is made by the real backup steps (``tests.core_helpers``, no
Prefect): four snapshots of a tree whose history is known exactly, so every
answer can be checked against a number worked out here by hand or against
another reader (the files on disk, ``keepflow diff``'s own comparison, the
snapshot facts, the index files). It is built three times: format 2
encrypted (what ``init`` makes), format 2 with ``--encryption none`` (plain
Parquet manifests with binary ids) and format 1; the checks that depend on a
format's internals (format 1's ``objects/``, stored bytes equal to raw bytes,
DuckDB reading Parquet in place) say which format they are about. The same
repository copied into ``memory://`` must give the same answers; ``keepflow
stats`` and ``keepflow diff`` are run as the real commands. A second history
holds a 5 MiB file and a copy of it with a small change, for the figures on
chunked files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keepflow.tasks.core import analysis, manifest, snapshot_diff
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core import snapshots as core_snapshots
from keepflow.tasks.core.errors import DamagedManifestError, UsageError
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import KEEPFLOW, TEST_PASSWORD, age_tree, make_tree

ROOT = Path(__file__).resolve().parent.parent
BIG = os.urandom(2 * 1024 * 1024)  # above the 1 MiB threshold: format 1 stores it whole under objects/,
                                    # format 2 cuts it into chunks
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
TAG = 16                              # AES-GCM tag: an encrypted blob's stored length is its payload + 16
FORMATS = {
    "v2": lambda: RepoConfig.new_v2(),                        # encrypted, compressed, chunked
    "v2-plain": lambda: RepoConfig.new_v2(encryption="none"),  # the same, plaintext Parquet manifests
    "v1": lambda: RepoConfig(),                               # format 1
}


def _distinct_size(contents) -> int:
    seen = {c.encode() if isinstance(c, str) else c for c in contents}
    return sum(len(c) for c in seen)


def init(url, fmt: str) -> str:
    Repository.init(str(url), config=FORMATS[fmt]())
    return str(url)


@pytest.fixture(scope="module", params=list(FORMATS))
def hist(request, tmp_path_factory):
    fmt = request.param
    base = tmp_path_factory.mktemp(f"analysis-{fmt}")
    src, repo = base / "src", base / "repo"
    init(repo, fmt)
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
    opened = Repository.open(str(repo))
    assert (opened.version, opened.encrypted) == {"v2": (2, True), "v2-plain": (2, False), "v1": (1, False)}[fmt]
    infos = core_snapshots.list_snapshots(opened)
    assert len(infos) == 4
    return {"base": base, "src": src, "repo": str(repo), "infos": infos, "format": fmt,
            "version": opened.version, "encrypted": opened.encrypted,
            "copy1": str(base / "copy-after-1"), "copy2": str(base / "copy-after-2")}


@pytest.fixture(scope="module")
def mem_repo(hist):
    """The same repository in memory:// (fsspec's in-process filesystem)."""
    fs = fsspec.filesystem("memory")
    where = f"/analysis-test-{hist['format']}/repo"
    fs.put(hist["repo"], where, recursive=True)
    yield f"memory:/{where}"
    fs.rm(where.rsplit("/", 1)[0], recursive=True)


def disk_bytes(repo: str, *folders: str) -> dict[str, int]:
    out = {}
    for folder in folders:
        for d, _, files in os.walk(os.path.join(repo, folder)):
            for f in files:
                p = os.path.join(d, f)
                out[os.path.relpath(p, repo)] = os.path.getsize(p)
    return out


def runs_in_order(repo_url: str) -> list[dict]:
    """Per backup run, oldest first, from its index file alone: the blobs it stored
    (stored lengths) and the pack files it wrote (sizes on disk)."""
    repo = Repository.open(repo_url)
    names = sorted(indexmod.list_index_names(repo),
                   key=lambda n: os.stat(os.path.join(repo_url, "index", n)).st_mtime_ns)
    out = []
    for n in names:
        rows = indexmod.read_index_files(repo, [n])
        keys = set(rows["key"].to_pylist())
        out.append({"blobs": rows.num_rows, "blob_bytes": sum(rows["length"].to_pylist()),
                    "pack_bytes": sum(os.path.getsize(os.path.join(repo_url, k)) for k in keys)})
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
    assert list(df["bytes_written"]) == [i.bytes_written for i in hist["infos"]] and (df["bytes_written"] > 0).all()
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


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_empty_repository_gives_empty_frames(tmp_path, fmt):
    url = init(tmp_path / "empty", fmt)
    assert analysis.load_snapshots(url).empty
    df = analysis.load_manifests(url, columns=["path", "size"])
    assert df.empty and list(df.columns) == ["snapshot", "path", "size"]
    stats = analysis.dedup_stats(url)
    assert stats.per_snapshot.empty and stats.overall["stored_bytes"] == 0
    assert analysis.churn_by_directory(url).empty and analysis.growth(url).empty
    assert analysis.repository_summary(url)["snapshots"] == 0
    con = analysis.duckdb(url)
    assert con.sql("SELECT count(*) FROM entries").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM snapshots").fetchall() == [(0,)]


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
    # raw sizes (before compression): the same in every format
    assert per["unique_raw_bytes"].iloc[0] == _distinct_size(v1_contents)  # readme.md/copy.md once
    assert per["logical_bytes"].iloc[0] == sum(len(c) for c in v1_contents)
    assert per["dedup_ratio"].iloc[0] == pytest.approx(per["logical_bytes"].iloc[0] / _distinct_size(v1_contents))
    assert per["dedup_ratio"].iloc[0] > 1  # the duplicate inside snapshot 1
    assert list(per["new_blobs"])[1:] == [2, 2, 1]  # (app.log, c.py), (app.log, a.py), app.log; big2.bin is known
    assert list(per["logical_bytes"]) == [i.bytes for i in hist["infos"]]
    assert per["stored_bytes_cumulative"].iloc[-1] == overall["referenced_bytes"]
    # what each run stored, worked out independently from its own index file and pack files,
    # and what the run recorded: the plaintext of its new data, the bytes it wrote
    runs = runs_in_order(hist["repo"])
    assert list(per["new_bytes"]) == [r["blob_bytes"] for r in runs]
    assert list(per["new_blobs"]) == [r["blobs"] for r in runs]
    assert list(per["new_raw_bytes"]) == [i.bytes_stored for i in hist["infos"]]
    assert [i.bytes_written for i in hist["infos"]] == [r["pack_bytes"] for r in runs]
    on_disk = disk_bytes(hist["repo"], "packs", "objects")
    assert overall["stored_bytes"] == sum(on_disk.values())
    assert overall["indexed_bytes"] == overall["referenced_bytes"] and overall["unreferenced_bytes"] == 0
    assert overall["missing_blobs"] == 0 and overall["unreadable_lists"] == 0
    assert overall["logical_bytes"] == sum(i.bytes for i in hist["infos"])
    assert overall["dedup_ratio"] == pytest.approx(overall["logical_bytes"] / overall["stored_bytes"])
    assert overall["dedup_ratio"] > 3.5  # four snapshots of nearly the same data
    if hist["version"] == 1:
        # format 1 stores blobs as they are: stored = raw, the big file whole under objects/,
        # and what a run says it stored is exactly its new blobs
        assert list(per["new_bytes"]) == [i.bytes_stored for i in hist["infos"]]
        assert per["new_bytes"].iloc[0] == _distinct_size(v1_contents)
        assert per["new_bytes"].iloc[1] == len(LOG[1]) + len("print('c')\n")
        assert per["new_bytes"].iloc[3] == len(LOG[3])  # big2.bin is a duplicate: nothing new
        assert list(per["unique_bytes"]) == list(per["unique_raw_bytes"])
        assert overall["objects"] == 1 and overall["packs"] == sum(k.startswith("packs/") for k in on_disk)
        assert overall["lists_read"] == 0
    else:
        # format 2: no objects/; a run stores its pack files, each blob inside is its payload
        # (+ the tag when encrypted), the pack's header comes on top
        assert overall["objects"] == 0 and all(k.startswith("packs/") for k in on_disk)
        assert all(r["blob_bytes"] < r["pack_bytes"] for r in runs)             # the packs' headers
        tag = TAG if hist["encrypted"] else 0
        assert per["new_bytes"].iloc[3] == len(LOG[3]) + tag          # too small to compress
        assert per["new_bytes"].iloc[1] == len(LOG[1]) + len("print('c')\n") + 2 * tag
        # "R" * 1000 compresses: snapshot 1 takes less than its raw content, despite the tags
        assert per["unique_bytes"].iloc[0] < per["unique_raw_bytes"].iloc[0]
        summary = analysis.repository_summary(hist["repo"])
        assert overall["lists_read"] == summary["chunk_lists"]      # big.bin's list, if it has one


def test_dedup_stats_for_some_snapshots_counts_older_blobs_as_known(hist):
    last_two = [i.id for i in hist["infos"][2:]]
    per = analysis.dedup_stats(hist["repo"], snapshots=last_two).per_snapshot
    assert list(per["id"]) == last_two
    full = analysis.dedup_stats(hist["repo"]).per_snapshot
    assert list(per["new_bytes"]) == list(full["new_bytes"].iloc[2:])
    assert list(per["new_blobs"]) == [2, 1]
    if hist["version"] == 1:
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


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_backup_straight_into_memory_url(tmp_path, fmt):
    src = make_tree(tmp_path / "src", {"a.txt": "one", "b/c.txt": "two", "b/d.txt": "two"})
    age_tree(src)
    url = f"memory://analysis-direct-{fmt}/repo"
    try:
        init(url, fmt)
        core_helpers.backup(src, url)
        (src / "a.txt").write_text("three")
        age_tree(src)
        core_helpers.backup(src, url)
        assert list(analysis.load_snapshots(url)["files"]) == [3, 3]
        per = analysis.dedup_stats(url).per_snapshot
        tag = TAG if fmt == "v2" else 0   # blobs this small are never compressed
        assert list(per["new_blobs"]) == [2, 1]
        assert list(per["new_bytes"]) == [6 + 2 * tag, 5 + tag]
        assert list(per["new_raw_bytes"]) == [6, 5]
        assert list(per["unique_raw_bytes"]) == [6, 8]
        assert analysis.snapshot_diff(url, analysis.load_snapshots(url).id[0], "latest")["path"].tolist() == ["a.txt"]
    finally:
        fsspec.filesystem("memory").rm(f"/analysis-direct-{fmt}", recursive=True)


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
    assert (c.missing_key_files, c.extra_key_files) == (0, 0)
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
    if hist["encrypted"]:
        assert e.missing_key_files == len(os.listdir(os.path.join(hist["repo"], "keys"))) == 1


@pytest.mark.parametrize("hist", ["v2"], indirect=True)     # only an encrypted repository has key files
def test_replication_status_compares_key_files(hist, tmp_path):
    """Format 2 replicas mirror keys/: a password added (or revoked) on one side only is not in sync."""
    assert hist["encrypted"]
    from keepflow.tasks.core import keyring

    replica = tmp_path / "replica"
    shutil.copytree(hist["repo"], replica)
    keyring.add_key(Repository.open(str(replica)), "a second password")
    status = analysis.replication_status(hist["repo"], [str(replica)]).set_index("url").loc[str(replica)]
    assert (status.missing_key_files, status.extra_key_files, status.missing_keys) == (0, 1, 0)
    assert not status.in_sync
    back = analysis.replication_status(str(replica), [hist["repo"]]).set_index("url").loc[hist["repo"]]
    assert (back.missing_key_files, back.extra_key_files, back.in_sync) == (1, 0, False)


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
    assert s["packs"] + s["objects"] == len(on_disk)
    assert s["dedup_ratio"] == round(s["logical_bytes_all"] / s["stored_bytes"], 3)
    index = indexmod.load_index(Repository.open(hist["repo"]))
    assert (s["blobs"], s["blob_bytes"]) == (index.num_rows, sum(index["length"].to_pylist()))
    assert s["format"] == hist["version"]
    if hist["version"] == 1:
        assert s["objects"] == 1 and s["encryption"] is None and s["chunk_lists"] == 0
        assert s["blob_raw_bytes"] == s["blob_bytes"]
    else:
        assert s["objects"] == 0 and s["encryption"] == ("aes-256-gcm" if hist["encrypted"] else "none")
        kinds = index["type"].to_pylist()
        assert s["chunk_lists"] == kinds.count(1)
        raw = index["raw_length"].to_pylist()
        assert s["blob_raw_bytes"] == sum(r for r, k in zip(raw, kinds, strict=True) if k == 0)
        # every distinct content once, before compression: files and chunks alike
        distinct = {p.read_bytes() for p in hist["src"].rglob("*") if p.is_file() and not p.is_symlink()}
        distinct |= {(c.encode() if isinstance(c, str) else c) for c in [*LOG.values(), V1["logs/app.log"],
                                                                          V1["src/a.py"], V1["docs/copy.md"]]}
        assert s["blob_raw_bytes"] == sum(len(c) for c in distinct)
    g = s["growth"]
    assert g["snapshots"] == 2 and [r["id"] for r in g["rows"]] == [i.id for i in hist["infos"][2:]]
    assert g["from"] == hist["infos"][1].id
    assert g["files_delta"] == 1 and g["stored_bytes_added"] == sum(i.bytes_stored for i in hist["infos"][2:])
    assert g["written_bytes_added"] == sum(i.bytes_written for i in hist["infos"][2:])
    assert [r["bytes_written"] for r in g["rows"]] == [i.bytes_written for i in hist["infos"][2:]]
    assert s == analysis.repository_summary(hist["repo"], last=2)


def test_stats_text_is_human_readable(hist):
    proc = run_stats(hist["repo"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "snapshots     4" in out
    assert "2.0 MiB" in out and "dedup ratio" in out
    expected = {"v2": "format 2, aes-256-gcm", "v2-plain": "format 2, not encrypted", "v1": "format 1"}
    assert expected[hist["format"]] in out.splitlines()[0]
    if hist["version"] >= 2:
        assert "before compression" in out and "objects" not in out
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
    # The process ends as the `keepflow` command ends (shut_down: os._exit after the shutdown hooks), not
    # with interpreter teardown, where Arrow's thread pools now and then abort the process after all
    # the work is done ("terminate called without an active exception", apache/arrow#34314; seen once
    # here under load).
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from keepflow.flows.cli import main, shut_down
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["stats", {hist["repo"]!r}, "--json"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "pandas"))
        print(json.dumps({{"rc": rc, "heavy": heavy[:5]}}))
        shut_down(0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"rc": 0, "heavy": []}


# -- DuckDB ----------------------------------------------------------------------------------------

def test_duckdb_views_give_the_pyarrow_answers(hist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # DuckDB's default spill folder would be ./.tmp
    con = analysis.duckdb(hist["repo"])
    infos = hist["infos"]
    # snapshots: the SnapshotInfo fields, one row per snapshot
    got = con.sql("SELECT * FROM snapshots ORDER BY time").to_arrow_table().to_pylist()
    assert [r["id"] for r in got] == [i.id for i in infos]
    for row, info in zip(got, infos, strict=True):
        assert set(row) == set(manifest.SnapshotInfo.__dataclass_fields__)
        assert row["time"].isoformat() == info.datetime.astimezone(row["time"].tzinfo).isoformat()
        assert {k: row[k] for k in ("files", "bytes", "parent", "tags", "key", "bytes_stored", "start_ns")} == \
            {k: getattr(info, k) for k in ("files", "bytes", "parent", "tags", "key", "bytes_stored", "start_ns")}
    # entries: every manifest row, the same as load_manifests, plus the snapshot's time
    arrow = analysis.load_manifests(hist["repo"], arrow=True)
    expected = arrow.set_column(0, "snapshot", arrow["snapshot"].cast(pa.string())).sort_by(
        [("snapshot", "ascending"), ("path", "ascending")]).to_pylist()
    rows = con.sql("SELECT * EXCLUDE (time) FROM entries ORDER BY snapshot, path").to_arrow_table().to_pylist()
    assert rows == expected
    assert con.sql("SELECT count(*) FROM entries").fetchall()[0][0] == arrow.num_rows
    per = con.sql("""SELECT snapshot, count(*) FILTER (type = 'file'), sum(size) FILTER (type = 'file')
                     FROM entries GROUP BY snapshot ORDER BY min(time)""").fetchall()
    assert per == [(i.id, i.files, i.bytes) for i in infos]
    joined = con.sql("""SELECT count(*) FROM entries e JOIN snapshots s ON e.snapshot = s.id
                        WHERE e.time = s.time""").fetchall()[0][0]
    assert joined == arrow.num_rows
    # hash is the content id in hex, as keepflow shows it everywhere
    big = con.sql("SELECT DISTINCT hash FROM entries WHERE path LIKE 'data/big%'").fetchall()
    assert len(big) == 1 and re.fullmatch(r"[0-9a-f]{64}", big[0][0])
    assert big[0][0] == analysis.largest(hist["repo"], n=1)["hash"].iloc[0]
    # nothing decrypted can reach the disk: no spilling for an encrypted repository
    spill = con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0]
    assert (spill == "") == hist["encrypted"]
    assert not any(tmp_path.iterdir())


def test_duckdb_for_some_snapshots_and_columns(hist):
    first, last = hist["infos"][0], hist["infos"][-1]
    con = analysis.duckdb(hist["repo"], snapshots=[first.id[:8], "latest"], columns=["path", "size"])
    assert [c[0] for c in con.sql("DESCRIBE entries").fetchall()] == ["snapshot", "time", "path", "size"]
    repo = Repository.open(hist["repo"])
    rows = {i.id: manifest.read_manifest(repo, i, columns=["path"]).num_rows for i in (first, last)}
    assert con.sql("SELECT snapshot, count(*) FROM entries GROUP BY ALL ORDER BY 1").fetchall() == sorted(rows.items())
    assert con.sql("SELECT count(*) FROM snapshots").fetchall() == [(4,)]     # the listing is always whole


def _readme_duckdb_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### DuckDB")
    return text[start: text.index("\n## ", start)]


def test_the_readme_duckdb_examples_run(hist, capsys):
    """Every query of the README's DuckDB section runs: the Python ones on every repository
    (an encrypted one too), the plain read_parquet ones on plaintext repositories."""
    section = _readme_duckdb_section()
    blocks = re.findall(r"```(python|sql)\n(.*?)```", section, flags=re.S)
    python = [b for kind, b in blocks if kind == "python"]
    sql = [b for kind, b in blocks if kind == "sql"]
    assert python and sql and "ka.duckdb(" in python[0]
    for code in python:
        exec(compile(code.replace("/backups/repo", hist["repo"]), "README.md", "exec"), {})
    shown = capsys.readouterr().out
    assert hist["infos"][-1].id in shown and "logs/app.log" in shown
    if hist["encrypted"]:
        return
    import duckdb

    statements = "\n".join(line for block in sql for line in block.splitlines() if not line.lstrip().startswith("--"))
    queries = [q for q in statements.split(";") if q.strip()]
    assert len(queries) >= 2
    for query in queries:
        assert duckdb.sql(query.replace("/backups/repo", hist["repo"])).fetchall()


@pytest.mark.parametrize("hist", ["v2-plain", "v1"], indirect=True)   # encrypted ones: analysis.duckdb
def test_duckdb_reads_plaintext_manifests_directly(hist, tmp_path):
    """Format 1 and format 2 with --encryption none: the manifests are Parquet, readable in place."""
    assert not hist["encrypted"]
    glob = f"{hist['repo']}/snapshots/*.parquet"
    hash_hex = "lower(hex(hash))" if hist["version"] >= 2 else "hash"   # format 2 stores 32 bytes
    code = textwrap.dedent(f"""
        import json, sys
        import duckdb
        per_file = duckdb.sql(\"\"\"
            SELECT count(*) FILTER (type = 'file') AS files, sum(size) FILTER (type = 'file') AS bytes
            FROM read_parquet('{glob}', filename = true) GROUP BY filename ORDER BY filename\"\"\").fetchall()
        biggest = duckdb.sql(\"\"\"
            SELECT DISTINCT path, size, {hash_hex} FROM read_parquet('{glob}')
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
    content = analysis.largest(hist["repo"], n=1)["hash"].iloc[0]
    assert got["biggest"] == [["data/big.bin", len(BIG), content], ["data/big2.bin", len(BIG), content]]
    assert got["ids"] == [i.id for i in hist["infos"]]
    assert got["keepflow_loaded"] is False


@pytest.mark.parametrize("hist", ["v2"], indirect=True)
def test_an_encrypted_manifest_is_not_parquet(hist):
    """What the storage holds for an encrypted repository says nothing to a Parquet reader."""
    assert hist["encrypted"]
    names = os.listdir(os.path.join(hist["repo"], "snapshots"))
    assert len(names) == 4 and not any(n.endswith(".parquet") for n in names)
    with pytest.raises(pa.ArrowInvalid):
        pq.read_schema(os.path.join(hist["repo"], "snapshots", names[0]))


@pytest.mark.damages_repository
def test_a_damaged_manifest_is_named(hist, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hist["repo"], broken)
    victim = broken / "snapshots" / hist["infos"][1].key
    data = bytearray(victim.read_bytes())
    if hist["version"] >= 2:
        data[len(data) // 3] ^= 0xFF              # inside the rows: fails the tag, or the name's BLAKE3
    else:
        del data[-100:]                           # format 1 checks nothing: cut off the Parquet footer
    victim.write_bytes(bytes(data))
    with pytest.raises(DamagedManifestError, match=hist["infos"][1].id[:8]):
        analysis.load_manifests(str(broken), columns=["path", "size"])
    with pytest.raises(DamagedManifestError, match=hist["infos"][1].id[:8]):
        snapshot_diff.compare(Repository.open(str(broken)), hist["infos"][0].id, hist["infos"][1].id)


# -- keepflow diff (the real command) -----------------------------------------------------------------

def test_keepflow_diff_command(hist):
    a, b = hist["infos"][1], hist["infos"][3]
    env = dict(os.environ, DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([KEEPFLOW, "diff", hist["repo"], a.id[:8], b.id[:8], "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["summary"]["added"] == 1 and [r["path"] for r in got["added"]] == ["data/big2.bin"]
    assert sorted(r["path"] for r in got["modified"]) == ["logs/app.log", "src/a.py"]
    df = analysis.snapshot_diff(hist["repo"], a.id, b.id)
    assert sorted(df["path"]) == sorted(r["path"] for k in ("added", "modified", "deleted") for r in got[k])
    text = subprocess.run([KEEPFLOW, "diff", hist["repo"], a.id[:8], b.id[:8]], capture_output=True, text=True,
                          env=env, timeout=120)
    assert text.returncode == 0 and "1 added, 2 modified, 0 deleted" in text.stdout
    if hist["encrypted"]:
        env.pop("KEEPFLOW_PASSWORD")
        proc = subprocess.run([KEEPFLOW, "diff", hist["repo"], a.id[:8], b.id[:8]], capture_output=True,
                              text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 10 and "password" in proc.stderr
        assert TEST_PASSWORD not in proc.stderr + proc.stdout


# -- chunked files (format 2) ----------------------------------------------------------------------------

BIG5 = 5 * 1024 * 1024


def _chunks(repo: Repository, data: bytes) -> list[tuple[str, int]]:
    """The file's chunks, cut and named here with the repository's own chunker and keys."""
    from keepflow.tasks.core import store_v2

    view = memoryview(data)
    pos = 0

    def read(n):
        nonlocal pos
        out = bytes(view[pos:pos + n])
        pos += len(out)
        return out

    return [(repo.keys.blob_id(c), len(c)) for c in store_v2.chunker_for(repo).iter_chunks(read)]


@pytest.fixture(scope="module", params=["v2", "v1"])
def chunked(request, tmp_path_factory):
    """Snapshot 1: a random 5 MiB file. Snapshot 2: the same and a copy with a few bytes changed
    in the middle of one of its chunks (format 2 stores that chunk again, format 1 the whole file)."""
    fmt = request.param
    base = tmp_path_factory.mktemp(f"chunked-{fmt}")
    url = init(base / "repo", fmt)
    repo = Repository.open(url)
    original = os.urandom(BIG5)
    changed = bytearray(original)
    if repo.version >= 2:
        cuts = _chunks(repo, original)
        assert len(cuts) >= 3
        k = min(range(1, len(cuts) - 1), key=lambda i: cuts[i][1])   # an inner chunk, the smallest
        at = sum(n for _, n in cuts[:k]) + cuts[k][1] // 2
    else:
        at = BIG5 // 2
    changed[at:at + 8] = os.urandom(8)
    changed = bytes(changed)
    src = make_tree(base / "src", {"big.bin": original, "small.txt": "small\n"})
    age_tree(src)
    core_helpers.backup(src, url)
    (src / "copy.bin").write_bytes(changed)
    age_tree(src)
    core_helpers.backup(src, url)
    return {"url": url, "repo": repo, "format": fmt, "original": original, "changed": changed,
            "infos": core_snapshots.list_snapshots(repo)}


def test_stored_bytes_reflect_chunk_level_dedup(chunked):
    per, overall = (lambda s: (s.per_snapshot, s.overall))(analysis.dedup_stats(chunked["url"]))
    assert list(per["logical_bytes"]) == [BIG5 + 6, 2 * BIG5 + 6]
    assert list(per["files"]) == [2, 3]
    if chunked["format"] == "v1":
        # whole-file blobs: the copy is a new 5 MiB blob
        assert per["new_bytes"].iloc[1] == BIG5
        assert per["unique_raw_bytes"].iloc[1] == 2 * BIG5 + 6
        return
    repo = chunked["repo"]
    a, b = _chunks(repo, chunked["original"]), _chunks(repo, chunked["changed"])
    known = {cid for cid, _ in a}
    fresh = {cid: n for cid, n in b if cid not in known}
    assert 1 <= len(fresh) <= 2 < len(b)
    # random data is stored raw: a chunk takes its length + the tag, a list 36 bytes per chunk + the tag
    assert per["new_blobs"].iloc[1] == len(fresh) + 1                                  # new chunks, the new list
    assert per["new_bytes"].iloc[1] == sum(n + TAG for n in fresh.values()) + 36 * len(b) + TAG
    assert per["new_bytes"].iloc[1] < BIG5 / 2                                          # far from a second copy
    distinct = dict(a) | dict(b)
    assert per["unique_blobs"].iloc[1] == len(distinct) + 2 + 1                        # chunks, 2 lists, small.txt
    assert per["unique_raw_bytes"].iloc[1] == sum(distinct.values()) + 6
    assert per["unique_bytes"].iloc[1] == (sum(n + TAG for n in distinct.values()) + 36 * (len(a) + len(b))
                                           + 2 * TAG + 6 + TAG)
    assert per["dedup_ratio"].iloc[1] == pytest.approx((2 * BIG5 + 6) / (sum(distinct.values()) + 6))
    assert per["dedup_ratio"].iloc[1] > 1.5
    # the runs' own accounts: the second one stored the new chunks' plaintext, and wrote
    # one pack of them and one list pack
    assert per["new_raw_bytes"].iloc[1] == chunked["infos"][1].bytes_stored == sum(fresh.values())
    assert per["new_bytes"].iloc[1] < chunked["infos"][1].bytes_written < BIG5 / 2
    assert overall["stored_bytes"] < 1.5 * BIG5
    assert overall["referenced_bytes"] == overall["indexed_bytes"] and overall["missing_blobs"] == 0
    assert overall["lists_read"] == 2
    summary = analysis.repository_summary(chunked["url"])
    assert summary["chunk_lists"] == 2 and summary["blob_raw_bytes"] == sum(distinct.values()) + 6
    # the content ids: a list id per chunked file, different for the two files
    latest = analysis.load_manifests(chunked["url"], "latest", columns=["path", "hash"]).set_index("path")["hash"]
    assert latest["big.bin"] != latest["copy.bin"]


def test_chunk_lists_are_read_only_when_a_figure_needs_them(chunked, monkeypatch):
    from keepflow.tasks.core import chunk_lists

    def no_lists(*a, **k):
        raise AssertionError("this figure needs no chunk list")

    monkeypatch.setattr(chunk_lists, "read_lists", no_lists)
    assert analysis.repository_summary(chunked["url"])["snapshots"] == 2
    assert len(analysis.load_manifests(chunked["url"], columns=["path", "hash"])) == 5
    analysis.snapshot_diff(chunked["url"], chunked["infos"][0].id, "latest")
    con = analysis.duckdb(chunked["url"])
    assert con.sql("SELECT count(*) FROM entries WHERE path = 'copy.bin'").fetchall() == [(1,)]
    if chunked["format"] == "v2":
        with pytest.raises(AssertionError, match="no chunk list"):
            analysis.dedup_stats(chunked["url"])


@pytest.mark.damages_repository
@pytest.mark.parametrize("chunked", ["v2"], indirect=True)   # format 1 has no chunk lists
def test_dedup_stats_reports_unreadable_lists(chunked, tmp_path):
    assert chunked["format"] == "v2"
    broken = tmp_path / "broken"
    shutil.copytree(chunked["url"], broken)
    repo = Repository.open(str(broken))
    index = indexmod.load_index(repo)
    lists = {k for k, t in zip(index["key"].to_pylist(), index["type"].to_pylist(), strict=True) if t == 1}
    assert len(lists) == 2                                   # one list pack per run
    for key in lists:
        path = broken / key
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF                                      # the first list's ciphertext: fails its tag
        path.write_bytes(bytes(data))
    stats = analysis.dedup_stats(str(broken))
    assert list(stats.per_snapshot["unreadable_lists"]) == [1, 2]
    assert stats.overall["unreadable_lists"] == 2
