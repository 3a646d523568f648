"""Format 2: repair index / repair snapshots from the packs' encrypted headers, and replication as byte copies.

Repair needs the key (it reads the packs' headers). Replication needs none:
every test of it runs with no password in the environment and with
``keyring.subkeys`` made to fail, so anything on the replicate path that
asked for a key (``repo.keys``) would fail the test.
"""

from __future__ import annotations

import json
import os
import struct

import blake3
import pyarrow.compute as pc
import pytest

from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core import keyring, manifest, pack, repair, snapshots, treeinfo, verify
from keepflow.tasks.core import replicate as core_replicate
from keepflow.tasks.core.chunk_lists import read_lists
from keepflow.tasks.core.errors import WrongPasswordError
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import TEST_PASSWORD, age_tree, make_tree

MiB = 1024 * 1024
REAL_SUBKEYS = keyring.subkeys
COLUMNS = ["hash", "key", "offset", "length", "type", "seq", "salt", "raw_length", "compressed"]


# -- helpers ---------------------------------------------------------------------------------------

def _tree(root, seed: int = 0):
    """Small files, and chunked ones: random 3-6 MiB files (content-defined chunks, a list blob each).

    At least 3 MiB: the chunker's key is new in every repository, and a random 2 MiB
    file came out as one chunk (no list) in about 1.6% of repositories (no cut point
    between 512 KiB and 2 MiB); at 3 MiB that is about 0.03%."""
    spec = {f"small/f{i:02d}": os.urandom(1000 + 97 * i) for i in range(40)}
    spec |= {"big/a.bin": os.urandom(3 * MiB + 5), "big/b.bin": os.urandom(4 * MiB + 123),
             "big/c.bin": os.urandom(6 * MiB - 7), "text.txt": b"format 2 " * 5000, "ln": ("link", "text.txt"),
             "empty": None}
    src = make_tree(root, spec)
    age_tree(src)
    return src


def _backup(tmp_path, config: RepoConfig | None = None, name: str = "repo"):
    src = _tree(tmp_path / f"src-{name}")
    url = str(tmp_path / name)
    if config is not None:
        Repository.init(url, config=config)
    core_helpers.backup(src, url)
    return src, url


def _rows(url, so=None) -> set[tuple]:
    table = indexmod.load_index(Repository.open(url, so), unique=False)
    return set(zip(*(table[c].to_pylist() for c in COLUMNS), strict=True))


def _restores_exactly(tmp_path, url, src, so=None, snapshot: str = "latest", out: str = "out", skip=()) -> None:
    target = tmp_path / out
    _, _, errors = core_helpers.restore(url, target, snapshot=snapshot, storage_options=so)
    assert errors == []
    expected = {p: v for p, v in treeinfo.describe(str(src)).items() if p not in skip}
    assert treeinfo.differences(expected, treeinfo.describe(str(target))) == []


def _delete_index(url, so=None) -> int:
    repo = Repository.open(url, so)
    names = indexmod.list_index_names(repo)
    for n in names:
        repo.fs.rm_file(repo.path("index", n))
    assert indexmod.list_index_names(repo) == []
    return len(names)


def _chunked_files(url) -> dict[str, tuple[str, list[str]]]:
    """path -> (content id, chunk ids) for every chunked file of the latest snapshot."""
    repo = Repository.open(url)
    info = snapshots.list_snapshots(repo)[-1]
    table = manifest.read_manifest(repo, info, columns=["path", "type", "hash"])
    idx = indexmod.load_index(repo)
    lists = idx.filter(pc.equal(idx["type"], pack.KIND_LIST))
    by_id = dict(zip(lists["hash"].to_pylist(), read_lists(repo, lists), strict=True))
    return {p: (h, [c for c, _ in by_id[h]])
            for p, h in zip(table["path"].to_pylist(), table["hash"].to_pylist(), strict=True) if h in by_id}


def _no_key(repo):
    raise AssertionError(f"something asked for the key of {repo.url}")


class Password:
    """Switch this process between knowing no password at all and knowing one.

    ``off()``: no master key cached, no KEEPFLOW_PASSWORD, and ``keyring.subkeys`` (what
    ``repo.keys`` calls) fails the test. ``on(pw)``: nothing cached, the next open unwraps
    the master key with ``pw``. Undone after the test (monkeypatch).
    """

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def off(self) -> None:
        keyring.forget()
        self.mp.delenv("KEEPFLOW_PASSWORD", raising=False)
        self.mp.setattr(keyring, "subkeys", _no_key)

    def on(self, password: str = TEST_PASSWORD) -> None:
        keyring.forget()
        self.mp.setenv("KEEPFLOW_PASSWORD", password)
        self.mp.setattr(keyring, "subkeys", REAL_SUBKEYS)


