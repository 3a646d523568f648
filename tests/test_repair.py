"""Repair: the pack trailer, rebuilding the index from the data, replacing snapshots that lost data.

The central scenario is the one that lost files on real repositories: the
index held a hash twice (two runs packed the same content), the old
de-duplication then dropped the last unique hashes of the index, and a prune's
compaction wrote that loss into the only index file left. The blobs are still
in their packs; only the index forgot them.

Tests that look at format 1's insides (pack trailers, ``objects/``, blob ids
that are the plain BLAKE3 of the content) make a format 1 repository
(``_format1``); the others run on the default, format 2. Format 2's own
cases are in test_format2_repair_replicate.py.
"""

from __future__ import annotations

import json
import os
import struct

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core import lease, manifest, pack, repair, snapshots, treeinfo, verify
from keepflow.tasks.core.backup import commit
from keepflow.tasks.core.errors import PackFormatError
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree

SHARED, UNIQUE = 10, 20


# -- helpers -------------------------------------------------------------------------

def _format1(url, so=None) -> str:
    """Make ``url`` a format 1 repository (plaintext, whole-file blobs, pack trailers)."""
    Repository.init(str(url), so, config=RepoConfig())
    return str(url)


def _old_unique_hashes(table: pa.Table) -> pa.Table:
    """The loader's old de-duplication (the bug): positions within ``first``, not rows."""
    indices = pa.table({"hash": table["hash"], "i": pa.array(range(table.num_rows), pa.int64())})
    first = indices.group_by("hash", use_threads=False).aggregate([("i", "min")])["i_min"]
    return table.take(pc.sort_indices(first))


def _two_sources_sharing_content(tmp_path, url, so=None, version: int = 2) -> dict:
    """Two backups of different sources, run side by side, that both pack the same 10 contents.

    Backups of different sources share a repository; each loads the index once
    when it starts. B loaded it before A had stored anything, so both pack the
    shared files: the index then holds those 10 hashes twice (in the second
    index file, before that run's own unique files, since "s.." < "u..").
    """
    if version == 1:
        _format1(url, so)
    shared = {f"s{i:02d}": os.urandom(3000 + i) for i in range(SHARED)}
    sources = {}
    for name in ("a", "b"):
        spec = dict(shared) | {f"u{i:02d}": os.urandom(2000 + i) for i in range(UNIQUE)}
        if name == "a":
            spec["big"] = os.urandom(1536 * 1024)          # format 1: an object stored whole; 2: chunks
        src = make_tree(tmp_path / f"src-{name}", spec)
        age_tree(src)
        sources[name] = src
    plans = {n: core_helpers.plan_backup(s, url, storage_options=so) for n, s in sources.items()}
    indexmod.known_blobs(Repository.open(url, so), plans["b"]["run_id"])   # B's index, loaded at its start
    stored = {n: core_helpers.store_all(p, so) for n, p in plans.items()}
    for n, p in plans.items():
        commit(p, stored[n], so)
    repo = Repository.open(url, so)
    table = indexmod.load_index(repo, unique=False)
    assert table.num_rows == len(pc.unique(table["hash"])) + SHARED                         # the duplicates
    assert version == 2 or table.num_rows == 2 * (SHARED + UNIQUE) + 1
    return sources


def _blobs(url, so=None) -> int:
    """Distinct blobs of the index (before the old compaction: every blob the repository holds)."""
    return len(pc.unique(indexmod.load_index(Repository.open(url, so), unique=False)["hash"]))


def _compact_with_the_old_bug(url, so=None) -> tuple[int, pa.Table]:
    """What a prune's compaction did with the buggy loader: one index file, rows lost for good."""
    repo = Repository.open(url, so)
    names = indexmod.list_index_names(repo)
    table = indexmod.load_index(repo, unique=False)
    survivors = _old_unique_hashes(table)
    indexmod.write_index(repo, survivors, "compact-20261130T000000Z-0ldbug00")
    for name in names:
        repo.fs.rm_file(repo.path("index", name))
    lost = len(pc.unique(table["hash"])) - len(pc.unique(survivors["hash"]))
    return lost, survivors


