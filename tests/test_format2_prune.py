"""Prune and leases on format 2: live chunks through their lists, repack by decrypting, sealed marks and leases.

Real files above the chunking threshold (3-6 MiB of random data; the large
ones start with the same 3 MiB, so their first chunks are the same blobs),
backed up through the core functions, pruned through the core functions or
the CLI, then restored and verified with --read-data 100%.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import blake3
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keepflow.tasks.core import chunk_lists, crypto, gc, lease, manifest, pack, snapshots, treeinfo, verify
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import age_tree, make_tree

MiB = 1 << 20
MARK_NAME = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}-[0-9a-f]{64}")


def _text(i: int) -> bytes:
    return (f"line {i}: the quick brown fox jumps over the lazy dog\n" * 200).encode()


@pytest.fixture
def chunked_history(tmp_path):
    """Two snapshots of chunked files. The first: a (6 MiB), b (4 MiB) and c (5 MiB), a and b starting
    with the same 3 MiB, and 20 small files (10 compressible text). The second drops a, c and
    10 small files, keeps b, adds d (3.5 MiB, the same first 3 MiB): everything the first snapshot
    stored lands in one data pack and one list pack, about a third of them still live."""
    shared = os.urandom(3 * MiB)
    spec = {"a": shared + os.urandom(3 * MiB), "b": shared + os.urandom(1 * MiB), "c": os.urandom(5 * MiB)}
    spec |= {f"small/r{i}": os.urandom(3000 + i) for i in range(10)}
    spec |= {f"small/t{i}": _text(i) for i in range(10)}
    src = make_tree(tmp_path / "src", spec)
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    core_helpers.backup(src, repo_url)
    for name in ("a", "c", *(f"small/r{i}" for i in range(5)), *(f"small/t{i}" for i in range(5))):
        (src / name).unlink()
    (src / "d").write_bytes(shared + os.urandom(MiB // 2))
    age_tree(src)
    core_helpers.backup(src, repo_url)
    return src, repo_url


def _blobs_of(repo, info) -> set[str]:
    """Every blob snapshot ``info`` needs: its content ids and the chunks of those that are lists."""
    idx = indexmod.load_index(repo)
    table = manifest.read_manifest(repo, info, columns=["type", "hash"])
    content = {h for t, h in zip(table["type"].to_pylist(), table["hash"].to_pylist(), strict=True) if t == "file"}
    lists = idx.filter(pc.and_(pc.equal(idx["type"], pack.KIND_LIST),
                               pc.is_in(idx["hash"], value_set=pa.array(sorted(content), pa.string()))))
    out = set(content)
    for chunks in chunk_lists.read_lists(repo, lists):
        assert chunks is not None
        out |= {c for c, _ in chunks}
    return out


def _lists_of(repo, info) -> dict[str, list[str]]:
    """path -> chunk ids, for the files of ``info`` stored as lists."""
    idx = indexmod.load_index(repo)
    kinds = dict(zip(idx["hash"].to_pylist(), idx["type"].to_pylist(), strict=True))
    table = manifest.read_manifest(repo, info, columns=["path", "hash"]).to_pylist()
    files = {r["path"]: r["hash"] for r in table if r["hash"] and kinds.get(r["hash"]) == pack.KIND_LIST}
    rows = idx.filter(pc.is_in(idx["hash"], value_set=pa.array(sorted(set(files.values())), pa.string())))
    by_id = {h: [c for c, _ in chunks]
             for h, chunks in zip(rows["hash"].to_pylist(), chunk_lists.read_lists(repo, rows), strict=True)}
    return {path: by_id[h] for path, h in files.items()}


def _indexed(repo) -> set[str]:
    return set(indexmod.load_index(repo)["hash"].to_pylist())


def _restore_equals(repo_url, snapshot_id, src, out) -> None:
    _, _, errors = core_helpers.restore(repo_url, out, snapshot=snapshot_id)
    assert errors == []
    assert treeinfo.describe(str(out)) == treeinfo.describe(str(src))


def test_forget_and_prune_remove_exactly_the_unreferenced_chunks_and_lists(tmp_path, chunked_history, cli):
    src, repo_url = chunked_history
    repo = Repository.open(repo_url)
    first, second = snapshots.list_snapshots(repo)
    lists = _lists_of(repo, first)
    assert set(lists) == {"a", "b", "c"} and all(len(c) >= 2 for c in lists.values())
    assert set(lists["a"]) & set(lists["b"])                      # the shared start deduplicated
    old, new = _blobs_of(repo, first), _blobs_of(repo, second)
    garbage = old - new
    assert garbage and new - old                                   # d's own chunks and list are new
    assert _indexed(repo) == old | new

    proc = cli("prune", repo_url, "--keep-last", "1", "--grace", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [s["id"] for s in out["forgotten"]] == [first.id]
    assert out["marked"]["repacked_packs"] == 2                   # the data pack and the list pack, both sparse
    assert out["swept"]["keys_deleted"] == out["marked"]["keys"] and out["swept"]["keys_rescued"] == 0

    repo = Repository.open(repo_url)
    assert [s.id for s in snapshots.list_snapshots(repo)] == [second.id]
    assert _indexed(repo) == new                                  # exactly the garbage is gone, nothing live
    assert _blobs_of(repo, second) == new
    stored = {str(p.relative_to(tmp_path / "repo")) for p in (tmp_path / "repo" / "packs").rglob("*") if p.is_file()}
    assert stored == set(indexmod.load_index(repo)["key"].to_pylist())   # no pack left that nothing indexes
    assert not (tmp_path / "repo" / "objects").exists()
    assert os.listdir(tmp_path / "repo" / "trash") == [] and os.listdir(tmp_path / "repo" / "locks") == []
    assert len(indexmod.list_index_names(repo)) == 1              # compacted into one file
    result = verify.verify(repo_url, read_data=100)
    assert result.problems == [] and result.keys_read == result.keys
    _restore_equals(repo_url, second.id, src, tmp_path / "out")


def test_repack_decrypts_and_writes_new_packs_of_one_kind(tmp_path, chunked_history):
    src, repo_url = chunked_history
    repo = Repository.open(repo_url)
    first, second = snapshots.list_snapshots(repo)
    live = _blobs_of(repo, second)
    before = indexmod.load_index(repo)
    old_rows = {r["hash"]: r for r in before.to_pylist()}
    old_keys = set(before["key"].to_pylist())
    stored_before = {h: (tmp_path / "repo" / r["key"]).read_bytes()[r["offset"]: r["offset"] + r["length"]]
                     for h, r in old_rows.items()}

    gc.forget(repo, [first])
    marked = gc.mark(repo)
    assert marked.repacked_packs == 2 and marked.repacked_blobs >= 1
    after = indexmod.load_index(repo, unique=False)
    new_rows = [r for r in after.to_pylist() if r["key"] not in old_keys]
    moved = {r["hash"] for r in new_rows}
    sparse = {old_rows[h]["key"] for h in moved}
    assert len(sparse) == 2
    # Every live blob of the sparse packs moved, nothing else did.
    assert moved == {h for h, r in old_rows.items() if r["key"] in sparse and h in live}
    for r in new_rows:
        was = old_rows[r["hash"]]
        assert r["type"] == was["type"] and r["raw_length"] == was["raw_length"]
        assert r["salt"] != was["salt"]                            # a new pack: new salt, new key
        now = (tmp_path / "repo" / r["key"]).read_bytes()[r["offset"]: r["offset"] + r["length"]]
        assert now != stored_before[r["hash"]]                     # re-encrypted, not copied
        if was["compressed"]:
            assert r["compressed"]                                 # the text files stay compressed
    assert any(r["compressed"] for r in new_rows)
    # A pack never mixes data and lists: the new packs' headers say so too.
    for key in {r["key"] for r in new_rows}:
        _, entries = pack.read_header2(repo.keys, repo.fs, repo.path(key))
        assert len({e.kind for e in entries}) == 1
        assert {e.id for e in entries} == {r["hash"] for r in new_rows if r["key"] == key}
    # The old packs are only marked: restorable before the sweep and after it.
    _restore_equals(repo_url, second.id, src, tmp_path / "out-marked")
    [mark] = gc._list_marks(repo)
    assert sparse <= set(mark["keys"]) and len(mark["keys"]) == marked.keys
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.keys_deleted == marked.keys
    assert not any((tmp_path / "repo" / k).exists() for k in sparse)
    assert verify.verify(repo_url, read_data=100).problems == []
    _restore_equals(repo_url, second.id, src, tmp_path / "out")


def _marks(tmp_path) -> list[Path]:
    return sorted((tmp_path / "repo" / "trash").iterdir())


def _flip(path: Path, where: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    return bytes(data)


def _renamed_by_hash(path: Path, data: bytes) -> Path:
    """``data`` stored under a mark name whose B3 part is its hash (the name check passes)."""
    stamp, tag, _ = path.name.split("-")
    target = path.with_name(f"{stamp}-{tag}-{blake3.blake3(data).hexdigest()}")
    target.write_bytes(data)
    return target


@pytest.mark.damages_repository          # the flipped and forged marks stay in trash/ (never deleted, never used)
def test_marks_are_sealed_and_a_damaged_or_forged_mark_is_never_acted_on(tmp_path, chunked_history):
    _, repo_url = chunked_history
    repo = Repository.open(repo_url)
    gc.forget(repo, snapshots.list_snapshots(repo)[:1])
    marked = gc.mark(repo)
    [mark_file] = _marks(tmp_path)
    assert mark_file.name == marked.mark and MARK_NAME.fullmatch(mark_file.name)
    data = mark_file.read_bytes()
    assert mark_file.name.rsplit("-", 1)[1] == blake3.blake3(data).hexdigest()
    assert data.endswith(crypto.TRASH)
    for plain in (b'"keys"', b"marked_at", b"packs/", b'"bytes"'):
        assert plain not in data
    body = json.loads(crypto.unseal(repo.keys, crypto.TRASH, data))
    assert sorted(body["keys"]) == body["keys"] and len(body["keys"]) == marked.keys
    keys = [tmp_path / "repo" / k for k in body["keys"]]
    assert verify.check_ciphertext(repo_url).problems == []        # named by the B3 of its bytes, no key needed

    # A flipped byte: its name no longer matches (the B3 check), and under a matching name
    # the tag does not verify. Either way the sweep deletes nothing.
    for where in (0, len(data) // 2, len(data) - 45, len(data) - 1):   # ciphertext, tag, salt... magic
        flipped = _flip(mark_file, where)
        mark_file.write_bytes(flipped)                             # under its old name
        bad = [mark_file, _renamed_by_hash(mark_file, flipped)]    # and under the B3 of the flipped bytes
        swept = gc.sweep(repo, grace_hours=0)
        assert swept.keys_deleted == 0 and swept.marks_done == [] and swept.marks_unreadable == 2
        assert all(k.exists() for k in keys)
        for b in bad:
            b.unlink()
        mark_file.write_bytes(data)
    # A forged mark in plaintext (format 1's form, or JSON under a B3 name) is no mark either.
    forged = json.dumps({"marked_at": "2000-01-01T00:00:00+00:00", "keys": body["keys"], "bytes": 1}).encode()
    (tmp_path / "repo" / "trash" / "20000101T000000Z-deadbeef.json").write_bytes(forged)
    _renamed_by_hash(mark_file.with_name("20000101T000000Z-deadbeef-" + "0" * 64), forged)
    mark_file.unlink()
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.keys_deleted == 0 and swept.marks_unreadable == 2 and all(k.exists() for k in keys)
    # The genuine mark, put back, is acted on.
    mark_file.write_bytes(data)
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.marks_done == [mark_file.name] and swept.keys_deleted == marked.keys
    assert not any(k.exists() for k in keys)
    assert verify.verify(repo_url, read_data=100).problems == []


def _lock_files(repo_dir: Path) -> list[Path]:
    return sorted((repo_dir / "locks").glob("*.json"))


def test_leases_are_sealed_refreshed_in_place_and_a_damaged_one_is_no_lease(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    assert repo.version == 2 and repo.encrypted
    source = "/very/secret/source-path"
    holder = lease.Holder(repo, "backup", source).acquire()
    try:
        [path] = _lock_files(tmp_path / "repo")
        assert path.name == f"backup-{holder.lease.id}.json"        # the kind stays in the name
        data = path.read_bytes()
        assert data.endswith(crypto.LEASE)
        for plain in (b'"host"', b'"kind"', b'"expires"', source.encode(), os.uname().nodename.encode()):
            assert plain not in data
        [seen] = lease.list_leases(repo)
        assert (seen.id, seen.source, seen.kind, seen.pid) == (holder.lease.id, source, "backup", os.getpid())
        with pytest.raises(lease.LeaseConflictError, match="another backup of " + source):
            lease.Holder(repo, "backup", source).acquire()
        # A refresh replaces the file with a new salt; it still opens.
        holder.lease.expires = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
        holder._write()
        refreshed = path.read_bytes()
        assert refreshed != data and refreshed[-40:-8] != data[-40:-8]
        assert lease.list_leases(repo)[0].expires == holder.lease.expires
        # A flipped byte anywhere: no lease (blocks nobody, and unlock leaves the file alone).
        for where in (0, len(refreshed) // 2, len(refreshed) - 20):
            path.write_bytes(_flip(path, where))
            assert lease.list_leases(repo) == []
            lease.Holder(repo, "backup", source).acquire().release()
            assert lease.unlock(repo, force_live=True) == ([], [])
            assert path.exists()
            path.write_bytes(refreshed)
        # A forged plaintext lease (format 1's form) is no lease either.
        forged = tmp_path / "repo" / "locks" / "prune-0123456789abcdef0123456789abcdef.json"
        forged.write_text(json.dumps({"kind": "prune", "id": "0123456789abcdef0123456789abcdef", "host": "x",
                                      "pid": 1, "created": "2000-01-01T00:00:00+00:00",
                                      "expires": "2999-01-01T00:00:00+00:00", "source": None}))
        assert [x.id for x in lease.list_leases(repo)] == [holder.lease.id]
        forged.unlink()
    finally:
        holder.release()
    assert _lock_files(tmp_path / "repo") == []


def test_unlock_removes_a_dead_holders_sealed_lease(tmp_path, cli):
    repo_url = str(tmp_path / "repo")
    repo = Repository.init(repo_url)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = lease.Holder(repo, "backup", "/src")
    dead.lease.pid = proc.pid
    dead._write(first=True)
    proc.kill()
    proc.wait()
    live = lease.Holder(repo, "backup", "/other").acquire()
    try:
        [path_dead] = [p for p in _lock_files(tmp_path / "repo") if dead.lease.id in p.name]
        assert b'"host"' not in path_dead.read_bytes()
        out = cli("unlock", repo_url, "--json")
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert [x["id"] for x in report["removed"]] == [dead.lease.id]
        assert [x["id"] for x in report["live"]] == [live.lease.id]
        assert not path_dead.exists()
        assert [x.id for x in lease.list_leases(repo)] == [live.lease.id]
    finally:
        live.release()


@pytest.mark.damages_repository          # a list pack is damaged on purpose
def test_an_unreadable_live_list_stops_prune_before_it_changes_anything(tmp_path, chunked_history, cli):
    _, repo_url = chunked_history
    repo = Repository.open(repo_url)
    first, second = snapshots.list_snapshots(repo)
    gc.forget(repo, [first])
    marked = gc.mark(repo)                    # repacks b's list into a new list pack, marks the old one
    assert marked.repacked_packs == 2
    content = set(manifest.read_manifest(repo, second, columns=["hash"])["hash"].to_pylist())
    idx = indexmod.load_index(repo, unique=False)
    marked_keys = set(gc._list_marks(repo)[0]["keys"])
    # Damage every live list outside the marked packs (b's new copy, d's list): no copy of them opens.
    for row in idx.to_pylist():
        if row["type"] == pack.KIND_LIST and row["hash"] in content and row["key"] not in marked_keys:
            path = tmp_path / "repo" / row["key"]
            path.write_bytes(_flip(path, row["offset"] + 3))
    files_before = {str(p): p.stat().st_size for p in (tmp_path / "repo").rglob("*") if p.is_file()}
    # The old list pack still holds b's list, so only d's list is lost: the sweep refuses all the same.
    with pytest.raises(gc.UnreadableListsError, match="1 chunk list"):
        gc.sweep(repo, grace_hours=0)
    with pytest.raises(gc.UnreadableListsError):
        gc.mark(repo)
    after = {str(p): p.stat().st_size for p in (tmp_path / "repo").rglob("*") if p.is_file()}
    assert after == files_before                               # nothing removed, nothing written
    proc = cli("prune", repo_url, "--keep-last", "1", "--grace", "0")
    assert proc.returncode == 1 and "cannot be read or do not authenticate" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    after = {str(p): p.stat().st_size for p in (tmp_path / "repo").rglob("*")
             if p.is_file() and not p.is_relative_to(tmp_path / "repo" / "locks")}
    assert after == files_before


def test_format2_without_encryption_keeps_plain_marks_and_leases(tmp_path):
    repo_url = str(tmp_path / "repo")
    Repository.init(repo_url, config=RepoConfig.new_v2(encryption="none"))
    src = make_tree(tmp_path / "src", {"big": os.urandom(3 * MiB), "x": b"small file"})
    age_tree(src)
    core_helpers.backup(src, repo_url)
    (src / "big").unlink()
    core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    assert not repo.encrypted
    with lease.Holder(repo, "prune"):
        [path] = _lock_files(tmp_path / "repo")
        assert json.loads(path.read_bytes())["kind"] == "prune"
    gc.forget(repo, snapshots.list_snapshots(repo)[:1])
    marked = gc.mark(repo)
    [mark_file] = _marks(tmp_path)
    assert MARK_NAME.fullmatch(mark_file.name)
    assert mark_file.name.rsplit("-", 1)[1] == blake3.blake3(mark_file.read_bytes()).hexdigest()
    assert json.loads(mark_file.read_bytes())["keys"] and marked.keys >= 1
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.keys_deleted == marked.keys
    assert verify.verify(repo_url, read_data=100).problems == []
    _restore_equals(repo_url, "latest", src, tmp_path / "out")


def test_format1_marks_and_leases_stay_plain_json(tmp_path):
    repo_url = str(tmp_path / "repo")
    Repository.init(repo_url, config=RepoConfig())
    src = make_tree(tmp_path / "src", {"big": os.urandom(2 * MiB), "x": b"small file"})
    age_tree(src)
    core_helpers.backup(src, repo_url)
    (src / "big").unlink()
    core_helpers.backup(src, repo_url)
    repo = Repository.open(repo_url)
    assert repo.version == 1
    with lease.Holder(repo, "prune", "/s"):
        [path] = _lock_files(tmp_path / "repo")
        assert json.loads(path.read_bytes())["source"] == "/s"
    gc.forget(repo, snapshots.list_snapshots(repo)[:1])
    marked = gc.mark(repo)
    [mark_file] = _marks(tmp_path)
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}\.json", mark_file.name)
    body = json.loads(mark_file.read_bytes())                   # plain JSON, as before format 2
    assert len(body["keys"]) == marked.keys and any(k.startswith("objects/") for k in body["keys"])
    assert gc.sweep(repo, grace_hours=0).keys_deleted == marked.keys
    assert verify.verify(repo_url, read_data=100).problems == []