@pytest.fixture
def password(monkeypatch):
    yield Password(monkeypatch)
    keyring.forget()


# -- repair index ----------------------------------------------------------------------------------

def test_repair_index_rebuilds_a_deleted_index_from_the_pack_headers(tmp_path):
    src, url = _backup(tmp_path)
    before = _rows(url)
    assert {r[4] for r in before} == {pack.KIND_DATA, pack.KIND_LIST}
    chunked = _chunked_files(url)
    assert sorted(chunked) == ["big/a.bin", "big/b.bin", "big/c.bin"] and all(len(c) >= 2 for _, c in chunked.values())
    assert _delete_index(url) >= 1
    assert [p["kind"] for p in verify.check_structure(url).problems] == ["missing blob"] * 44   # 40 + text + 3 lists

    result = repair.repair_index(url)
    assert result.exit_code == 0, result
    assert (result.blobs_indexed, result.blobs_found, result.objects) == (len(before), len(before), 0)
    assert result.lost == result.unreadable == result.corrupt == result.foreign == []
    assert result.packs == len({r[1] for r in before}) and result.index_files_before == 0
    # The new index file: labelled repair-..., named by the BLAKE3 of its bytes, authenticated.
    (name,) = indexmod.list_index_names(Repository.open(url))
    assert name == result.index_written and name.startswith("repair-")
    assert name.rsplit("-", 1)[1] == blake3.blake3((tmp_path / "repo" / "index" / name).read_bytes()).hexdigest()
    assert _rows(url) == before                     # every column, salts, sequence numbers and all

    check = verify.verify(url, read_data=100)
    assert check.problems == [] and check.keys_read == result.packs
    _restores_exactly(tmp_path, url, src)

    again = repair.repair_index(url, read_data=True)   # every blob opened: all sound, nothing to change
    assert again.exit_code == 0 and again.index_written is None and again.corrupt == []
    assert again.keys_read == result.packs and again.bytes_read == sum(
        p.stat().st_size for p in (tmp_path / "repo" / "packs").rglob("*") if p.is_file())
    assert indexmod.list_index_names(Repository.open(url)) == [name]