def _index_rows(url, so=None) -> set[tuple]:
    table = indexmod.load_index(Repository.open(url, so), unique=False)
    return set(zip(*(table[c].to_pylist() for c in ("hash", "key", "offset", "length")), strict=True))


def _restores_exactly(tmp_path, url, sources: dict, so=None) -> None:
    for info in snapshots.list_snapshots(Repository.open(url, so), damaged=[]):
        src = next(s for s in sources.values() if str(s) == info.source)
        out = tmp_path / f"out-{info.id}"
        _, _, errors = core_helpers.restore(url, out, snapshot=info.id, storage_options=so)
        assert errors == []
        assert treeinfo.differences(treeinfo.describe(str(src)), treeinfo.describe(str(out))) == []


# -- the pack format -------------------------------------------------------------------

def test_trailer_is_what_the_pack_writer_appends_and_is_read_from_the_tail(tmp_path):
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(1000 + i) for i in range(50)})
    url = _format1(tmp_path / "repo")
    core_helpers.backup(src, url)
    repo = Repository.open(url)
    idx = indexmod.load_index(repo)
    (key,) = set(idx["key"].to_pylist())
    data = (tmp_path / "repo" / key).read_bytes()
    entries = pack.read_trailer(repo.fs, repo.path(key))
    assert sorted(entries) == sorted(zip(idx["hash"].to_pylist(), idx["offset"].to_pylist(),
                                         idx["length"].to_pylist(), strict=True))
    assert data.endswith(pack.encode_trailer(entries)) and data.endswith(pack.PACK_MAGIC)
    assert pack.trailer_from_bytes(data, key) == entries
    assert pack.PACK_MAGIC == b"KFPACK01"


H = "ab" * 32


@pytest.mark.parametrize("content, reason", [
    (b"", "shorter than the 16-byte pack footer"),
    (os.urandom(100) + b"NOTAPACK", "does not end with KFPACK01"),
    (b"[]" + struct.pack("<Q", 10_000) + pack.PACK_MAGIC, "does not fit"),
    (b"{nope" + struct.pack("<Q", 5) + pack.PACK_MAGIC, "not JSON"),
    (b'{"a":1}' + struct.pack("<Q", 7) + pack.PACK_MAGIC, "not a list"),
    (b"x" * 10 + pack.encode_trailer([("zz", 0, 1)]), "is not [hash, offset, length]"),
    (b"x" * 10 + pack.encode_trailer([(H, 4, 7)]), "outside the 10 data bytes"),
    (b"x" * 10 + pack.encode_trailer([(H, -1, 2)]), "outside"),
])
def test_read_trailer_refuses_what_is_not_a_pack(tmp_path, content, reason):
    import fsspec

    path = tmp_path / "p"
    path.write_bytes(content)
    with pytest.raises(PackFormatError) as err:
        pack.read_trailer(fsspec.filesystem("file"), str(path))
    message = str(err.value)
    assert message.startswith(f"{path} is not a keepflow pack: ") and reason in message and "\n" not in message
    with pytest.raises(PackFormatError):
        pack.trailer_from_bytes(content, "p")


# -- repair index ------------------------------------------------------------------------

