"""verify: structure problems, data corruption, sampling, flow artifacts and exit codes."""

from __future__ import annotations

import json
import os

import pytest

from tasks.core import verify

from tests import core_helpers
from tests.conftest import make_tree


@pytest.fixture
def repo(tmp_path):
    src = make_tree(tmp_path / "src", {f"d{i % 3}/f{i}": os.urandom(3000 + i) for i in range(30)}
                    | {"big.bin": os.urandom(2 << 20)})
    url = str(tmp_path / "repo")
    core_helpers.backup(src, url)
    (src / "d0" / "f0").write_bytes(b"changed")
    core_helpers.backup(src, url)
    return tmp_path / "repo"


def _data_files(repo):
    return sorted(p for folder in ("packs", "objects") for p in (repo / folder).rglob("*") if p.is_file())


def test_clean_repository_has_no_problems(repo):
    result = verify.verify(str(repo), read_data=100)
    assert result.problems == [] and result.snapshots == 2 and result.keys_read == result.keys >= 2


@pytest.mark.damages_repository
def test_missing_key_names_snapshots_and_paths(repo):
    obj = next(p for p in _data_files(repo) if "objects" in p.parts)
    obj.unlink()
    problems = verify.verify(str(repo)).problems
    assert [p["kind"] for p in problems] == ["missing key"]
    assert problems[0]["paths"] == ["big.bin"] and len(problems[0]["snapshots"]) == 2


@pytest.mark.damages_repository
def test_short_key(repo):
    pack = max((p for p in _data_files(repo) if "packs" in p.parts), key=lambda p: p.stat().st_size)
    pack.write_bytes(pack.read_bytes()[:10])            # the big pack: its blobs end far beyond 10 bytes
    kinds = {p["kind"] for p in verify.verify(str(repo)).problems}
    assert "short key" in kinds


def test_corruption_found_only_when_data_is_read(repo):
    for path in _data_files(repo):
        data = bytearray(path.read_bytes())
        data[5] ^= 0xFF
        path.write_bytes(bytes(data))
    assert verify.verify(str(repo), read_data=0).problems == []
    problems = verify.verify(str(repo), read_data=100).problems
    kinds = {p["kind"] for p in problems}
    assert {"corrupt blob", "wrong name"} <= kinds
    assert any(p["paths"] for p in problems if p["kind"] == "corrupt blob")


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


def test_verify_cli_exit_codes_and_artifacts(repo, cli, prefect_api_url):
    ok = cli("verify", str(repo), "--read-data", "100%", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["problems"] == []
    for path in _data_files(repo):
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))
    bad = cli("verify", str(repo), "--read-data", "100%")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("keepflow: error:")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["verify-problems"])))
    assert arts and any("corrupt" in str(a.data) for a in arts)
