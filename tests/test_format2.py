"""Repository format 2: nothing in plaintext, every byte authenticated, passwords, chunks, compression.

These are the tests issue 9 asks for, on real files through the real
command (and the core functions where a test needs to look inside):

* no plaintext: marker strings in file contents and names appear in no
  stored file, raw or zstd-decompressed;
* tampering: one flipped byte in a pack, an index file, a manifest or a key
  file is detected; verify exits 1 naming what is damaged, restore refuses
  exactly the affected files and nothing corrupt lands under a real name;
* wrong and missing passwords fail with exit 10 and write nothing, on every
  command that opens a repository;
* key add/remove/passwd round trips, and no key file is rewritten in place;
* content-defined chunking: 100 bytes inserted in a 64 MiB random file, or
  1 MiB appended to a 100 MiB file, store a few chunks, not the file;
* compression: text is stored compressed, random data raw.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from keepflow.tasks.core import keyring

from tests.conftest import TEST_PASSWORD, age_tree, make_tree, run_cli

MiB = 1024 * 1024
MARKER_CONTENT = "zebracontent-7f3a91"
MARKER_NAME = "zebraname-c41d07"


def _no_password_env(env: dict) -> dict:
    env = dict(env)
    for name in ("KEEPFLOW_PASSWORD", "KEEPFLOW_PASSWORD_FILE", "KEEPFLOW_PASSWORD_COMMAND"):
        env.pop(name, None)
    return env


def _stored_files(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if p.is_file()]


def _zstd_frames_decompressed(data: bytes) -> bytes:
    """Every zstd frame found in ``data`` decompressed (what an attacker could try)."""
    try:
        from compression import zstd  # Python 3.14
    except ImportError:
        from backports import zstd
    out, magic, start = [], b"\x28\xb5\x2f\xfd", 0
    while (i := data.find(magic, start)) >= 0:
        try:
            out.append(zstd.ZstdDecompressor().decompress(data[i:]))
        except Exception:
            pass
        start = i + 1
    return b"".join(out)


@pytest.fixture
def text_tree(tmp_path):
    lines = "".join(f"{MARKER_CONTENT} line {i} of a log that compresses well\n" for i in range(20000))
    rng = random.Random(5)
    tree = make_tree(tmp_path / "src", {
        f"{MARKER_NAME}/notes-{MARKER_NAME}.txt": lines,
        "logs/app.log": lines * 3,                                 # > 1 MiB: chunked
        "small.txt": f"tiny {MARKER_CONTENT}\n",
        "random.bin": rng.randbytes(3 * MiB),
        "dup.bin": rng.randbytes(200_000),
        f"link-{MARKER_NAME}": ("link", f"{MARKER_NAME}/notes-{MARKER_NAME}.txt"),
    })
    age_tree(tree)
    return tree


def test_no_plaintext_anywhere_in_the_repository(text_tree, tmp_path, cli):
    repo = tmp_path / "repo"
    cli("backup", text_tree, repo, check=True)
    info = json.loads((repo / "keepflow.json").read_text())
    assert info["version"] == 2 and info["encryption"] == "aes-256-gcm" and isinstance(info["config"], str)
    files = _stored_files(repo)
    assert any(p.parts[-3] == "packs" for p in files) and any("index" in p.parts for p in files)
    for path in files:
        raw = path.read_bytes()
        for marker in (MARKER_CONTENT, MARKER_NAME, "logs/app.log", "small.txt", str(text_tree)):
            assert marker.encode() not in raw, f"{marker!r} in {path.relative_to(repo)}"
            assert marker.encode() not in _zstd_frames_decompressed(raw), f"{marker!r} (zstd) in {path}"
        assert b"PAR1" not in raw, f"plaintext Parquet in {path.relative_to(repo)}"
    # ... and yet it is all there.
    out = tmp_path / "out"
    cli("restore", repo, out, check=True)
    assert (out / "logs/app.log").read_bytes() == (text_tree / "logs/app.log").read_bytes()
    assert os.readlink(out / f"link-{MARKER_NAME}") == f"{MARKER_NAME}/notes-{MARKER_NAME}.txt"


def test_text_is_stored_compressed_and_random_data_raw(text_tree, tmp_path, cli):
    repo = tmp_path / "repo"
    out = json.loads(cli("backup", text_tree, repo, "--json", check=True).stdout)
    from keepflow.tasks.core import index
    from keepflow.tasks.core.repository import Repository

    idx = index.load_index(Repository.open(str(repo))).to_pylist()
    data = [r for r in idx if r["type"] == 0]
    compressed = [r for r in data if r["compressed"]]
    raw = [r for r in data if not r["compressed"]]
    assert compressed and raw
    assert all(r["length"] < r["raw_length"] / 4 for r in compressed if r["raw_length"] > 100_000)
    assert all(r["length"] == r["raw_length"] + 16 for r in raw)      # stored = payload + GCM tag
    text_bytes = sum((text_tree / p).stat().st_size for p in (f"{MARKER_NAME}/notes-{MARKER_NAME}.txt",
                                                                "logs/app.log", "small.txt"))
    # 3 MiB + 200 kB of random data raw, ~6 MiB of text squeezed to a few percent.
    assert out["bytes_written"] < 3 * MiB + 200_000 + text_bytes * 0.1

    off = tmp_path / "off"
    cli("init", off, "--compression", "off", check=True)
    cli("backup", text_tree, off, check=True)
    idx = index.load_index(Repository.open(str(off))).to_pylist()
    assert not any(r["compressed"] for r in idx)


# -- tampering ---------------------------------------------------------------------------------

def _flip(path: Path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where % len(data)] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


@pytest.fixture
def backed_up(text_tree, tmp_path, cli):
    repo = tmp_path / "repo"
    cli("backup", text_tree, repo, check=True)
    return text_tree, repo


def _packs(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "packs").rglob("*") if p.is_file())


def _real_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.damages_repository
def test_a_flipped_byte_in_a_pack_blob_is_found_and_only_its_files_are_refused(backed_up, tmp_path, cli):
    src, repo = backed_up
    from keepflow.tasks.core import index
    from keepflow.tasks.core.repository import Repository

    idx = index.load_index(Repository.open(str(repo)))
    row = next(r for r in idx.to_pylist() if r["type"] == 0 and r["raw_length"] == 200_000)   # dup.bin
    _flip(repo / row["key"], row["offset"] + 1000)
    proc = cli("verify", repo, "--read-data", "100%")
    assert proc.returncode == 1
    assert row["hash"][:16] in proc.stderr or row["key"] in proc.stderr
    assert "dup.bin" in proc.stderr
    out = tmp_path / "out"
    proc = cli("restore", repo, out)
    assert proc.returncode == 1 and "dup.bin" in proc.stderr
    restored = _real_files(out)
    assert "dup.bin" not in restored                        # nothing corrupt under a real name
    expected = _real_files(src)
    expected.pop("dup.bin")
    assert restored == expected                             # everything else is exact
    assert not [p for p in out.rglob("*") if ".kftmp" in p.name or ".tmp" in p.name]


@pytest.mark.damages_repository
def test_a_flipped_byte_in_a_pack_header_is_found(backed_up, cli):
    _, repo = backed_up
    pack = max(_packs(repo), key=lambda p: p.stat().st_size)
    _flip(pack, pack.stat().st_size - 44 - 100)              # inside the encrypted header
    proc = cli("verify", repo, "--read-data", "100%")
    assert proc.returncode == 1 and pack.name[:16] in proc.stderr


@pytest.mark.damages_repository
def test_a_flipped_byte_in_an_index_file_is_found(backed_up, cli):
    _, repo = backed_up
    index_file = next((repo / "index").iterdir())
    _flip(index_file, 40)
    proc = cli("verify", repo)
    assert proc.returncode == 1 and index_file.name[:20] in proc.stderr
    assert "bad index" in proc.stderr


@pytest.mark.damages_repository
def test_a_flipped_byte_in_a_manifest_is_found_and_never_parsed(backed_up, tmp_path, cli):
    _, repo = backed_up
    manifest = next((repo / "snapshots").iterdir())
    _flip(manifest, 100)                                    # in the Parquet body
    proc = cli("verify", repo)
    assert proc.returncode == 1 and manifest.name[:30] in proc.stderr
    assert cli("restore", repo, tmp_path / "out").returncode == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.txt"))


@pytest.mark.damages_repository
def test_a_flipped_byte_in_the_facts_of_a_manifest_makes_it_unlisted_loudly(backed_up, cli):
    _, repo = backed_up
    manifest = next((repo / "snapshots").iterdir())
    _flip(manifest, manifest.stat().st_size - 60)           # the encrypted facts block
    proc = cli("snapshots", repo)
    assert proc.returncode == 3 and manifest.name[:30] in proc.stderr


@pytest.mark.damages_repository
def test_a_flipped_byte_in_a_key_file_is_reported_as_damage_not_as_a_wrong_password(backed_up, cli):
    _, repo = backed_up
    key_file = next((repo / "keys").iterdir())
    _flip(key_file, 200)
    proc = cli("snapshots", repo)
    assert proc.returncode == 10
    assert "damaged" in proc.stderr and key_file.name[:16] in proc.stderr


@pytest.mark.damages_repository
def test_a_changed_plain_field_of_keepflow_json_fails_authentication(backed_up, cli):
    _, repo = backed_up
    path = repo / "keepflow.json"
    data = json.loads(path.read_text())
    data["created_at"] = "2020-01-01T00:00:00+00:00"
    path.write_text(json.dumps(data))
    proc = cli("snapshots", repo)
    assert proc.returncode == 10 and "does not authenticate" in proc.stderr


def test_ciphertext_only_verify_needs_no_password_and_finds_a_flipped_byte(backed_up, cli_env):
    _, repo = backed_up
    env = _no_password_env(cli_env)
    proc = run_cli(["verify", repo, "--ciphertext-only", "--read-data", "100%"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tags and references were not checked" in proc.stdout


@pytest.mark.damages_repository
def test_ciphertext_only_verify_names_a_damaged_file(backed_up, cli_env):
    _, repo = backed_up
    env = _no_password_env(cli_env)
    index_file = next((repo / "index").iterdir())
    _flip(index_file, 7)
    proc = run_cli(["verify", repo, "--ciphertext-only"], env=env)
    assert proc.returncode == 1 and index_file.name[:20] in proc.stderr


# -- passwords -----------------------------------------------------------------------------------

READ_COMMANDS = [["snapshots", "{repo}"], ["ls", "{repo}"], ["stats", "{repo}"], ["verify", "{repo}"],
                 ["restore", "{repo}", "{out}"], ["backup", "{src}", "{repo}"], ["prune", "{repo}", "--keep-last", "1"],
                 ["repair", "index", "{repo}", "--dry-run"], ["unlock", "{repo}"], ["key", "list", "{repo}"],
                 ["diff", "{repo}", "latest", "latest"]]


@pytest.mark.parametrize("password", [None, "hunter2-not-it"], ids=["missing", "wrong"])
def test_every_command_refuses_a_missing_or_wrong_password_and_writes_nothing(backed_up, tmp_path, cli_env,
                                                                               password):
    src, repo = backed_up
    env = _no_password_env(cli_env)
    if password:
        env["KEEPFLOW_PASSWORD"] = password
    before = sorted((str(p.relative_to(repo)), p.stat().st_size) for p in repo.rglob("*"))
    for args in READ_COMMANDS:
        argv = [a.format(repo=repo, out=tmp_path / "out", src=src) for a in args]
        proc = run_cli(argv, env=env)
        assert proc.returncode == 10, (argv, proc.returncode, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert ("wrong password" if password else "no password") in proc.stderr
        assert "Traceback" not in proc.stderr
        if password:
            assert password not in proc.stderr and password not in proc.stdout
    assert sorted((str(p.relative_to(repo)), p.stat().st_size) for p in repo.rglob("*")) == before
    assert not (tmp_path / "out").exists()


def test_password_file_option_and_environment_sources(backed_up, tmp_path, cli_env):
    _, repo = backed_up
    env = _no_password_env(cli_env)
    secret = tmp_path / "pw"
    secret.write_text(TEST_PASSWORD + "\n")
    assert run_cli(["snapshots", repo, "--password-file", secret], env=env).returncode == 0
    assert run_cli(["snapshots", repo], env={**env, "KEEPFLOW_PASSWORD_FILE": str(secret)}).returncode == 0
    assert run_cli(["snapshots", repo], env={**env, "KEEPFLOW_PASSWORD_COMMAND": f"cat {secret}"}).returncode == 0


def _key_files(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (repo / "keys").iterdir()}


def test_key_add_remove_passwd_round_trip_and_key_files_are_never_rewritten(backed_up, tmp_path, cli_env):
    _, repo = backed_up
    env = dict(cli_env)
    first = _key_files(repo)
    assert len(first) == 1

    new_pw = tmp_path / "new"
    new_pw.write_text("second password\n")
    added = json.loads(run_cli(["key", "add", repo, "--new-password-file", new_pw, "--json"], env=env,
                               check=True).stdout)["added"]
    keys = _key_files(repo)
    assert len(keys) == 2 and all(keys[name] == data for name, data in first.items())   # old file untouched
    # Both passwords open it now.
    second_env = {**env, "KEEPFLOW_PASSWORD": "second password"}
    assert run_cli(["snapshots", repo], env=second_env).returncode == 0
    assert run_cli(["snapshots", repo], env=env).returncode == 0
    listing = json.loads(run_cli(["key", "list", repo, "--json"], env=second_env, check=True).stdout)["keys"]
    assert [k["id"] for k in listing if k["current"]] == [added]

    # passwd: the first password's key is replaced by a third password's; never edited in place.
    third = tmp_path / "third"
    third.write_text("third password\n")
    run_cli(["key", "passwd", repo, "--new-password-file", third], env=env, check=True)
    keys_after = _key_files(repo)
    assert len(keys_after) == 2
    assert not set(first) & set(keys_after)                 # the old file is gone, not rewritten
    assert all(name == __import__("blake3").blake3(data).hexdigest() for name, data in keys_after.items())
    assert run_cli(["snapshots", repo], env=env).returncode == 10          # the old password no longer opens
    assert run_cli(["snapshots", repo], env={**env, "KEEPFLOW_PASSWORD": "third password"}).returncode == 0

    # remove: one of the two goes; the last one is refused.
    proc = run_cli(["key", "remove", repo, added], env={**env, "KEEPFLOW_PASSWORD": "third password"})
    assert proc.returncode == 0, proc.stderr
    last = next(iter(_key_files(repo)))
    proc = run_cli(["key", "remove", repo, last[:16]], env={**env, "KEEPFLOW_PASSWORD": "third password"})
    assert proc.returncode == 2 and "last key" in proc.stderr
    assert len(_key_files(repo)) == 1
    # The test password opens it again (the integrity check after the test uses it).
    back = tmp_path / "back"
    back.write_text(TEST_PASSWORD + "\n")
    run_cli(["key", "add", repo, "--new-password-file", back], env={**env, "KEEPFLOW_PASSWORD": "third password"},
            check=True)
    keyring.forget()


def test_init_without_encryption_keeps_plain_parquet_and_needs_no_password(tmp_path, cli_env, text_tree):
    env = _no_password_env(cli_env)
    repo = tmp_path / "plain"
    assert run_cli(["init", repo, "--encryption", "none"], env=env).returncode == 0
    assert run_cli(["backup", text_tree, repo], env=env).returncode == 0
    assert not (repo / "keys").exists()
    import pyarrow.parquet as pq

    manifest = next((repo / "snapshots").iterdir())
    assert manifest.name.endswith(".parquet")
    table = pq.read_table(manifest)
    assert "logs/app.log" in table["path"].to_pylist()
    assert run_cli(["restore", repo, tmp_path / "out"], env=env).returncode == 0
    assert (tmp_path / "out/logs/app.log").read_bytes() == (text_tree / "logs/app.log").read_bytes()


def test_format_1_still_works_and_is_never_converted(tmp_path, cli, text_tree):
    repo = tmp_path / "v1"
    cli("init", repo, "--format", "1", check=True)
    cli("backup", text_tree, repo, check=True)
    cli("backup", text_tree, repo, "--rehash", check=True)
    assert json.loads((repo / "keepflow.json").read_text())["version"] == 1
    assert not (repo / "keys").exists()
    cli("restore", repo, tmp_path / "out", check=True)
    assert _real_files(tmp_path / "out") == _real_files(text_tree)


# -- content-defined chunking ---------------------------------------------------------------------

def _stored(cli, src, repo) -> int:
    return json.loads(cli("backup", src, repo, "--json", "--compression", "off", check=True).stdout)["bytes_stored"]


def test_an_insert_in_the_middle_of_a_large_file_stores_a_few_chunks(tmp_path, cli):
    rng = random.Random(64)
    data = rng.randbytes(64 * MiB)
    src = make_tree(tmp_path / "src", {"disk.img": data})
    age_tree(src)
    repo = tmp_path / "repo"
    first = _stored(cli, src, repo)
    assert first >= 64 * MiB
    (src / "disk.img").write_bytes(data[: 32 * MiB] + rng.randbytes(100) + data[32 * MiB:])
    age_tree(src)
    second = _stored(cli, src, repo)
    assert second < 5 * MiB, f"stored {second} bytes after a 100-byte insert"
    cli("restore", repo, tmp_path / "out", check=True)
    assert (tmp_path / "out/disk.img").read_bytes() == (src / "disk.img").read_bytes()


def test_appending_1_mib_to_a_100_mib_file_stores_about_1_to_2_mib(tmp_path, cli):
    rng = random.Random(100)
    src = make_tree(tmp_path / "src", {"db.dump": rng.randbytes(100 * MiB)})
    age_tree(src)
    repo = tmp_path / "repo"
    _stored(cli, src, repo)
    with open(src / "db.dump", "ab") as f:
        f.write(rng.randbytes(MiB))
    age_tree(src)
    second = _stored(cli, src, repo)
    assert MiB <= second <= 4 * MiB, second       # the old last chunk again (NC 2: under 2 MiB) and the new MiB
    cli("verify", repo, "--read-data", "100%", check=True)


@pytest.mark.damages_repository
def test_a_damaged_chunk_list_on_the_primary_is_read_from_a_fallback_replica(backed_up, tmp_path, cli):
    src, repo = backed_up
    replica = tmp_path / "replica"
    cli("replicate", repo, replica, check=True)
    from keepflow.tasks.core import index
    from keepflow.tasks.core.repository import Repository

    rows = index.load_index(Repository.open(str(repo))).to_pylist()
    lists = [r for r in rows if r["type"] == 1]
    assert lists                                            # logs/app.log and random.bin are chunked
    for r in lists:
        _flip(repo / r["key"], r["offset"] + 5)
    assert cli("restore", repo, tmp_path / "no-fallback").returncode == 1
    proc = cli("restore", repo, tmp_path / "out", "--fallback", replica)
    assert proc.returncode == 0, proc.stderr
    assert _real_files(tmp_path / "out") == _real_files(src)