def test_repair_index_heals_the_damage_of_the_old_compaction(tmp_path, cli):
    url = str(tmp_path / "repo")
    sources = _two_sources_sharing_content(tmp_path, url, version=1)
    lost, _ = _compact_with_the_old_bug(url)
    assert lost == UNIQUE - SHARED                      # the last unique hashes of the index are gone
    problems = verify.check_structure(url).problems
    assert [p["kind"] for p in problems] == ["missing blob"] * lost
    damaged = next(s for s in snapshots.list_snapshots(Repository.open(url)) if s.id in problems[0]["snapshots"])
    _, _, errors = core_helpers.restore(url, tmp_path / "before", snapshot=damaged.id)
    assert len(errors) == lost

    proc = cli("repair", "index", url, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["blobs_found"] == lost and out["lost"] == [] and out["unreadable"] == [] and out["foreign"] == []
    assert out["blobs_indexed"] == SHARED + 2 * UNIQUE + 1 and out["packs"] == 2 and out["objects"] == 1
    assert out["index_written"].startswith("repair-") and out["index_files_removed"] == 1
    assert indexmod.list_index_names(Repository.open(url)) == [out["index_written"]]
    assert verify.verify(url, read_data=100).problems == []
    _restores_exactly(tmp_path, url, sources)


def test_repair_index_is_idempotent_and_keeps_the_locations_in_use(tmp_path, repo_url):
    sources = _two_sources_sharing_content(tmp_path, repo_url)
    blobs = _blobs(repo_url)
    lost, compacted = _compact_with_the_old_bug(repo_url)
    before = _index_rows(repo_url)

    dry = repair.repair_index(repo_url, dry_run=True)
    assert dry.blobs_found == lost and dry.index_written is None and _index_rows(repo_url) == before

    first = repair.repair_index(repo_url)
    rows = _index_rows(repo_url)
    assert first.blobs_found == lost and len(rows) == blobs
    # Where the old index knew a location, the repaired index keeps one it knew (no needless moves).
    known = {r[0] for r in before}
    assert all(r in before for r in rows if r[0] in known)

    second = repair.repair_index(repo_url)
    assert second.blobs_found == 0 and second.rows_dropped == 0 and second.exit_code == 0
    assert second.index_written is None and second.index_files_removed == 0
    assert _index_rows(repo_url) == rows
    assert indexmod.list_index_names(Repository.open(repo_url)) == [first.index_written]

    # A complete index with duplicates (what concurrent runs leave) is compacted once, then left alone.
    other = tmp_path / "other"
    _two_sources_sharing_content(other, f"{repo_url}-2")
    compacted_once = repair.repair_index(f"{repo_url}-2")
    assert compacted_once.blobs_found == 0 and compacted_once.index_files_removed == 2
    assert repair.repair_index(f"{repo_url}-2").index_written is None
    if repo_url.startswith("memory://"):
        import fsspec

        fsspec.filesystem("memory").rm(f"{repo_url}-2", recursive=True)
    _restores_exactly(tmp_path, repo_url, sources)


def test_foreign_and_unreadable_files_are_reported_and_left_alone(tmp_path, cli):
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(2000) for i in range(20)})
    age_tree(src)
    url = _format1(tmp_path / "repo")
    core_helpers.backup(src, url)
    root = tmp_path / "repo"
    before = _index_rows(url)
    strangers = {
        "packs/zz/notes.txt": b"someone's notes",                                 # foreign name
        f"packs/{H[:2]}/{H}.tmp-0a1b2c": b"half a pack",                          # an interrupted write
        f"objects/00/{'cd' * 32}": b"wrong folder",                               # <ab> is not the name's start
    }
    unreadable = {
        f"packs/ee/{'ee' * 32}": os.urandom(3000),                               # no footer
        f"packs/ef/{'ef' * 32}": b"{bad json" + struct.pack("<Q", 9) + pack.PACK_MAGIC,
        f"packs/fa/{'fa' * 32}": b"x" * 10 + pack.encode_trailer([(H, 0, 500)]),  # entry outside the pack
    }
    for key, data in (strangers | unreadable).items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    (root / "index" / "garbage.parquet").write_bytes(b"not parquet")          # breaks every index reader

    proc = cli("repair", "index", url, "--json")
    assert proc.returncode == 1, proc.stderr                                    # unreadable packs: exit 1
    out = json.loads(proc.stdout)
    assert sorted(f["key"] for f in out["foreign"]) == sorted(strangers)
    assert "interrupted write" in next(f["detail"] for f in out["foreign"] if ".tmp-" in f["key"])
    reasons = {u["key"]: u["detail"] for u in out["unreadable"]}
    assert sorted(reasons) == sorted(unreadable)
    assert "KFPACK01" in reasons[f"packs/ee/{'ee' * 32}"] and "JSON" in reasons[f"packs/ef/{'ef' * 32}"]
    assert "outside" in reasons[f"packs/fa/{'fa' * 32}"]
    assert [u["key"] for u in out["index_files_unreadable"]] == ["index/garbage.parquet"]
    assert out["lost"] == [] and out["blobs_found"] == 0
    for key, data in (strangers | unreadable).items():                          # nothing deleted
        assert (root / key).read_bytes() == data
    assert _index_rows(url) == before and not (root / "index" / "garbage.parquet").exists()
    assert verify.verify(url, read_data=100).problems == []


