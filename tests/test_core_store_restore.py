"""Storing and restoring through the core, on local disk and memory://."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from keepflow.tasks.core import chunk_lists, manifest, pack, snapshots, treeinfo
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core.pack import PACK_MAGIC
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree

MiB = 1024 * 1024


@pytest.fixture(params=[2, 1], ids=["format2", "format1"])
def repo_format(request):
    """Both repository formats: 2 (the default, encrypted) and 1 (plaintext)."""
    return request.param


def init_repository(url: str, version: int) -> Repository:
    """A new repository of format ``version`` (format 1 only when asked for explicitly)."""
    return Repository.init(url, config=RepoConfig() if version == 1 else None)


def _manifest_hashes(repo, info) -> dict[str, str]:
    table = manifest.read_manifest(repo, info, columns=["path", "hash"])
    return dict(zip(table["path"].to_pylist(), table["hash"].to_pylist(), strict=True))


def test_roundtrip_small_and_large(tmp_path, repo_url, repo_format):
    src = make_tree(tmp_path / "src", {"a.txt": "alpha", "dir/b.bin": os.urandom(5000), "empty.txt": "",
                                       "big.bin": os.urandom(8 * MiB + 7), "nothing": None,  # > max chunk: >= 2 chunks
                                       "ln": ("link", "a.txt")})
    init_repository(repo_url, repo_format)
    committed, plan, _ = core_helpers.backup(src, repo_url)
    assert committed.info.files == 4 and committed.info.new == 4
    repo = Repository.open(repo_url)
    assert repo.version == repo_format
    big = (src / "big.bin").read_bytes()
    if repo_format == 1:
        # Format 1: the one large file is stored whole in objects/, named by its plain BLAKE3.
        keys = [f["name"] for f in repo.fs.find(repo.path("objects"), detail=True).values()]
        assert len(keys) == 1 and keys[0].endswith(blake3.blake3(big).hexdigest())
    else:
        # Format 2: no objects/; the large file is a list blob whose chunks (data blobs in packs) cover it.
        assert not repo.fs.exists(repo.path("objects"))
        hashes = _manifest_hashes(repo, committed.info)
        idx = indexmod.load_index(repo)
        rows = {r["hash"]: r for r in idx.to_pylist()}
        assert hashes["a.txt"] == repo.blob_id(b"alpha") and rows[hashes["a.txt"]]["type"] == pack.KIND_DATA
        list_row = rows[hashes["big.bin"]]
        assert list_row["type"] == pack.KIND_LIST and list_row["key"].startswith("packs/")
        [chunks] = chunk_lists.read_lists(repo, idx.filter(pc.equal(idx["hash"], hashes["big.bin"])))
        assert len(chunks) >= 2 and sum(n for _, n in chunks) == len(big)
        assert all(rows[c]["type"] == pack.KIND_DATA and rows[c]["raw_length"] == n for c, n in chunks)
        assert blake3.blake3(big).hexdigest() not in rows            # ids are keyed, not plain BLAKE3
    _, results, errors = core_helpers.restore(repo_url, tmp_path / "out")
    assert errors == []
    assert treeinfo.describe(str(src)) == treeinfo.describe(str(tmp_path / "out"))


def test_small_files_share_packs_and_index_points_into_them(tmp_path, repo_url, repo_format):
    spec = {f"d{i % 7}/f{i}": os.urandom(100 + i) for i in range(300)}
    src = make_tree(tmp_path / "src", spec)
    init_repository(repo_url, repo_format)
    _, _, summaries = core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    assert sum(s.packs_written for s in summaries) == 1
    idx = indexmod.load_index(repo)
    assert idx.num_rows == 300
    assert len(set(idx["key"].to_pylist())) == 1                         # all in the one pack
    row = next(r for r in idx.to_pylist() if r["hash"] == repo.blob_id(spec["d0/f0"]))
    data = repo.fs.cat_file(repo.path(row["key"]), start=row["offset"], end=row["offset"] + row["length"])
    packed = repo.fs.cat_file(repo.path(row["key"]))
    if repo_format == 1:
        assert row["hash"] == blake3.blake3(spec["d0/f0"]).hexdigest()
        assert data == spec["d0/f0"]                                     # plaintext at the indexed range
        assert packed.endswith(PACK_MAGIC)
    else:
        assert spec["d0/f0"] not in packed                               # encrypted
        salt, entries = pack.header2_from_bytes(repo.keys, packed, row["key"])
        assert len(entries) == 300 and salt == row["salt"]
        entry = next(e for e in entries if e.id == row["hash"])
        assert (entry.offset, entry.length, entry.seq) == (row["offset"], row["length"], row["seq"])
        assert pack.open_blob2(repo.keys, row["salt"], entry, data) == spec["d0/f0"]
        assert packed.endswith(pack.PACK2_MAGIC)
    assert blake3.blake3(packed).hexdigest() == row["key"].rsplit("/", 1)[-1]  # pack named by content


def test_duplicates_are_stored_once(tmp_path, repo_url):
    same = os.urandom(3000)
    src = make_tree(tmp_path / "src", {"a": same, "b": same, "c/d": same})
    committed, _, summaries = core_helpers.backup(src, repo_url)
    assert sum(s.blobs_stored for s in summaries) == 1
    assert committed.info.bytes_stored == 3000


def test_incremental_reads_only_changes_and_reuses_blobs(tmp_path, repo_url):
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(2000) for i in range(50)})
    age_tree(src)
    first, _, _ = core_helpers.backup(src, repo_url)
    (src / "f3").write_bytes(b"changed")
    (src / "f4").unlink()
    (src / "copy").write_bytes((src / "f5").read_bytes())   # new path, known content
    second, _, _ = core_helpers.backup(src, repo_url)
    info = second.info
    assert (info.new, info.changed, info.unchanged, info.deleted) == (1, 1, 48, 1)
    assert info.bytes_read == len(b"changed") + 2000
    assert info.bytes_stored == len(b"changed")           # the copy deduplicates
    assert info.parent == first.info.id
    third, _, _ = core_helpers.backup(src, repo_url)
    assert third.info.bytes_read == 0 or third.info.bytes_read <= len(b"changed") + 2000  # racy files only


def test_every_snapshot_restores_as_it_was(tmp_path, repo_url):
    src = make_tree(tmp_path / "src", {"a": "1", "b/c": "2"})
    age_tree(src)
    core_helpers.backup(src, repo_url)
    before = treeinfo.describe(str(src))
    (src / "a").write_text("changed a")
    (src / "b" / "new").write_text("new")
    core_helpers.backup(src, repo_url)
    after = treeinfo.describe(str(src))
    repo = Repository.open(repo_url)
    snaps = snapshots.list_snapshots(repo)
    assert len(snaps) == 2
    core_helpers.restore(repo_url, tmp_path / "r1", snapshot=snaps[0].id[:6])
    core_helpers.restore(repo_url, tmp_path / "r2", snapshot="latest")
    assert treeinfo.describe(str(tmp_path / "r1")) == before
    assert treeinfo.describe(str(tmp_path / "r2")) == after


def test_restore_includes_only_matching(tmp_path, repo_url):
    src = make_tree(tmp_path / "src", {"docs/a.md": "a", "docs/sub/b.md": "b", "src/c.py": "c", "top.md": "t"})
    core_helpers.backup(src, repo_url)
    core_helpers.restore(repo_url, tmp_path / "out", includes=["docs/"])
    got = sorted(p for p in treeinfo.describe(str(tmp_path / "out")) if (tmp_path / "out" / p).is_file())
    assert got == ["docs/a.md", "docs/sub/b.md"]


@pytest.mark.damages_repository
def test_corrupt_blob_is_reported_and_never_written(tmp_path, repo_format):
    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {"good": "good content", "bad": "bad content!"})
    init_repository(repo_url, repo_format)
    core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    idx = indexmod.load_index(repo).to_pylist()
    bad_hash = repo.blob_id(b"bad content!")
    row = next(r for r in idx if r["hash"] == bad_hash)
    path = repo.path(row["key"])
    data = bytearray(Path(path).read_bytes())
    data[row["offset"]] ^= 0xFF
    os.chmod(path, 0o644)
    Path(path).write_bytes(bytes(data))
    _, _, errors = core_helpers.restore(repo_url, tmp_path / "out")
    assert [e[0] for e in errors] == ["bad"]
    assert not (tmp_path / "out" / "bad").exists()
    assert (tmp_path / "out" / "good").read_text() == "good content"
    assert not [p for p in os.listdir(tmp_path / "out") if "kf-tmp" in p]


def test_overwrite_modes(tmp_path):
    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {"same": "same", "edited": "original"})
    core_helpers.backup(src, repo_url)
    out = tmp_path / "out"
    core_helpers.restore(repo_url, out)
    inode = os.stat(out / "same").st_ino
    (out / "edited").write_text("local edit")
    _, results, _ = core_helpers.restore(repo_url, out, overwrite="never")
    assert (out / "edited").read_text() == "local edit"
    assert sum(r.kept for r in results) == 2
    _, results, _ = core_helpers.restore(repo_url, out)          # if-changed
    assert (out / "edited").read_text() == "original"
    assert os.stat(out / "same").st_ino == inode                  # identical: not rewritten
    assert sum(r.identical for r in results) == 1 and sum(r.written for r in results) == 1
    _, results, _ = core_helpers.restore(repo_url, out, overwrite="always")
    assert sum(r.written for r in results) == 2


def test_restore_dry_run_writes_nothing(tmp_path):
    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {"a": "1", "d/b": "2"})
    core_helpers.backup(src, repo_url)
    _, results, _ = core_helpers.restore(repo_url, tmp_path / "out", dry_run=True)
    assert sum(r.written for r in results) == 2
    assert not (tmp_path / "out").exists()


def test_backup_dry_run_stores_nothing(tmp_path):
    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {"a": "12345", "big": os.urandom(2 * MiB)})
    committed, _, _ = core_helpers.backup(src, repo_url, dry_run=True)
    assert committed.info.bytes_stored == 5 + 2 * MiB
    assert not (tmp_path / "repo").exists()


def test_interrupted_run_leaves_no_snapshot_and_next_run_reuses_blobs(tmp_path):
    """A run that stops after storing (before commit) is invisible; its blobs are reused."""
    from keepflow.tasks.core import backup as core_backup

    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(1000) for i in range(20)})
    plan = core_helpers.plan_backup(src, repo_url)
    core_helpers.store_all(plan)
    core_backup.cleanup(plan)                       # the process "dies" here: no commit
    repo = Repository.open(repo_url)
    assert snapshots.list_snapshots(repo) == []
    committed, _, summaries = core_helpers.backup(src, repo_url)
    assert committed.info.bytes_read == 20 * 1000
    assert committed.info.bytes_stored == 0        # everything was already stored
    assert len(snapshots.list_snapshots(repo)) == 1


def test_manifest_is_plain_parquet_with_snapshot_metadata(tmp_path):
    """Format 1: the manifest is a plain Parquet file carrying the snapshot's facts as metadata."""
    repo_url = str(tmp_path / "repo")
    init_repository(repo_url, 1)
    src = make_tree(tmp_path / "src", {"a": "1"})
    committed, _, _ = core_helpers.backup(src, repo_url, tags=["nightly"])
    assert committed.info.key == manifest.manifest_name(committed.info)
    path = tmp_path / "repo" / "snapshots" / committed.info.key
    table = pq.read_table(path)
    assert table.column_names == [f.name for f in manifest.MANIFEST_SCHEMA]
    info = manifest.SnapshotInfo.from_json(pq.read_schema(path).metadata[manifest.META_KEY])
    assert info.tags == ["nightly"] and info.id == committed.info.id


