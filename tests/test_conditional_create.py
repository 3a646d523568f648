"""Create-only writes on object stores, against the real servers (SeaweedFS S3, Azurite).

``storage.write_once`` on S3 and Azure sends ``If-None-Match: *``: of several
writers racing for one name, from threads or from separate processes, exactly
one is told True, and the stored bytes are that writer's. Where a server
ignores the header, ``create_only`` finds out (one probe per filesystem
instance and bucket) and the old check-then-write is used instead.

Measured on these servers (tests/servers.py): SeaweedFS 4.48 answers 412
PreconditionFailed (without naming the condition, so s3fs raises a plain
OSError), Azurite 3.35 409 BlobAlreadyExists, for single PUTs and for
multipart uploads / block lists alike; both are exclusive for concurrent
single PUTs. SeaweedFS 4.48 is not exclusive for concurrent *multipart*
completions (two of three racing uploads were both told they succeeded in
2 of 10 rounds), so the multipart race is asserted on Azurite only.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from keepflow.tasks.core import storage

from tests.servers import S3RequestCounter

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@pytest.fixture(params=["s3", "azure"])
def objstore(request):
    return request.getfixturevalue({"s3": "s3_server", "azure": "azure_server"}[request.param])


def _fresh_fs(server):
    """A filesystem instance of its own (no capability answer cached on it yet)."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs(server.url("x"), skip_instance_cache=True, **server.storage_options)
    return fs


def _path(server, fs, prefix="cc"):
    return fs._strip_protocol(server.unique_url(prefix))