@pytest.mark.damages_repository   # the garbage manifest stays
def test_a_damaged_manifest_is_named_and_does_not_stop_the_repair(tmp_path):
    url = str(tmp_path / "repo")
    sources = _two_sources_sharing_content(tmp_path, url)
    lost, _ = _compact_with_the_old_bug(url)
    bad = tmp_path / "repo" / "snapshots" / "20261130T000000000000Z-00000000deadbeef.parquet"
    bad.write_bytes(b"garbage")
    result = repair.repair_index(url)
    assert result.blobs_found == lost and result.lost == [] and result.exit_code == 1
    assert [d["key"] for d in result.damaged_manifests] == [f"snapshots/{bad.name}"]
    snap = repair.repair_snapshots(url)
    assert snap.replaced == [] and snap.exit_code == 1
    assert [d["key"] for d in snap.damaged_manifests] == [f"snapshots/{bad.name}"]
    assert bad.read_bytes() == b"garbage"                                        # left alone
    _restores_exactly(tmp_path, url, sources)


@pytest.mark.damages_repository   # the corrupt blob stays referenced and is no longer indexed
def test_read_data_leaves_out_a_corrupt_blob_and_reports_it(tmp_path, cli):
    src = make_tree(tmp_path / "src", {f"f{i:02d}": os.urandom(2000 + i) for i in range(20)})
    age_tree(src)
    url = _format1(tmp_path / "repo")
    core_helpers.backup(src, url)
    repo = Repository.open(url)
    idx = indexmod.load_index(repo)
    victim = idx.slice(5, 1).to_pylist()[0]
    path = tmp_path / "repo" / victim["key"]
    data = bytearray(path.read_bytes())
    data[victim["offset"] + 7] ^= 0xFF
    path.write_bytes(bytes(data))

    trailer_only = repair.repair_index(url)          # the trailer still lists it: reading it is what tells
    assert trailer_only.corrupt == [] and trailer_only.index_written is None

    proc = cli("repair", "index", url, "--read-data", "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert {(c["key"], c["hash"]) for c in out["corrupt"]} == {(victim["key"], victim["hash"]),
                                                               (victim["key"], None)}   # blob, and the pack's name
    assert out["keys_read"] == 1 and out["bytes_read"] == len(data)
    (lost,) = out["lost"]
    assert lost["hash"] == victim["hash"] and "corrupt" in lost["detail"] and lost["files"] == 1
    assert lost["paths"] == [next(p for p in sorted(os.listdir(src))
                                  if treeinfo.describe(str(src))[p][4] == victim["hash"])]
    rows = _index_rows(url)
    assert victim["hash"] not in {r[0] for r in rows} and len(rows) == idx.num_rows - 1
    assert path.exists()                                                         # left alone


@pytest.mark.damages_repository   # the truncated object stays
def test_an_object_that_changed_size_keeps_its_recorded_row_and_is_reported(tmp_path):
    src = make_tree(tmp_path / "src", {"big": os.urandom(1536 * 1024), "small": "x"})
    url = _format1(tmp_path / "repo")
    core_helpers.backup(src, url)
    repo = Repository.open(url)
    before = _index_rows(url)
    (key,) = [r[1] for r in before if r[1].startswith("objects/")]
    os.truncate(tmp_path / "repo" / key, 1000)
    result = repair.repair_index(url)
    assert result.exit_code == 1 and [(c["key"], "1000 bytes stored" in c["detail"]) for c in result.corrupt] == \
        [(key, True)]
    assert _index_rows(url) == before and result.index_written is None   # the recorded length stays
    assert [p["kind"] for p in verify.check_structure(url).problems] == ["short key"]
    assert repo.fs.size(repo.path(key)) == 1000                                  # left alone


