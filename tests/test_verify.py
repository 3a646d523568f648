"""verify: structure problems, data corruption, sampling, flow artifacts and exit codes."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from keepflow.tasks.core import chunk_lists, manifest, pack, snapshots, verify
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import make_tree


@pytest.fixture(params=[2, 1], ids=["format2", "format1"])
def repo(tmp_path, request):
    """Two snapshots of 30 small files and a 2 MiB one (format 1: in objects/; format 2: chunks in packs)."""
    src = make_tree(tmp_path / "src", {f"d{i % 3}/f{i}": os.urandom(3000 + i) for i in range(30)}
                    | {"big.bin": os.urandom(2 << 20)})
    url = str(tmp_path / "repo")
    Repository.init(url, config=RepoConfig() if request.param == 1 else None)
    core_helpers.backup(src, url)
    (src / "d0" / "f0").write_bytes(b"changed")
    core_helpers.backup(src, url)
    return tmp_path / "repo"


ALL_FILES = {f"d{i % 3}/f{i}" for i in range(30)} | {"big.bin"}


def _data_files(repo):
    return sorted(p for folder in ("packs", "objects") for p in (repo / folder).rglob("*") if p.is_file())


def _index_rows(repo) -> list[dict]:
    return indexmod.load_index(Repository.open(str(repo))).to_pylist()


def _data_blobs(repo) -> list[dict]:
    """The index rows of every data blob (format 2's chunk lists left out: they are structure)."""
    return [r for r in _index_rows(repo) if r.get("type", pack.KIND_DATA) == pack.KIND_DATA]


def _content_row(repo, path: str) -> dict:
    """The index row of ``path``'s content id in the latest snapshot (format 2: a chunked file's list)."""
    r = Repository.open(str(repo))
    table = manifest.read_manifest(r, snapshots.resolve(r, "latest"), columns=["path", "hash"])
    blob = dict(zip(table["path"].to_pylist(), table["hash"].to_pylist(), strict=True))[path]
    return next(row for row in _index_rows(repo) if row["hash"] == blob)


def _flip(path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_clean_repository_has_no_problems(repo):
    result = verify.verify(str(repo), read_data=100)
    assert result.problems == [] and result.snapshots == 2 and result.keys_read == result.keys >= 2


@pytest.mark.damages_repository
def test_missing_key_names_snapshots_and_paths(repo):
    # The key holding big.bin's content id (format 1: its object; format 2: the pack of its chunk list).
    row = _content_row(repo, "big.bin")
    assert [r["hash"] for r in _index_rows(repo) if r["key"] == row["key"]] == [row["hash"]]   # nothing else
    (repo / row["key"]).unlink()
    problems = verify.verify(str(repo)).problems
    if row["key"].startswith("objects/"):
        assert [p["kind"] for p in problems] == ["missing key"]
    else:                                        # format 2: and so the file's chunk list cannot be read
        assert sorted(p["kind"] for p in problems) == ["bad list", "missing key"]
    assert next(p for p in problems if p["kind"] == "missing key")["key"] == row["key"]
    for p in problems:
        assert p["paths"] == ["big.bin"] and len(p["snapshots"]) == 2


@pytest.mark.damages_repository
def test_missing_chunks_name_the_chunked_file(tmp_path):
    """Format 2: a large file's data is its chunks; losing the pack that holds them names the file
    (format 1 stores it whole: test_missing_key_names_snapshots_and_paths). Few files, so that the
    paths a problem names (at most MAX_PATHS_PER_PROBLEM) are all of them."""
    src = make_tree(tmp_path / "src", {"big.bin": os.urandom(3 << 20), "small": "small"})
    url = str(tmp_path / "repo")
    core_helpers.backup(src, url)
    repo = tmp_path / "repo"
    big = _content_row(repo, "big.bin")
    assert big["type"] == pack.KIND_LIST
    [chunks] = chunk_lists.read_lists(Repository.open(url), pa.Table.from_pylist([big]))
    chunk_keys = {row["key"] for row in _index_rows(repo) if row["hash"] in {c for c, _ in chunks}}
    assert len(chunks) >= 2 and chunk_keys and big["key"] not in chunk_keys
    for key in chunk_keys:
        (repo / key).unlink()
    problems = verify.verify(url).problems
    assert {p["kind"] for p in problems} == {"missing key"} and {p["key"] for p in problems} == chunk_keys
    assert all("big.bin" in p["paths"] and len(p["snapshots"]) == 1 for p in problems)


@pytest.mark.damages_repository
def test_short_key(repo):
    pack = max((p for p in _data_files(repo) if "packs" in p.parts), key=lambda p: p.stat().st_size)
    pack.write_bytes(pack.read_bytes()[:10])            # the big pack: its blobs end far beyond 10 bytes
    kinds = {p["kind"] for p in verify.verify(str(repo)).problems}
    assert "short key" in kinds


@pytest.mark.damages_repository
def test_corruption_found_only_when_data_is_read(repo):
    # One flipped byte in every data blob, found through the index.
    for row in _data_blobs(repo):
        _flip(repo / row["key"], row["offset"] + min(5, row["length"] - 1))
    assert verify.verify(str(repo), read_data=0).problems == []
    problems = verify.verify(str(repo), read_data=100).problems
    kinds = {p["kind"] for p in problems}
    assert {"corrupt blob", "wrong name"} <= kinds
    assert {path for p in problems if p["kind"] == "corrupt blob" for path in p["paths"]} == ALL_FILES


@pytest.mark.damages_repository
@pytest.mark.parametrize("repo", [2], ids=["format2"], indirect=True)
def test_a_damaged_chunk_list_is_found_by_the_structural_check(repo):
    """Format 2: chunk lists are structure (like restic's trees), checked without --read-data."""
    big = _content_row(repo, "big.bin")
    assert big["type"] == pack.KIND_LIST
    _flip(repo / big["key"], big["offset"] + 5)
    problems = verify.verify(str(repo), read_data=0).problems
    assert [(p["kind"], p["hash"], p["paths"]) for p in problems] == [("bad list", big["hash"], ["big.bin"])]


@pytest.mark.damages_repository
def test_manifest_hash_missing_from_index(repo):
    for f in (repo / "index").iterdir():
        f.unlink()
    problems = verify.verify(str(repo)).problems
    missing = [p for p in problems if p["kind"] == "missing blob"]
    assert len(missing) >= 31 and all(p["snapshots"] for p in missing)


@pytest.mark.damages_repository
def test_damaged_manifest_is_reported_not_fatal(repo):
    manifest = sorted((repo / "snapshots").iterdir())[0]
    manifest.write_bytes(b"PAR1 garbage")
    problems = verify.verify(str(repo)).problems
    assert any(p["kind"] == "bad manifest" for p in problems)


def test_sample_differs_between_runs(repo):
    keys = [f"packs/{i:02x}/k{i}" for i in range(100)]
    samples = {tuple(sorted(verify.choose_keys(keys, 10, seed))) for seed in range(5)}
    assert len(samples) == 5 and all(len(s) == 10 for s in samples)
    assert sorted(verify.choose_keys(keys, 100, 1)) == keys
    assert len(verify.choose_keys(keys, 0.1, 1)) == 1
    _, read, _ = verify.check_data(str(repo), 50, seed=3)
    assert 1 <= read < verify.check_structure(str(repo)).keys + 1


def test_percent_parsing():
    assert verify.parse_percent("10%") == 10 and verify.parse_percent("100") == 100
    for bad in ("ten", "-1%", "101%"):
        with pytest.raises(Exception, match="read-data"):
            verify.parse_percent(bad)


@pytest.mark.damages_repository
def test_verify_cli_exit_codes_and_artifacts(repo, cli, prefect_api_url):
    ok = cli("verify", str(repo), "--read-data", "100%", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["problems"] == []
    for row in _data_blobs(repo):
        _flip(repo / row["key"], row["offset"] + max(0, row["length"] - 20))
    bad = cli("verify", str(repo), "--read-data", "100%")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("keepflow: error:")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["verify-problems"])))
    assert arts and any("corrupt" in str(a.data) for a in arts)