def test_format2_manifest_is_encrypted_and_read_back_with_its_facts(tmp_path):
    """Format 2: the manifest is no plain Parquet, is named by the BLAKE3 of its bytes, and
    read_manifest / read_info give back the same columns and facts."""
    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {"a": "1"})
    committed, _, _ = core_helpers.backup(src, repo_url, tags=["nightly"])
    path = tmp_path / "repo" / "snapshots" / committed.info.key
    data = path.read_bytes()
    assert b"PAR1" not in data and b"nightly" not in data
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(path)
    assert committed.info.key.rsplit("-", 1)[-1] == blake3.blake3(data).hexdigest()
    repo = Repository.open(repo_url)
    table = manifest.read_manifest(repo, committed.info)
    assert table.column_names == [f.name for f in manifest.MANIFEST_SCHEMA]
    assert table["path"].to_pylist() == ["a"] and table["hash"].to_pylist() == [repo.blob_id(b"1")]
    info = manifest.read_info(repo, committed.info.key)
    assert info.tags == ["nightly"] and info.id == committed.info.id


def test_resolve_by_prefix_time_and_errors(tmp_path):
    from keepflow.tasks.core.errors import AmbiguousSnapshotError, SnapshotNotFoundError

    repo_url = str(tmp_path / "repo")
    src = make_tree(tmp_path / "src", {"a": "1"})
    first, _, _ = core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    assert snapshots.resolve(repo, first.info.id[:5]).id == first.info.id
    assert snapshots.resolve(repo, as_of="2999-01-01 00:00").id == first.info.id
    with pytest.raises(SnapshotNotFoundError):
        snapshots.resolve(repo, as_of="2000-01-01")
    with pytest.raises(SnapshotNotFoundError):
        snapshots.resolve(repo, "zzzz")
    fake = manifest.SnapshotInfo(id=first.info.id[:3] + "f" * 13, time=first.info.time)
    with pytest.raises(AmbiguousSnapshotError):
        snapshots.resolve(repo, first.info.id[:3], snapshots=[first.info, fake])