def test_repair_snapshots_replaces_what_lost_a_pack(tmp_path, cli):
    spec = {f"a{i}": os.urandom(2500 + i) for i in range(10)} | {"big": os.urandom(1536 * 1024)}
    src = make_tree(tmp_path / "src", spec)
    age_tree(src)
    url = _format1(tmp_path / "repo")
    core_helpers.backup(src, url, tags=["daily"])
    lost_paths = [f"b{i}" for i in range(5)]
    for p in lost_paths:
        (src / p).write_bytes(os.urandom(3000))
    age_tree(src)
    second, _, _ = core_helpers.backup(src, url, tags=["daily"])
    repo = Repository.open(url)
    first = snapshots.list_snapshots(repo)[0]
    first_key = first.key
    hashes = {p: treeinfo.describe(str(src))[p][4] for p in lost_paths}
    idx = indexmod.load_index(repo)
    (pack_key,) = set(idx.filter(pc.is_in(idx["hash"], value_set=pa.array(list(hashes.values()))))["key"].to_pylist())
    os.unlink(tmp_path / "repo" / pack_key)                                      # deleted by hand

    dry = cli("repair", "snapshots", url, "--dry-run", "--json")
    assert dry.returncode == 1, dry.stderr
    out = json.loads(dry.stdout)
    assert sorted(f["path"] for f in out["files_dropped"]) == lost_paths
    assert len(snapshots.list_snapshots(repo)) == 2 and out["index"]["index_written"] is None

    proc = cli("repair", "snapshots", url)
    assert proc.returncode == 1 and "content of 5 files is lost" in proc.stderr
    for p in lost_paths:                                                         # every dropped file named
        assert f"dropped {second.info.id[:8]}: {p}" in proc.stdout
    snaps = {s.id: s for s in snapshots.list_snapshots(repo)}
    assert len(snaps) == 3 and second.info.id in snaps and first.id in snaps     # originals kept
    (fixed,) = [s for s in snaps.values() if "repaired" in s.tags]
    assert fixed.parent == second.info.id and fixed.tags == ["daily", "repaired"]
    assert (fixed.source, fixed.host) == (second.info.source, second.info.host)
    assert fixed.files == second.info.files - 5 and fixed.bytes == second.info.bytes - 5 * 3000
    paths = set(manifest.read_manifest(repo, fixed, columns=["path"])["path"].to_pylist())
    original = set(manifest.read_manifest(repo, snaps[second.info.id], columns=["path"])["path"].to_pylist())
    assert original - paths == set(lost_paths)
    assert [s.key for s in snapshots.list_snapshots(repo) if s.id == first.id] == [first_key]   # untouched
    _, _, errors = core_helpers.restore(url, tmp_path / "out", snapshot=fixed.id)
    expected = {p: v for p, v in treeinfo.describe(str(src)).items() if p not in lost_paths}
    assert errors == [] and treeinfo.differences(expected, treeinfo.describe(str(tmp_path / "out"))) == []

    # Run again with --forget: nothing is replaced twice; the replaced original goes.
    again = cli("repair", "snapshots", url, "--forget", "--json")
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["replaced"] == [] and out["files_dropped"] == []
    assert out["already_replaced"] == [{"original": second.info.id, "replacement": fixed.id}]
    assert out["forgotten"] == [second.info.id]
    assert {s.id for s in snapshots.list_snapshots(repo)} == {first.id, fixed.id}
    assert verify.verify(url, read_data=100).problems == []

    # The next backup takes the replacement as its parent, so the lost files are read and stored again.
    third, _, _ = core_helpers.backup(src, url)
    assert third.info.parent == fixed.id and third.info.new == 5
    _, _, errors = core_helpers.restore(url, tmp_path / "out3", snapshot=third.info.id)
    assert errors == [] and treeinfo.describe(str(tmp_path / "out3")) == treeinfo.describe(str(src))


