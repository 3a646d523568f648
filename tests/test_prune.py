"""Retention policy, two-phase garbage collection, leases, prune with concurrent backups."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from keepflow.tasks.core import gc, lease, manifest, retention, snapshots, treeinfo, verify
from keepflow.tasks.core import index as indexmod
from keepflow.tasks.core.errors import UsageError
from keepflow.tasks.core.manifest import SnapshotInfo
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests import core_helpers
from tests.conftest import KEEPFLOW, age_tree, make_tree


def _snap(i: int, when: str, source="/src", host="h", tags=()):
    return SnapshotInfo(id=f"{i:016x}", time=dt.datetime.fromisoformat(when).astimezone().isoformat(),
                        source=source, host=host, tags=list(tags))


def test_policy_last_daily_weekly_and_tags():
    snaps = [_snap(1, "2026-11-01 10:00"), _snap(2, "2026-11-01 18:00"), _snap(3, "2026-11-02 09:00"),
             _snap(4, "2026-11-09 09:00", tags=["release"]), _snap(5, "2026-11-20 08:00"),
             _snap(6, "2026-11-20 20:00"), _snap(7, "2026-11-20 21:00", source="/other")]
    d = retention.choose(snaps, retention.Policy(keep_daily=2))
    kept = {s.id[-1] for s in d.keep}
    # per source+host: /src keeps the newest of its 2 newest days (20th -> #6, 9th -> #4); /other keeps #7
    assert kept == {"6", "4", "7"}
    d = retention.choose(snaps, retention.Policy(keep_last=1, keep_tags=["release"]))
    assert {s.id[-1] for s in d.keep} == {"6", "4", "7"}
    d = retention.choose(snaps, retention.Policy(keep_weekly=3))
    assert {s.id[-1] for s in d.keep} == {"6", "4", "3", "7"}   # ISO weeks 47, 46, 45 (2nd is week 44: #2 dropped)
    d = retention.choose(snaps, retention.Policy(keep_monthly=-1))
    assert {s.id[-1] for s in d.keep} == {"6", "7"}
    assert "daily" in retention.choose(snaps, retention.Policy(keep_daily=1)).reasons[snaps[5].id]


def test_empty_policy_is_refused():
    with pytest.raises(UsageError, match="keep"):
        retention.choose([_snap(1, "2026-11-01 10:00")], retention.Policy())


def _history(tmp_path, fmt: int = 2):
    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(4000) for i in range(40)} | {"big": os.urandom(2 << 20)})
    age_tree(src)
    repo = str(tmp_path / "repo")
    if fmt == 1:
        Repository.init(repo, config=RepoConfig())
    core_helpers.backup(src, repo)
    for i in range(30):                                   # later snapshots lose most small files
        (src / f"f{i}").unlink()
    (src / "big").unlink()
    (src / "new").write_bytes(os.urandom(5000))
    core_helpers.backup(src, repo)
    return src, repo


@pytest.fixture
def repo_with_history(tmp_path):
    """Two snapshots in a (default: format 2) repository; the second lost 30 small files and "big"."""
    return _history(tmp_path)


@pytest.fixture(params=[1, 2], ids=["format1", "format2"])
def history_any_format(request, tmp_path):
    """The same history in a format 1 and in a format 2 repository (the core gc tests run on both)."""
    return _history(tmp_path, request.param)


def _marked_keys_holding(repo, content_id: str) -> set[str]:
    """The keys in trash marks that hold a blob of the content ``content_id`` (format 2: its list and chunks)."""
    idx = indexmod.load_index(repo, unique=False)
    blobs = set(gc.live_ids(repo, idx, content=pa.array([content_id], pa.string())).to_pylist())
    marked = set().union(*(set(m["keys"]) for m in gc._list_marks(repo)))
    return {k for h, k in zip(idx["hash"].to_pylist(), idx["key"].to_pylist(), strict=True)
            if h in blobs and k in marked}


def test_gc_two_phases_respects_grace_and_frees_data(tmp_path, history_any_format):
    src, repo_url = history_any_format
    repo = Repository.open(repo_url)
    snaps = snapshots.list_snapshots(repo)
    before = treeinfo.describe(str(src))
    gc.forget(repo, [snaps[0]])
    marked = gc.mark(repo)
    assert marked.keys >= 1 and marked.repacked_packs == 1    # the first pack is 3/4 garbage: repacked
    waiting = gc.sweep(repo, grace_hours=24)
    assert waiting.keys_deleted == 0 and waiting.marks_waiting == 1   # still in its grace period
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.keys_deleted == marked.keys and swept.bytes_freed > 2 << 20
    assert swept.index_files_after == 1                           # compacted
    assert verify.verify(repo_url, read_data=100).problems == []
    _, _, errors = core_helpers.restore(repo_url, tmp_path / "out")
    assert errors == [] and treeinfo.describe(str(tmp_path / "out")) == before


def test_blob_used_by_a_backup_after_marking_is_rescued(tmp_path, history_any_format):
    src, repo_url = history_any_format
    repo = Repository.open(repo_url)
    first = snapshots.list_snapshots(repo)[0]
    # Bring the big file back from the first snapshot before it is forgotten.
    core_helpers.restore(repo_url, tmp_path / "old", snapshot=first.id, includes=["big"])
    big = manifest.read_manifest(repo, first, columns=["path", "hash"]).to_pylist()
    big_id = next(r["hash"] for r in big if r["path"] == "big")
    gc.forget(repo, [first])
    marked = gc.mark(repo)                          # the big object (format 2: its list and chunks) is now garbage
    holding = _marked_keys_holding(repo, big_id)
    # Format 1: the object; format 2: the list pack and the repacked data pack that hold its list and chunks.
    assert len(holding) >= 1
    # Meanwhile a backup finds the same content again: it deduplicates against the marked object.
    (src / "big").write_bytes((tmp_path / "old" / "big").read_bytes())
    committed, _, _ = core_helpers.backup(src, repo_url)
    assert committed.info.bytes_stored == 0
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.keys_rescued == len(holding) and swept.keys_deleted == marked.keys - len(holding)
    assert all(os.path.exists(os.path.join(repo_url, k)) for k in holding)
    assert verify.verify(repo_url, read_data=100).problems == []
    _, _, errors = core_helpers.restore(repo_url, tmp_path / "out")
    assert errors == [] and (tmp_path / "out" / "big").read_bytes() == (src / "big").read_bytes()


def test_orphan_data_from_a_crashed_run_is_collected_after_grace(tmp_path):
    from keepflow.tasks.core import backup as core_backup

    src = make_tree(tmp_path / "src", {f"f{i}": os.urandom(3000) for i in range(10)})
    repo_url = str(tmp_path / "repo")
    core_helpers.backup(make_tree(tmp_path / "other", {"x": "1"}), repo_url)
    plan = core_helpers.plan_backup(src, repo_url)
    core_helpers.store_all(plan)
    core_backup.cleanup(plan)                     # crashed before commit: its pack is referenced by nothing
    repo = Repository.open(repo_url)
    assert gc.mark(repo).keys == 1
    assert gc.sweep(repo, grace_hours=0).keys_deleted == 1


def test_lease_rules_and_stale_leases(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    a = lease.Holder(repo, "backup", "/src-a").acquire()
    b = lease.Holder(repo, "backup", "/src-b").acquire()          # other sources share the repository
    with pytest.raises(lease.LeaseConflictError, match="another backup of /src-a"):
        lease.Holder(repo, "backup", "/src-a").acquire()
    with pytest.raises(lease.LeaseConflictError):
        lease.Holder(repo, "prune").acquire()
    removed, kept = lease.unlock(repo)
    assert removed == [] and len(kept) == 2                        # live leases are never broken
    a.release()
    b.release()
    # A lease left by a killed process: its pid is gone.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = lease.Holder(repo, "backup", "/src-a")
    dead.lease.pid = proc.pid
    dead._write()
    proc.kill()
    proc.wait()
    assert lease.Holder(repo, "backup", "/src-a").acquire().release() is None   # not blocked
    removed, kept = lease.unlock(repo)
    assert len(removed) == 1 and kept == []


def test_expired_lease_does_not_block(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"))
    old = lease.Holder(repo, "prune", ttl=1)
    old.lease.expires = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat()
    old._write()
    lease.Holder(repo, "backup", "/x").acquire().release()


def test_prune_cli_dry_run_then_real(tmp_path, repo_with_history, cli):
    src, repo = repo_with_history
    dry = cli("prune", repo, "--keep-last", "1", "--grace", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    import json

    out = json.loads(dry.stdout)
    assert len(out["forgotten"]) == 1 and out["swept"]["keys_deleted"] == 0
    assert out["marked"]["bytes"] > 2 << 20                       # what would become garbage
    assert len(snapshots.list_snapshots(Repository.open(repo))) == 2   # nothing forgotten
    real = cli("prune", repo, "--keep-last", "1", "--grace", "0", "--json")
    assert real.returncode == 0, real.stderr
    out = json.loads(real.stdout)
    assert out["swept"]["bytes_freed"] > 2 << 20
    assert len(snapshots.list_snapshots(Repository.open(repo))) == 1
    assert cli("verify", repo, "--read-data", "100%").returncode == 0


def test_prune_without_policy_is_a_usage_error(tmp_path, cli):
    proc = cli("prune", str(tmp_path / "repo"))
    assert proc.returncode == 2 and proc.stderr.startswith("keepflow: error:") and "Traceback" not in proc.stderr


def test_concurrent_backups_and_prune_lose_nothing(tmp_path, cli_env):
    """Real processes: two backups of different sources and a prune, all at once."""
    repo = str(tmp_path / "repo")
    srcs = []
    for name in ("a", "b"):
        src = make_tree(tmp_path / name, {f"d{i % 5}/{name}{i}": os.urandom(2000 + i) for i in range(400)})
        age_tree(src)
        srcs.append(src)
    subprocess.run([KEEPFLOW, "backup", str(srcs[0]), repo], env=cli_env, check=True, capture_output=True)
    for i in range(100):
        (srcs[0] / f"d{i % 5}" / f"a{i}").unlink()                   # make garbage to collect
    subprocess.run([KEEPFLOW, "backup", str(srcs[0]), repo], env=cli_env, check=True, capture_output=True)
    procs = [subprocess.Popen([KEEPFLOW, "backup", str(s), repo, "--json"], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in srcs]
    procs.append(subprocess.Popen([KEEPFLOW, "prune", repo, "--keep-last", "1", "--grace", "0", "--json"],
                                  env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    # Once more, so a deletion postponed by a running backup happens now.
    subprocess.run([KEEPFLOW, "prune", repo, "--keep-last", "1", "--grace", "0"], env=cli_env, check=True,
                   capture_output=True)
    assert verify.verify(repo, read_data=100).problems == []
    snaps = snapshots.list_snapshots(Repository.open(repo))
    assert {s.source for s in snaps} == {str(srcs[0]), str(srcs[1])}
    for s, src in ((next(x for x in snaps if x.source == str(p)), p) for p in srcs):
        out = tmp_path / f"out-{src.name}"
        _, _, errors = core_helpers.restore(repo, out, snapshot=s.id)
        assert errors == [] and treeinfo.describe(str(out)) == treeinfo.describe(str(src))


def test_prune_applies_the_policy_to_replicas(tmp_path, repo_with_history, prefect_api_url):
    from keepflow.flows.prune import prune
    from keepflow.tasks.core import replicate as core_replicate

    src, repo = repo_with_history
    replica = str(tmp_path / "replica")
    core_replicate.replicate(repo, replica)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    state = prune(repo, keep_last=1, grace_hours=0, replicas=[replica, str(blocker / "gone")], return_state=True)
    assert state.is_failed() and str(blocker / "gone") in state.message       # the broken one is named
    summary = state.result(raise_on_failure=False)
    ok = next(r for r in summary["replicas"] if r["ok"])
    assert ok["forgotten"] == 1 and ok["bytes_freed"] > 2 << 20
    for url in (repo, replica):
        snaps = snapshots.list_snapshots(Repository.open(url))
        assert len(snaps) == 1
        assert verify.verify(url, read_data=100).problems == []
    assert [s.id for s in snapshots.list_snapshots(Repository.open(repo))] == \
        [s.id for s in snapshots.list_snapshots(Repository.open(replica))]


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path, repo_with_history):
    """Temporary files from interrupted writes go away once they are old; young ones may be in use."""
    _, repo_url = repo_with_history
    repo = Repository.open(repo_url)
    root = tmp_path / "repo"
    (root / "tmp").mkdir(exist_ok=True)
    old_files = [root / "packs" / "ab" / "abcd.tmp-1234", root / "tmp" / "deadbeef"]
    young = root / "packs" / "cd" / "cdef.tmp-5678"
    for f in old_files + [young]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for f in old_files:
        os.utime(f, (two_hours_ago, two_hours_ago))
    swept = gc.sweep(repo, grace_hours=0)
    assert swept.temporaries_removed == 2
    assert not any(f.exists() for f in old_files) and young.exists()
    assert verify.verify(repo_url).problems == []