def test_failed_repository_write_fails_the_batch_not_the_file(tmp_path):
    """A pack that cannot be written must not turn into 'skipped files' and a snapshot without data."""
    from keepflow.tasks.core import backup as core_backup
    from keepflow.tasks.core.store import RepositoryWriteError

    repo_url = str(tmp_path / "repo")
    Repository.init(repo_url)
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(1000) for i in range(5)})
    # A real fault: the packs folder is a regular file, so no pack can be created under it.
    (tmp_path / "repo" / "packs").write_text("in the way")
    plan = core_helpers.plan_backup(src, repo_url)
    with pytest.raises(RepositoryWriteError):
        core_helpers.store_all(plan)
    core_backup.cleanup(plan)
    assert snapshots.list_snapshots(Repository.open(repo_url)) == []


def test_transient_and_permanent_errors_for_retries():
    from keepflow.tasks.core.errors import StorageError
    from keepflow.tasks.core.store import RepositoryWriteError
    from keepflow.tasks.retry import is_transient

    down = StorageError(url="s3://b/r", reason="cannot reach")
    down.kind = "unreachable"
    creds = StorageError(url="s3://b/r", reason="bad key")
    creds.kind = "credentials"
    assert is_transient(down) and not is_transient(creds)
    assert is_transient(ConnectionResetError()) and not is_transient(PermissionError())
    wrapped = RepositoryWriteError("x")
    wrapped.__cause__ = TimeoutError()
    assert is_transient(wrapped)