def test_repair_snapshots_forget_removes_the_originals_at_once(tmp_path):
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(2000 + i) for i in range(8)})
    age_tree(src)
    url = str(tmp_path / "repo")
    done, _, _ = core_helpers.backup(src, url)
    repo = Repository.open(url)
    (key,) = set(indexmod.load_index(repo)["key"].to_pylist())
    os.unlink(tmp_path / "repo" / key)
    result = repair.repair_snapshots(url, forget=True)
    assert result.exit_code == 1 and result.forgotten == [done.info.id] and len(result.files_dropped) == 8
    (left,) = snapshots.list_snapshots(repo)
    assert left.id == result.replaced[0]["replacement"] and left.files == 0 and left.parent == done.info.id
    assert result.index["rows_dropped"] == 8 and indexmod.load_index(repo).num_rows == 0
    assert verify.verify(url).problems == []


# -- leases and errors at the command line -------------------------------------------------

def test_repair_refuses_while_a_backup_holds_the_lease(tmp_path, cli):
    src = make_tree(tmp_path / "src", {"a": "1"})
    url = str(tmp_path / "repo")
    core_helpers.backup(src, url)
    holder = lease.Holder(Repository.open(url), "backup", str(src)).acquire()
    try:
        for what in ("index", "snapshots"):
            proc = cli("repair", what, url)
            assert proc.returncode == 11, proc.stderr
            assert proc.stderr.startswith("keepflow: error: a backup is running") and "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        holder.release()
    assert lease.list_leases(Repository.open(url)) == []                        # repair left no lease behind


def test_repair_of_a_missing_repository_and_usage_errors(tmp_path, cli):
    proc = cli("repair", "index", str(tmp_path / "nothing"))
    assert proc.returncode == 10 and proc.stderr.startswith("keepflow: error: no keepflow repository at")
    assert "Traceback" not in proc.stderr
    proc = cli("repair")
    assert proc.returncode == 2 and proc.stderr.startswith("keepflow: error:") and "Traceback" not in proc.stderr


def test_repair_flow_names_its_run_and_writes_artifacts(tmp_path, prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from keepflow.flows.repair import repair as repair_flow

    url = str(tmp_path / "my-repo")
    _two_sources_sharing_content(tmp_path, url)
    _compact_with_the_old_bug(url)
    state = repair_flow(url, what="index", return_state=True)
    assert state.is_completed()
    assert state.result()["blobs_found"] == UNIQUE - SHARED
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert run.name.startswith("repair-index-my-repo-")
    summary = next(a for a in arts if a.key == "repair-summary").data
    assert f"{UNIQUE - SHARED} newly found" in summary


# -- providers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, version", [("s3", 1), ("s3", 2), ("sftp", 2), ("azure", 2)])
def test_repair_index_on_remote_providers(tmp_path, request, kind, version, fresh_fs_caches):
    server = request.getfixturevalue(f"{kind}_server")
    so, url = server.storage_options, server.unique_url("repair")
    sources = _two_sources_sharing_content(tmp_path, url, so, version=version)
    lost, _ = _compact_with_the_old_bug(url, so)
    result = repair.repair_index(url, so)
    assert result.blobs_found == lost > 0 and result.lost == [] and result.exit_code == 0
    assert verify.verify(url, read_data=100, storage_options=so).problems == []
    _restores_exactly(tmp_path, url, sources, so)
    assert repair.repair_index(url, so, read_data=True).index_written is None   # re-hashed: all sound, no change

    if kind == "s3":          # a trailer (format 2: a header) costs two range reads, whatever the pack's size
        from tests.servers import S3RequestCounter

        repo = Repository.open(url, so)
        key = next(k for k in indexmod.load_index(repo)["key"].to_pylist() if k.startswith("packs/"))
        size = repo.fs.size(repo.path(key))
        with S3RequestCounter() as counter:
            if version == 1:
                pack.read_trailer(repo.fs, repo.path(key), size)
            else:
                pack.read_header2(repo.keys, repo.fs, repo.path(key), size)
        assert counter.counts == {"get_object": 2}, counter.counts
