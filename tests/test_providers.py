"""One conformance suite for every provider: local, memory, S3, Azure Blob, SFTP.

The same scenarios run against each (backup, incremental, restore of every
snapshot, snapshots / ls / diff, an interrupted run), through the core, through
the real Prefect flow, and through the real CLI with credentials taken from
the environment only. S3, Azure and SFTP are real servers (SeaweedFS,
Azurite, OpenSSH) started once per session by ``tests/servers.py``.

Also here: request cost on S3 (counted at the server and at the client) and
bad input (unknown scheme, missing bucket/container, wrong credentials,
unreachable host), each a one-line keepflow error naming the provider and
the fix.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from keepflow.tasks.core import analysis, manifest, snapshots, treeinfo
from keepflow.tasks.core import backup as core_backup
from keepflow.tasks.core.errors import StorageError, UsageError
from keepflow.tasks.core.repository import Repository
from keepflow.tasks.core.snapshot_diff import compare

from tests import core_helpers
from tests.conftest import age_tree, make_tree, run_cli
from tests.servers import S3RequestCounter, clear_fs_caches

MiB = 1024 * 1024
PROVIDERS = ["local", "memory", "s3", "azure", "sftp"]
REMOTE = ["s3", "azure", "sftp"]


# -- providers -----------------------------------------------------------------

class _Local:
    name = "local"
    storage_options: dict = {}
    env: dict = {}

    def __init__(self, base):
        self.base = base

    def unique_url(self, prefix="repo"):
        return str(self.base / f"{prefix}-{uuid.uuid4().hex[:10]}")


class _Memory:
    name = "memory"
    storage_options: dict = {}
    env: dict = {}

    def unique_url(self, prefix="repo"):
        return f"memory://kf-{uuid.uuid4().hex[:10]}/{prefix}"


@pytest.fixture(params=PROVIDERS)
def provider(request, tmp_path_factory):
    kind = request.param
    if kind == "local":
        return _Local(tmp_path_factory.mktemp("local-repos"))
    if kind == "memory":
        return _Memory()
    return request.getfixturevalue({"s3": "s3_server", "azure": "azure_server", "sftp": "sftp_server"}[kind])


@pytest.fixture(params=REMOTE)
def remote(request):
    return request.getfixturevalue({"s3": "s3_server", "azure": "azure_server", "sftp": "sftp_server"}[request.param])


# -- running the core with storage options on every step ------------------------

def backup(source, url, so, **kw):
    return core_helpers.backup(source, url, storage_options=so, **kw)


def restore(url, target, so, **kw):
    return core_helpers.restore(url, target, storage_options=so, **kw)


def tree_v1(root):
    spec = {f"docs/d{i % 3}/note{i}.txt": f"note {i} " * (i + 1) for i in range(30)}
    spec.update({"bin/blob.dat": os.urandom(20_000), "empty.txt": "", "big/large.bin": os.urandom(MiB + 123),
                 "emptydir": None, "link": ("link", "docs/d0/note0.txt"), "same/a": "dup", "same/b": "dup"})
    root = make_tree(root, spec)
    age_tree(root)
    return root


def change_tree(root):
    (root / "docs/d1/note1.txt").write_bytes(b"changed content")
    (root / "bin/blob.dat").unlink()
    (root / "new.txt").write_bytes(b"brand new file")
    (root / "docs/copy-of-note2.txt").write_bytes((root / "docs/d2/note2.txt").read_bytes())
    age_tree(root, seconds=5)


# -- conformance -----------------------------------------------------------------

def test_backup_incremental_restore_ls_diff(provider, tmp_path):
    so, url = provider.storage_options, provider.unique_url()
    src = tree_v1(tmp_path / "src")
    want_v1 = treeinfo.describe(str(src))

    first, _, _ = backup(src, url, so)
    assert first.info.files == 35 and first.info.new == 35 and first.skipped == []

    change_tree(src)
    want_v2 = treeinfo.describe(str(src))
    second, _, summaries = backup(src, url, so)
    info = second.info
    assert (info.new, info.changed, info.deleted) == (2, 1, 1)
    assert info.parent == first.info.id
    # Only the changed and the new content is stored (the copy is a known blob).
    assert sum(s.blobs_stored for s in summaries) == 2
    assert info.bytes_stored == len(b"changed content") + len(b"brand new file")

    repo = Repository.open(url, so)
    snaps = snapshots.list_snapshots(repo)
    assert [s.id for s in snaps] == [first.info.id, info.id]
    listed = manifest.read_manifest(repo, snaps[-1], columns=["path", "type"]).to_pylist()
    assert {r["path"] for r in listed} == set(want_v2)
    assert {r["path"]: r["type"] for r in listed}["link"] == "symlink"

    d = compare(repo, first.info.id[:8], "latest")
    assert [r["path"] for r in d["added"]] == ["docs/copy-of-note2.txt", "new.txt"]
    assert [r["path"] for r in d["modified"]] == ["docs/d1/note1.txt"]
    assert [r["path"] for r in d["deleted"]] == ["bin/blob.dat"]

    for snap, want in ((first.info.id, want_v1), (info.id, want_v2)):
        out = tmp_path / f"out-{snap}"
        _, _, errors = restore(url, out, so, snapshot=snap)
        assert errors == []
        got = treeinfo.describe(str(out))
        assert got == want, treeinfo.differences(want, got)


def test_interrupted_run_leaves_no_snapshot_and_next_run_reuses_blobs(provider, tmp_path):
    so, url = provider.storage_options, provider.unique_url()
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(3000) for i in range(40)} | {"big": os.urandom(MiB + 5)})
    age_tree(src)
    plan = core_helpers.plan_backup(src, url, storage_options=so)
    stored = core_helpers.store_all(plan, so)
    core_backup.cleanup(plan)    # the run dies here: no commit
    blobs = sum(s.blobs_stored for s in stored)
    # 40 small files, and the large one as one blob (format 1, or format 2 when the keyed
    # chunker finds no cut in it) or as its chunks and their list (format 2: 2+ chunks).
    assert blobs == 41 or blobs >= 43, blobs
    repo = Repository.open(url, so)
    assert snapshots.list_snapshots(repo) == []

    committed, _, summaries = backup(src, url, so)
    assert committed.info.files == 41
    assert sum(s.blobs_stored for s in summaries) == 0          # every blob reused
    assert sum(s.packs_written + s.objects_written for s in summaries) == 0
    # ... and the interrupted run stored exactly the blobs the snapshot uses, no more, no fewer.
    overall = analysis.dedup_stats(url, storage_options=so).overall
    assert overall["referenced_blobs"] == overall["indexed_blobs"] == blobs
    assert overall["missing_blobs"] == 0 and overall["unreferenced_bytes"] == 0
    _, _, errors = restore(url, tmp_path / "out", so)
    assert errors == []
    assert treeinfo.describe(str(src)) == treeinfo.describe(str(tmp_path / "out"))


def test_prefect_flow_on_provider(provider, tmp_path, prefect_api_url):
    from keepflow.flows.backup import backup as backup_flow
    from keepflow.flows.restore import restore as restore_flow

    so, url = provider.storage_options, provider.unique_url()
    src = tree_v1(tmp_path / "src")
    state = backup_flow(str(src), url, storage_options=so or None, return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["files_new"] == 35 and summary["exit_code"] == 0
    rstate = restore_flow(url, str(tmp_path / "out"), storage_options=so or None, return_state=True)
    assert rstate.is_completed(), rstate
    assert treeinfo.describe(str(src)) == treeinfo.describe(str(tmp_path / "out"))


def test_cli_with_credentials_from_environment_only(remote, tmp_path, cli_env):
    env = dict(cli_env) | remote.env
    url = remote.unique_url()
    src = tree_v1(tmp_path / "src")
    proc = run_cli(["backup", src, url, "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files_new"] == 35
    proc = run_cli(["snapshots", url, "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 1
    proc = run_cli(["restore", url, tmp_path / "out", "--json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert treeinfo.describe(str(src)) == treeinfo.describe(str(tmp_path / "out"))


# -- write-once --------------------------------------------------------------------

def test_write_once_never_replaces_and_racers_have_one_winner(provider):
    """Sequential and racing writes of one name. Every provider but memory refuses
    a taken name in the write itself (link, rename without replace, If-None-Match),
    so of 4 racing threads exactly one wins (tests/test_conditional_create.py
    races harder, and from two processes)."""
    import io
    import threading

    from keepflow.tasks.core import storage

    repo = Repository.open(provider.unique_url(), provider.storage_options, create=True)
    path = repo.path("objects", "ab", "write-once")
    assert storage.write_once(repo.fs, path, b"first") is True
    assert storage.write_once(repo.fs, path, b"second") is False
    stream = repo.path("objects", "ab", "stream-once")
    assert storage.write_stream_once(repo.fs, stream, io.BytesIO(b"a" * 3000), chunk=1000) is True
    assert storage.write_stream_once(repo.fs, stream, io.BytesIO(b"b" * 3000), chunk=1000) is False
    assert repo.fs.cat_file(path) == b"first" and repo.fs.cat_file(stream) == b"a" * 3000
    if provider.name == "memory":
        return      # check-then-write: racers can both win (README, Providers)
    raced = repo.path("objects", "ab", "raced")
    barrier, results = threading.Barrier(4), [None] * 4

    def write(i):
        barrier.wait()
        results[i] = storage.write_once(repo.fs, raced, b"writer %d" % i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and results.count(False) == 3, results
    assert repo.fs.cat_file(raced) == b"writer %d" % results.index(True)
    assert [k for k in storage.list_files(repo.fs, repo.path("objects")) if ".tmp-" in k["name"]] == []


# -- request cost on S3 ----------------------------------------------------------

def _delta(after, before):
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) != before.get(k, 0)}


def test_s3_request_cost_for_10000_small_files(s3_server, tmp_path, capsys):
    so, url = s3_server.storage_options, s3_server.unique_url("cost")
    src = tmp_path / "src"
    sizes = [1024 + (i * 7919) % (6 * 1024) for i in range(10_000)]   # 1-7 KiB like the bench tree
    for i, size in enumerate(sizes):
        folder = src / f"t{i % 20:02d}" / f"s{(i // 20) % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:05d}.dat").write_bytes(os.urandom(size))
    age_tree(src)

    clear_fs_caches()
    server_before = s3_server.s3_request_counts()
    with S3RequestCounter() as first:
        committed, _, summaries = backup(src, url, so)
    server_first = _delta(s3_server.s3_request_counts(), server_before)
    assert committed.info.files == 10_000
    packs = sum(s.packs_written for s in summaries)

    server_before = s3_server.s3_request_counts()
    with S3RequestCounter() as again:
        nochange, _, summaries2 = backup(src, url, so)
    server_again = _delta(s3_server.s3_request_counts(), server_before)
    assert nochange.info.unchanged == 10_000 and nochange.info.bytes_stored == 0

    with capsys.disabled():
        print(f"\n[S3 request cost] first backup of 10,000 files ({packs} packs): server {server_first}, "
              f"client {first.counts}\n[S3 request cost] no-change backup: server {server_again}, "
              f"client {again.counts}")
    # On the order of a hundred PUTs for 10,000 files, not 10,000.
    assert server_first.get("PUT", 0) < 200
    assert first.counts.get("put_object", 0) < 200
    # Existence checks use the index: no HEAD per blob.
    assert first.counts.get("head_object", 0) < 50
    # A no-change backup writes only its manifest: no data PUT.
    assert again.counts.get("put_object", 0) <= 1 and server_again.get("PUT", 0) <= 1
    assert again.counts.get("head_object", 0) < 20
    assert sum(s.packs_written for s in summaries2) == 0


# -- bad input -------------------------------------------------------------------

def _one_line(exc: BaseException, *words: str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    for w in words:
        assert w.lower() in text.lower(), f"{w!r} not in {text!r}"
    return text


def test_unknown_scheme_is_a_usage_error():
    with pytest.raises(UsageError) as err:
        Repository.open("nosuchscheme://bucket/repo")
    _one_line(err.value, "nosuchscheme", "scheme")


def test_missing_bucket_names_s3_and_the_fix(s3_server):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/repo"
    for create in (False, True):
        with pytest.raises(StorageError) as err:
            Repository.open(url, s3_server.storage_options, create=create)
        _one_line(err.value, "S3", "bucket", "create")
    # It was not created behind the user's back.
    fs = s3_server.filesystem()
    assert not fs.exists(url.split("/")[2])


def test_missing_container_names_azure_and_the_fix(azure_server):
    url = f"az://no-such-container-{uuid.uuid4().hex[:8]}/repo"
    for create in (False, True):
        with pytest.raises(StorageError) as err:
            Repository.open(url, azure_server.storage_options, create=create)
        _one_line(err.value, "Azure", "container", "create")


def test_wrong_credentials_s3(s3_server):
    so = dict(s3_server.storage_options, key="wrong-key", secret="wrong-secret")
    with pytest.raises(StorageError) as err:
        Repository.open(s3_server.unique_url(), so, create=True)
    _one_line(err.value, "S3", "credentials", "AWS_ACCESS_KEY_ID")


def test_wrong_credentials_azure(azure_server):
    bad_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ=="
    good_key = azure_server.connection_string.split("AccountKey=")[1].split(";")[0]
    cs = azure_server.connection_string.replace(f"AccountKey={good_key}", f"AccountKey={bad_key}")
    with pytest.raises(StorageError) as err:
        Repository.open(azure_server.unique_url(), {"connection_string": cs}, create=True)
    _one_line(err.value, "Azure", "credentials", "AZURE_STORAGE_CONNECTION_STRING")


def test_wrong_credentials_sftp(sftp_server, tmp_path):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    so = {"client_keys": [str(tmp_path / "other")], "known_hosts": None}
    with pytest.raises(StorageError) as err:
        Repository.open(sftp_server.unique_url(), so, create=True)
    _one_line(err.value, "SFTP", "key")


def _closed_port():
    from tests.servers import free_port

    return free_port()


@pytest.mark.parametrize("kind", ["s3", "azure", "sftp"])
def test_unreachable_host(kind, tmp_path):
    import time

    port = _closed_port()
    if kind == "s3":
        url = "s3://somebucket/repo"
        so = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        words = ("S3", "127.0.0.1", "reach")
    elif kind == "azure":
        url = "az://somecontainer/repo"
        so = {"connection_string": f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                                   f"AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"}
        words = ("Azure", "reach")
    else:
        url = f"sftp://root@127.0.0.1:{port}/tmp/repo"
        so = {"client_keys": [], "known_hosts": None}
        words = ("SFTP", "127.0.0.1", "reach")
    began = time.monotonic()
    with pytest.raises(StorageError) as err:
        Repository.open(url, so, create=True)
    _one_line(err.value, *words)
    assert time.monotonic() - began < 30


def test_cli_wrong_credentials_is_one_line(s3_server, cli_env, tmp_path):
    env = dict(cli_env) | s3_server.env | {"AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    proc = run_cli(["snapshots", s3_server.unique_url()], env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keepflow: error:"), proc.stderr
    assert "S3" in lines[0] and "credentials" in lines[0]
    assert "Traceback" not in proc.stderr


def test_server_stop_is_a_clear_error_and_restart_is_survived(remote, tmp_path):
    """Stop the real process: a one-line "cannot reach" error (in seconds); after a
    restart the same options work again without clearing any cache."""
    import time

    so, url = remote.storage_options, remote.unique_url()
    src = make_tree(tmp_path / "src", {"a": "one", "b": os.urandom(5000)})
    age_tree(src)
    backup(src, url, so)
    remote.stop()
    try:
        began = time.monotonic()
        with pytest.raises(StorageError) as err:
            Repository.open(url, so)
        _one_line(err.value, "reach")
        assert time.monotonic() - began < 45
    finally:
        remote.start()
    (src / "c").write_bytes(b"after the restart")
    committed, _, _ = backup(src, url, so)
    assert committed.info.new == 1
    _, _, errors = restore(url, tmp_path / "out", so)
    assert errors == []
    assert treeinfo.describe(str(src)) == treeinfo.describe(str(tmp_path / "out"))