@pytest.mark.damages_repository   # the damaged pack stays
def test_a_pack_whose_header_does_not_authenticate_is_unreadable_and_left_alone(tmp_path, cli):
    src, url = _backup(tmp_path, RepoConfig.new_v2(pack_size=2 * MiB))      # several data packs
    idx = indexmod.load_index(Repository.open(url))
    data_packs = sorted(set(idx.filter(pc.equal(idx["type"], pack.KIND_DATA))["key"].to_pylist()))
    victim = data_packs[0]
    in_victim = idx.filter(pc.equal(idx["key"], victim)).num_rows
    held = set(idx.filter(pc.equal(idx["key"], victim))["hash"].to_pylist())
    chunked = _chunked_files(url)
    desc = treeinfo.describe(str(src))
    expected_lost = {p for p, (_, chunks) in chunked.items() if held & set(chunks)}
    repo = Repository.open(url)
    table = manifest.read_manifest(repo, snapshots.list_snapshots(repo)[-1], columns=["path", "hash"])
    expected_lost |= {p for p, h in zip(table["path"].to_pylist(), table["hash"].to_pylist(), strict=True) if h in held}
    assert expected_lost and expected_lost < {p for p, v in desc.items() if v[0] == "file"}   # some, not all
    path = tmp_path / "repo" / victim
    stored = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<I", stored[-12:-8])
    stored[len(stored) - pack.FOOTER2_SIZE - hlen // 2] ^= 0x01     # one bit of the encrypted header
    path.write_bytes(bytes(stored))

    for read_data in (False, True):
        result = repair.repair_index(url, read_data=read_data)
        assert [u["key"] for u in result.unreadable] == [victim], read_data
        assert "does not authenticate" in result.unreadable[0]["detail"]
        assert result.exit_code == 1 and result.lost == []
        assert result.rows_kept_unverified == in_victim          # nothing proves the old rows wrong
        assert result.index_written is None                      # the index was right: nothing to change
    assert path.read_bytes() == bytes(stored)                    # left alone

    # Without an index, the blobs only that pack held are lost, and named with their files.
    _delete_index(url)
    proc = cli("repair", "index", url, "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert [u["key"] for u in out["unreadable"]] == [victim] and out["index_written"].startswith("repair-")
    assert {p for entry in out["lost"] for p in entry["paths"]} == expected_lost
    assert path.read_bytes() == bytes(stored)


@pytest.mark.damages_repository   # the damaged chunk stays referenced and is no longer indexed
def test_read_data_leaves_out_a_chunk_that_does_not_open_and_loses_its_file(tmp_path):
    src, url = _backup(tmp_path)
    content_id, chunks = _chunked_files(url)["big/b.bin"]
    idx = indexmod.load_index(Repository.open(url))
    row = idx.filter(pc.equal(idx["hash"], chunks[1])).to_pylist()[0]
    path = tmp_path / "repo" / row["key"]
    stored = bytearray(path.read_bytes())
    stored[row["offset"] + row["length"] // 2] ^= 0x80
    path.write_bytes(bytes(stored))

    headers_only = repair.repair_index(url)      # the header still lists it: reading it is what tells
    assert headers_only.corrupt == [] and headers_only.index_written is None and headers_only.exit_code == 0

    result = repair.repair_index(url, read_data=True)
    assert result.exit_code == 1
    assert {(c["key"], c["hash"]) for c in result.corrupt} == {(row["key"], chunks[1]), (row["key"], None)}
    assert "does not authenticate" in next(c["detail"] for c in result.corrupt if c["hash"])
    (lost,) = result.lost
    assert lost["hash"] == content_id and lost["paths"] == ["big/b.bin"] and lost["files"] == 1
    assert "1 of its" in lost["detail"] and "corrupt" in lost["detail"]
    assert chunks[1] not in {r[0] for r in _rows(url)} and content_id in {r[0] for r in _rows(url)}


# -- repair snapshots ------------------------------------------------------------------------------

def test_repair_snapshots_drops_a_chunked_file_whose_chunks_are_gone(tmp_path):
    # Small packs, so the first chunked file's first pack holds nothing else.
    src, url = _backup(tmp_path, RepoConfig.new_v2(pack_size=MiB))
    chunked = _chunked_files(url)
    content_id, chunks = chunked["big/a.bin"]
    repo = Repository.open(url)
    idx = indexmod.load_index(repo)
    (victim,) = idx.filter(pc.equal(idx["hash"], chunks[0]))["key"].to_pylist()
    assert set(idx.filter(pc.equal(idx["key"], victim))["hash"].to_pylist()) <= set(chunks)
    os.unlink(tmp_path / "repo" / victim)                                   # deleted by hand
    original = snapshots.list_snapshots(repo)[-1]

    result = repair.repair_snapshots(url)
    assert result.exit_code == 1
    assert [f["path"] for f in result.files_dropped] == ["big/a.bin"]
    (lost,) = result.index["lost"]
    assert lost["hash"] == content_id and "chunks are in no pack" in lost["detail"] and "is gone" in lost["detail"]
    (replaced,) = result.replaced
    assert replaced["original"] == original.id and replaced["files_dropped"] == 1
    assert replaced["bytes_dropped"] == 3 * MiB + 5       # big/a.bin
    fixed = next(s for s in snapshots.list_snapshots(repo) if s.id == replaced["replacement"])
    assert fixed.parent == original.id and "repaired" in fixed.tags
    _restores_exactly(tmp_path, url, src, snapshot=fixed.id, skip={"big/a.bin"})
    assert not (tmp_path / "out" / "big" / "a.bin").exists()

    again = repair.repair_snapshots(url, forget=True)     # not replaced twice; the original goes now
    assert again.replaced == [] and again.forgotten == [original.id] and again.exit_code == 0
    assert verify.verify(url, read_data=100).problems == []


def test_repair_snapshots_drops_the_files_of_a_lost_list_pack(tmp_path):
    src, url = _backup(tmp_path)
    idx = indexmod.load_index(Repository.open(url))
    (list_pack,) = set(idx.filter(pc.equal(idx["type"], pack.KIND_LIST))["key"].to_pylist())
    os.unlink(tmp_path / "repo" / list_pack)
    result = repair.repair_snapshots(url, forget=True)
    assert sorted(f["path"] for f in result.files_dropped) == ["big/a.bin", "big/b.bin", "big/c.bin"]
    assert all("is gone" in p["detail"] for p in result.index["lost"]) and len(result.index["lost"]) == 3
    (left,) = snapshots.list_snapshots(Repository.open(url))
    _restores_exactly(tmp_path, url, src, snapshot=left.id, skip={"big/a.bin", "big/b.bin", "big/c.bin"})
    assert verify.verify(url).problems == []


# -- replicate -------------------------------------------------------------------------------------

def _check_replica(tmp_path, password, primary_url, replica_url, src, so=None, out="out-replica"):
    """With the password again: the replica opens, verifies reading everything, restores exactly,
    and its ciphertext checks clean with no key."""
    password.on()
    replica = Repository.open(replica_url, so)
    assert replica.config.id == Repository.open(primary_url).config.id and replica.encrypted
    assert verify.verify(replica_url, read_data=100, storage_options=so).problems == []
    cipher = verify.check_ciphertext(replica_url, 100, storage_options=so)
    assert cipher.problems == [] and cipher.keys_read == cipher.keys > 0
    _restores_exactly(tmp_path, replica_url, src, so=so, out=out)


def test_replicate_needs_no_password_and_makes_a_byte_copy(tmp_path, password):
    src, url = _backup(tmp_path)
    password.off()
    primary = tmp_path / "repo"
    replica = tmp_path / "replica"
    # A lease and a garbage mark on the primary: they describe work there, and are never copied.
    (primary / "locks").mkdir(exist_ok=True)
    (primary / "locks" / "backup-0123456789abcdef0123456789abcdef.json").write_bytes(b"sealed lease")
    (primary / "trash").mkdir(exist_ok=True)
    mark = b"sealed mark"
    (primary / "trash" / f"20261201T000000Z-0a1b2c3d-{blake3.blake3(mark).hexdigest()}").write_bytes(mark)

    result = core_replicate.replicate(url, str(replica))
    assert result.created and result.keys_copied == 1 and result.keys_removed == 0 and result.not_copied == []
    assert result.snapshots_copied == 1 and result.data_copied == len(list((primary / "packs").rglob("*/*")))
    assert (replica / "keepflow.json").read_bytes() == (primary / "keepflow.json").read_bytes()   # not re-encoded
    for folder in ("keys", "packs", "index", "snapshots"):
        mine = {p.relative_to(primary): p.read_bytes() for p in (primary / folder).rglob("*") if p.is_file()}
        theirs = {p.relative_to(replica): p.read_bytes() for p in (replica / folder).rglob("*") if p.is_file()}
        assert mine == theirs and mine, folder
    assert not (replica / "locks").exists() and not (replica / "trash").exists()

    status = core_replicate.status(url, str(replica))        # listings only
    assert status.exists and status.snapshots_missing == [] and len(status.snapshots_present) == 1
    assert (status.data_missing, status.index_missing, status.keys_missing, status.keys_to_remove) == (0, 0, 0, 0)
    again = core_replicate.replicate(url, str(replica))
    assert (again.data_copied, again.index_copied, again.snapshots_copied, again.keys_copied) == (0, 0, 0, 0)
    (primary / "locks" / "backup-0123456789abcdef0123456789abcdef.json").unlink()
    (primary / "trash").joinpath(f"20261201T000000Z-0a1b2c3d-{blake3.blake3(mark).hexdigest()}").unlink()
    _check_replica(tmp_path, password, url, str(replica), src)


def test_replicate_command_and_flow_need_no_password(tmp_path, cli_env):
    from tests.conftest import run_cli

    src, url = _backup(tmp_path)
    replica = str(tmp_path / "replica")
    env = {k: v for k, v in cli_env.items() if not k.startswith("KEEPFLOW_PASSWORD")}
    dry = run_cli(["replicate", url, replica, "--dry-run"], env=env, input="")
    assert dry.returncode == 0, dry.stderr
    assert "lacks 1 snapshots" in dry.stdout and not (tmp_path / "replica").exists()
    proc = run_cli(["replicate", url, replica], env=env, input="")
    assert proc.returncode == 0, proc.stderr
    assert "in step" in proc.stdout
    assert verify.verify(replica, read_data=100).problems == []
    _restores_exactly(tmp_path, replica, src)


def test_a_key_removed_on_the_primary_is_removed_from_the_replica(tmp_path, password):
    src, url = _backup(tmp_path)
    replica = str(tmp_path / "replica")
    second = keyring.add_key(Repository.open(url), "a second password")
    first = next(k.name for k in keyring.key_files(Repository.open(url)) if k.name != second)

    password.off()
    result = core_replicate.replicate(url, replica)
    assert result.keys_copied == 2 and result.keys_removed == 0
    assert sorted(p.name for p in (tmp_path / "replica" / "keys").iterdir()) == sorted([first, second])
    password.on("a second password")
    assert Repository.open(replica).encrypted                       # the second password opens the replica

    password.on()
    assert keyring.remove_key(Repository.open(url), second[:12]) == second
    password.off()
    status = core_replicate.status(url, replica)
    assert (status.keys_missing, status.keys_to_remove) == (0, 1)
    result = core_replicate.replicate(url, replica)
    assert (result.keys_copied, result.keys_removed) == (0, 1)
    assert [p.name for p in (tmp_path / "replica" / "keys").iterdir()] == [first]
    password.on("a second password")
    with pytest.raises(WrongPasswordError):                          # revoked on the replica too
        Repository.open(replica)
    _check_replica(tmp_path, password, url, replica, src)


def test_replicating_between_formats_or_repositories_is_refused(tmp_path, password):
    _, url = _backup(tmp_path)
    format1 = str(tmp_path / "format1")
    Repository.init(format1, config=RepoConfig())
    plain = str(tmp_path / "plain")
    Repository.init(plain, config=RepoConfig.new_v2(encryption="none"))
    other = str(tmp_path / "other")
    Repository.init(other)
    password.off()
    for target, error, words in ((format1, core_replicate.ReplicaFormatError, "format 1"),
                                 (plain, core_replicate.ReplicaFormatError, "not encrypted"),
                                 (other, core_replicate.ReplicaMismatchError, "different keepflow repository")):
        with pytest.raises(error) as err:
            core_replicate.replicate(url, target)
        message = str(err.value)
        assert target in message and words in message and "\n" not in message
        with pytest.raises(error):
            core_replicate.status(url, target)
    assert not (tmp_path / "other" / "packs").exists() and not (tmp_path / "format1" / "snapshots").exists()


@pytest.mark.damages_repository   # the primary keeps its damaged pack; the replica lacks it
def test_a_file_damaged_on_the_primary_is_not_copied(tmp_path, password):
    src, url = _backup(tmp_path)
    password.off()
    victim = sorted(p for p in (tmp_path / "repo" / "packs").rglob("*") if p.is_file())[0]
    stored = bytearray(victim.read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    victim.write_bytes(bytes(stored))
    replica = tmp_path / "replica"
    with pytest.raises(core_replicate.PrimaryDamagedError) as err:
        core_replicate.replicate(url, str(replica))
    key = str(victim.relative_to(tmp_path / "repo"))
    assert key in str(err.value) and "\n" not in str(err.value)
    assert not (replica / key).exists()
    assert len(list((replica / "snapshots").iterdir())) == 1       # everything else was copied


def test_a_copy_the_replica_returns_wrong_is_removed_and_copied_again(tmp_path, password, monkeypatch):
    src, url = _backup(tmp_path)
    password.off()
    replica = tmp_path / "replica"
    real = core_replicate.storage.write_once
    hit = []

    def flipping(fs, path, data):
        if "/packs/" in path and not hit:
            hit.append(path)
            data = bytes(data[:-1]) + bytes([data[-1] ^ 1])
        return real(fs, path, data)

    monkeypatch.setattr(core_replicate.storage, "write_once", flipping)
    with pytest.raises(core_replicate.ReplicaVerifyError, match="does not match the hash in its name"):
        core_replicate.replicate(url, str(replica))
    assert hit and not os.path.exists(hit[0])                       # the bad copy is gone
    monkeypatch.setattr(core_replicate.storage, "write_once", real)
    result = core_replicate.replicate(url, str(replica))
    assert result.snapshots_copied == 1 and result.not_copied == []
    _check_replica(tmp_path, password, url, str(replica), src)


# -- real servers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["s3", "sftp"])
def test_replicate_to_a_remote_replica_without_a_password(tmp_path, request, kind, fresh_fs_caches, password):
    server = request.getfixturevalue(f"{kind}_server")
    so, replica = server.storage_options, server.unique_url("f2rep")
    src, url = _backup(tmp_path)
    password.off()

    result = core_replicate.replicate(url, replica, replica_options=so)
    assert result.created and result.keys_copied == 1 and result.snapshots_copied == 1 and result.not_copied == []
    remote = Repository.open(replica, so, unlock=False)
    assert remote.fs.cat_file(remote.path("keepflow.json")) == (tmp_path / "repo" / "keepflow.json").read_bytes()
    status = core_replicate.status(url, replica, so)
    assert status.snapshots_missing == [] and status.data_missing == 0 and status.keys_missing == 0
    again = core_replicate.replicate(url, replica, replica_options=so)
    assert (again.data_copied, again.index_copied, again.snapshots_copied, again.keys_copied) == (0, 0, 0, 0)
    _check_replica(tmp_path, password, url, replica, src, so=so)