def test_restore_into_an_fsspec_url_target(tmp_path):
    """The target may be a URL: content is restored and verified there (metadata only on local disks)."""
    repo_url = str(tmp_path / "repo")
    spec = {"a.txt": "alpha", "d/b.bin": os.urandom(5000), "big.bin": os.urandom(2 * MiB + 3), "empty": ""}
    src = make_tree(tmp_path / "src", spec)
    core_helpers.backup(src, repo_url)
    target = f"memory://kf-target-{tmp_path.name}/out"
    fs = fsspec.filesystem("memory")
    try:
        plan, results, errors = core_helpers.restore(repo_url, target)
        assert errors == [] and sum(r.written for r in results) == 4
        for rel, value in spec.items():
            expected = value.encode() if isinstance(value, str) else value
            assert fs.cat_file(f"{target}/{rel}") == expected, rel
        # Again with the default if-changed policy: everything is already identical.
        _, results, _ = core_helpers.restore(repo_url, target)
        assert sum(r.identical for r in results) == 4 and sum(r.written for r in results) == 0
    finally:
        if fs.exists(f"memory://kf-target-{tmp_path.name}"):
            fs.rm(f"memory://kf-target-{tmp_path.name}", recursive=True)


@pytest.mark.damages_repository
def test_remote_chunks_are_read_a_span_at_a_time_and_a_bad_one_comes_from_a_fallback(tmp_path, monkeypatch):
    from keepflow.tasks.core import restore_chunks
    from keepflow.tasks.core.blob_sources import BlobSources

    base = f"memory://kf-{tmp_path.name}"
    primary, replica = f"{base}/primary", f"{base}/replica"
    fs = fsspec.filesystem("memory")
    try:
        data = os.urandom(20 * MiB + 5)
        src = make_tree(tmp_path / "src", {"big.bin": data})
        init_repository(primary, 2)
        core_helpers.backup(src, primary)
        for path in fs.find(primary):                       # a byte copy, as replication makes
            fs.pipe_file(replica + path[len(fs._strip_protocol(primary)):], fs.cat_file(path))
        repo = Repository.open(primary)
        rows = [r for r in indexmod.load_index(repo).to_pylist() if r["type"] == pack.KIND_DATA]
        assert len(rows) >= 12

        reads = []
        real_range = BlobSources.primary_range

        def counted(self, key, start, end):
            reads.append(end - start)
            return real_range(self, key, start, end)

        monkeypatch.setattr(BlobSources, "primary_range", counted)
        _, _, errors = core_helpers.restore(primary, tmp_path / "out1")
        assert not errors and (tmp_path / "out1" / "big.bin").read_bytes() == data
        assert sum(reads) == sum(r["length"] for r in rows)          # every chunk read once
        assert len(reads) <= len(rows) // 3                          # several chunks per range read
        assert max(reads) <= restore_chunks.SPAN_BYTES + max(r["length"] for r in rows)

        # One damaged chunk in the middle of a span: that chunk alone comes from the replica.
        bad = sorted(rows, key=lambda r: (r["key"], r["offset"]))[len(rows) // 2]
        path = repo.path(bad["key"])
        stored = bytearray(fs.cat_file(path))
        stored[bad["offset"] + 100] ^= 0xFF
        fs.pipe_file(path, bytes(stored))
        reads.clear()
        _, results, errors = core_helpers.restore(primary, tmp_path / "out2", fallbacks=[replica])
        assert not errors and (tmp_path / "out2" / "big.bin").read_bytes() == data
        used = {}
        for r in results:
            for url, n in r.sources.items():
                used[url] = used.get(url, 0) + n
        assert used.get(replica) == 1 and used.get(primary) == len(rows) - 1
        _, _, errors = core_helpers.restore(primary, tmp_path / "out3")
        assert [e[0] for e in errors] == ["big.bin"]
        assert not (tmp_path / "out3" / "big.bin").exists()
        assert not [p for p in os.listdir(tmp_path / "out3") if "kf-tmp" in p]
    finally:
        if fs.exists(base):
            fs.rm(base, recursive=True)