def _race(fn, n):
    """Run ``fn(i)`` in ``n`` threads released at the same moment; returns their results."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:   # reported, not swallowed: the assertion shows it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_servers_honour_create_only(objstore):
    fs = _fresh_fs(objstore)
    path = _path(objstore, fs)
    assert storage.create_only(fs, path) is True
    assert storage.write_once(fs, path, b"first") is True
    assert storage.write_once(fs, path, b"second") is False
    assert fs.cat_file(path) == b"first"
    # The probe (S3) left nothing behind.
    assert [p for p in fs.ls(path.rsplit("/", 1)[0], detail=False) if ".tmp-" in p] == []


def test_threads_racing_for_one_name_have_one_winner(objstore):
    fs = objstore.filesystem()
    for _ in range(3):
        path = _path(objstore, fs, "race")
        results = _race(lambda i, path=path: storage.write_once(fs, path, f"writer {i}".encode() * (i + 1)), 6)
        assert all(isinstance(r, bool) for r in results), results
        winners = [i for i, r in enumerate(results) if r]
        assert len(winners) == 1, results
        assert fs.cat_file(path) == f"writer {winners[0]}".encode() * (winners[0] + 1)


_WRITER = r"""
import json, sys, time
import fsspec
from keepflow.tasks.core import storage
opts, paths, start, me = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
fs, _ = fsspec.core.url_to_fs(sys.argv[5], **opts)
storage.create_only(fs, paths[0])      # probe before the start line, so both race on the real writes
time.sleep(max(0.0, start - time.time()))
won = [p for p in paths if storage.write_once(fs, p, f"{me}:{p}".encode())]
print(json.dumps(won))
"""


def test_two_processes_racing_have_one_winner_per_name(objstore, tmp_path):
    fs = objstore.filesystem()
    paths = [_path(objstore, fs, "proc") for _ in range(12)]
    start = time.time() + 4.0      # both interpreters have imported s3fs/adlfs by then
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, json.dumps(objstore.storage_options),
                               json.dumps(paths), str(start), name, objstore.url("x")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for name in ("A", "B")]
    won = {}
    for name, proc in zip(("A", "B"), procs, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        won[name] = set(json.loads(out))
    assert won["A"] | won["B"] == set(paths)
    assert won["A"] & won["B"] == set()
    for name in ("A", "B"):
        for p in won[name]:
            assert fs.cat_file(p) == f"{name}:{p}".encode()


class _HeldStream(io.BytesIO):
    """A stream that, after its first chunk, waits until ``release`` is set."""

    def __init__(self, data, started: threading.Event, release: threading.Event):
        super().__init__(data)
        self.started, self.release = started, release

    def read(self, n=-1):
        if self.tell() > 0 and not self.release.is_set():
            self.started.set()
            assert self.release.wait(30)
        return super().read(n)


def test_stream_refused_at_completion_leaves_no_upload_behind(objstore):
    """A big upload passes the existence check, then another writer takes the
    name before it completes: the server must refuse the completion."""
    fs = objstore.filesystem()
    path = _path(objstore, fs, "stream")
    started, release = threading.Event(), threading.Event()
    result = {}
    upload = threading.Thread(target=lambda: result.setdefault("created", storage.write_stream_once(
        fs, path, _HeldStream(os.urandom(12 * MiB), started, release), chunk=5 * MiB)))
    upload.start()
    try:
        assert started.wait(30)
        assert storage.write_once(fs, path, b"the other writer") is True
    finally:
        release.set()
        upload.join(60)
    assert result == {"created": False}
    assert fs.cat_file(path) == b"the other writer"
    if objstore.scheme == "s3":
        bucket, key = path.split("/", 1)
        uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
        assert uploads == []      # the refused multipart upload was aborted


def test_racing_multipart_uploads_have_one_winner_on_azure(azure_server):
    fs = azure_server.filesystem()
    for _ in range(2):
        path = _path(azure_server, fs, "mpu")
        blobs = [bytes([65 + i]) * (9 * MiB) for i in range(3)]
        results = _race(lambda i, path=path, blobs=blobs: storage.write_stream_once(fs, path, _NoShortcut(blobs[i]),
                                                                          chunk=4 * MiB), 3)
        winners = [i for i, r in enumerate(results) if r is True]
        assert len(winners) == 1, results
        assert fs.read_block(path, 0, 1) == bytes([65 + winners[0]])


class _NoShortcut(io.BytesIO):
    """A stream whose first read waits a little, so all racers pass the existence check first."""

    def read(self, n=-1):
        if self.tell() == 0:
            time.sleep(0.2)
        return super().read(n)


def test_probe_runs_once_per_instance_and_bucket(s3_server):
    fs = _fresh_fs(s3_server)
    with S3RequestCounter() as counted:
        assert storage.write_once(fs, _path(s3_server, fs), b"one") is True
    # Probe: create a throwaway name twice, remove it; then the write itself, with no HEAD first.
    assert counted.counts.get("put_object") == 3 and counted.counts.get("delete_object") == 1, counted.counts
    assert "head_object" not in counted.counts
    with S3RequestCounter() as counted:
        assert storage.write_once(fs, _path(s3_server, fs), b"two") is True
    assert counted.counts == {"put_object": 1}


def test_server_that_ignores_the_header_gets_check_then_write(s3_server):
    """Fault injection (a fake, said so): both servers here honour If-None-Match, so a
    server that ignores it cannot be had for real. The header is dropped from every
    request before it is sent; SeaweedFS then really replaces, as such a server would."""
    import s3fs

    original = s3fs.S3FileSystem._call_s3

    async def without_header(self, method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        return await original(self, method, *args, **kwargs)

    fs = _fresh_fs(s3_server)
    path = _path(s3_server, fs)
    s3fs.S3FileSystem._call_s3 = without_header
    try:
        # What the probe guards against: a "create-only" PUT that silently replaces.
        fs.pipe_file(path, b"first", mode="create")
        fs.pipe_file(path, b"replaced", mode="create")
        assert fs.cat_file(path) == b"replaced"

        assert storage.create_only(fs, path) is False
        other = _path(s3_server, fs)
        assert storage.write_once(fs, other, b"first") is True
        assert storage.write_once(fs, other, b"second") is False     # the existence check
        assert fs.cat_file(other) == b"first"
        stream = _path(s3_server, fs)
        assert storage.write_stream_once(fs, stream, io.BytesIO(os.urandom(11 * MiB)), chunk=5 * MiB) is True
        assert storage.write_stream_once(fs, stream, io.BytesIO(b"x" * (11 * MiB)), chunk=5 * MiB) is False
    finally:
        s3fs.S3FileSystem._call_s3 = original
    folder = path.rsplit("/", 1)[0]
    assert [p for p in fs.ls(folder, detail=False, refresh=True) if ".tmp-" in p] == []


def test_aws_endpoint_is_trusted_without_a_probe():
    """AWS S3 documents conditional writes (August 2024): no request is made to decide."""
    import s3fs

    fs = s3fs.S3FileSystem(key="k", secret="s", skip_instance_cache=True,
                           client_kwargs={"region_name": "eu-west-1"},
                           config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})
    with S3RequestCounter() as counted:
        assert storage.create_only(fs, "some-bucket/repo/keepflow.json") is True
    assert counted.counts == {}


def test_providers_without_conditional_create_fall_back(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/kf-{uuid.uuid4().hex[:8]}/obj"
    assert storage.create_only(fs, path) is False
    assert storage.write_once(fs, path, b"first") is True
    assert storage.write_once(fs, path, b"second") is False
    assert fs.cat_file(path) == b"first"


# -- leases --------------------------------------------------------------------

@pytest.fixture(params=["local", "sftp", "s3", "azure"])
def lease_repo(request, tmp_path):
    from keepflow.tasks.core.repository import Repository

    if request.param == "local":
        return Repository.open(str(tmp_path / "repo"), create=True)
    server = request.getfixturevalue({"sftp": "sftp_server", "s3": "s3_server", "azure": "azure_server"}[request.param])
    return Repository.open(server.unique_url("leases"), server.storage_options, create=True)


def test_lease_is_created_create_only(lease_repo):
    from keepflow.tasks.core import lease

    held = lease.Holder(lease_repo, "backup", "/src").acquire()
    try:
        before = lease_repo.fs.cat_file(held.path)
        other = lease.Holder(lease_repo, "backup", "/other")
        other.path = held.path            # the same name (a uuid4 collision, made on purpose)
        with pytest.raises(FileExistsError):
            other.acquire()
        assert lease_repo.fs.cat_file(held.path) == before
    finally:
        held.release()


def test_racing_backups_of_one_source_never_both_hold_it(lease_repo):
    from keepflow.tasks.core import lease

    for _ in range(3):
        results = _race(lambda i: lease.Holder(lease_repo, "backup", "/same-source").acquire(), 4)
        held = [r for r in results if isinstance(r, lease.Holder)]
        assert all(isinstance(r, (lease.Holder, lease.LeaseConflictError)) for r in results), results
        assert len(held) <= 1, results
        for h in held:
            h.release()
        assert lease.list_leases(lease_repo) == []


def test_a_refreshing_lease_is_never_invisible(lease_repo):
    """Refreshes rewrite the lease; a run acquiring meanwhile must always see it.
    With a plain rewrite on local disk 15% of such reads found an empty file."""
    from keepflow.tasks.core import lease

    held = lease.Holder(lease_repo, "backup", "/src", ttl=0.006).acquire()     # a refresh every 2 ms
    try:
        reads = missed = 0
        began = time.monotonic()
        while time.monotonic() - began < 1.5:
            reads += 1
            missed += not any(found.id == held.lease.id for found in lease.list_leases(lease_repo))
    finally:
        held.release()
    assert reads > 20 and missed == 0, (reads, missed)
    assert storage.list_files(lease_repo.fs, lease_repo.path("locks")) == []      # no temporaries either


# -- large blobs uploaded whole (store.py) ---------------------------------------

@pytest.mark.parametrize("changed", [False, True])
def test_large_blob_upload_meets_another_writer(objstore, changed):
    """Another writer stores the same blob while our upload is in flight. Ours is
    refused at completion (or abandoned, when our source changed meanwhile), and
    the other writer's object is never removed."""
    import blake3

    from keepflow.tasks.core import store
    from keepflow.tasks.core.repository import Repository

    repo = Repository.open(objstore.unique_url("large"), objstore.storage_options, create=True)
    content = os.urandom(12 * MiB)
    blob_hash = blake3.blake3(content).hexdigest()
    final = repo.path(repo.object_key(blob_hash))
    ours = content if not changed else content[:-1] + bytes([content[-1] ^ 1])
    started, release = threading.Event(), threading.Event()
    outcome = {}

    def upload():
        try:
            store._upload_verified(repo, _HeldStream(ours, started, release), blob_hash, len(ours))
            outcome["result"] = "stored or refused"
        except store.ChangedWhileReading:
            outcome["result"] = "changed"

    thread = threading.Thread(target=upload)
    thread.start()
    try:
        assert started.wait(30)
        assert storage.write_once(repo.fs, final, content) is True      # the other writer
    finally:
        release.set()
        thread.join(60)
    assert outcome == {"result": "changed" if changed else "stored or refused"}
    assert repo.fs.cat_file(final) == content


@pytest.mark.parametrize("kind", ["sftp", "s3", "azure"])
def test_racing_uploads_of_one_large_blob_all_succeed(kind, request):
    """Two batches that hash the same large content at the same moment both upload
    it; the one refused (rename without replace, If-None-Match) must not fail."""
    import blake3

    from keepflow.tasks.core import store
    from keepflow.tasks.core.repository import Repository

    server = request.getfixturevalue({"sftp": "sftp_server", "s3": "s3_server", "azure": "azure_server"}[kind])
    repo = Repository.open(server.unique_url("large"), server.storage_options, create=True)
    content = os.urandom(6 * MiB)
    blob_hash = blake3.blake3(content).hexdigest()
    results = _race(lambda i: store._upload_verified(repo, _NoShortcut(content), blob_hash, len(content)), 3)
    assert results == [None, None, None], results
    assert repo.fs.cat_file(repo.path(repo.object_key(blob_hash))) == content
    assert [k for k in storage.list_files(repo.fs, repo.path("objects")) if ".tmp-" in k["name"]] == []
