"""Keeping a replica repository in step with the primary.

A replica is a full repository (same layout, same ``keepflow.json`` with the
same repository id) on another provider, restorable on its own. Replication
copies what the replica lacks, in commit order:

1. data: ``packs/`` and ``objects/`` keys missing on the replica (or present
   with the wrong size: a damaged copy is replaced);
2. ``index/`` files;
3. ``snapshots/`` manifests.

So at every moment the replica is a consistent repository: a manifest only
appears after every blob it references and the index entries that locate
them. An interrupted replication leaves a consistent replica that simply
lacks the newest snapshots; running it again copies only what is still
missing (nothing is copied twice).

What is missing is decided by listing both sides (one recursive listing per
folder, not a HEAD per object) and comparing key names and sizes. Every copy
is verified: size for data objects (read back from the replica's listing),
BLAKE3 of the bytes for index files and manifests (read back after writing).

Index files that the primary merged away (a run's batch files are merged into
one file at commit) may still exist on a replica that copied them earlier;
they are harmless duplicates (readers drop duplicate hashes).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import blake3

from . import storage
from .errors import KeepflowError, RepositoryNotFoundError
from .repository import RepoConfig, Repository

DATA_FOLDERS = ("packs", "objects")
CHUNK = 8 * 1024 * 1024
STREAM_ABOVE = 64 * 1024 * 1024   # objects bigger than this are streamed, not held in memory
COPY_THREADS = 8                  # copies are I/O-bound: overlap the round trips


class ReplicaMismatchError(KeepflowError):
    template = ("{replica} holds a different keepflow repository (id {found}, expected {expected}); "
                "use an empty location for a new replica")


class ReplicaVerifyError(KeepflowError):
    template = "copy of {key} to {replica} did not verify ({reason}); run replicate again"


@dataclass
class ReplicaStatus:
    replica: str
    exists: bool
    snapshots_present: list[str] = field(default_factory=list)
    snapshots_missing: list[str] = field(default_factory=list)
    data_missing: int = 0
    data_bytes_missing: int = 0
    index_missing: int = 0
    damaged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReplicaResult:
    replica: str
    created: bool = False
    data_copied: int = 0
    bytes_copied: int = 0
    index_copied: int = 0
    snapshots_copied: int = 0
    replaced_damaged: int = 0
    snapshots: int = 0
    temporaries_removed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _listing(repo, folder: str) -> dict[str, int]:
    """key (relative to the repository root) -> size, for one top folder."""
    return storage.list_keys(repo.fs, repo.root, folder)


def _snapshot_ids(keys) -> list[str]:
    return sorted(k.rsplit("/", 1)[-1][: -len(".parquet")] for k in keys if k.endswith(".parquet"))


def open_replica(primary: Repository, url: str, storage_options=None, create: bool = True):
    """Open the replica at ``url``; create it with the primary's config if empty."""
    try:
        replica = Repository.open(url, storage_options, create=False)
    except RepositoryNotFoundError:
        if not create:
            return None, False
        config = RepoConfig(**{**asdict(primary.config)})
        return Repository.init(url, storage_options, config=config), True
    if replica.config.id != primary.config.id:
        raise ReplicaMismatchError(replica=url, found=replica.config.id[:8], expected=primary.config.id[:8])
    return replica, False


def status(primary: Repository, url: str, storage_options=None) -> ReplicaStatus:
    """What the replica has and lacks; changes nothing."""
    replica, _ = open_replica(primary, url, storage_options, create=False)
    p_snaps = _listing(primary, "snapshots")
    if replica is None:
        data = {**_listing(primary, "packs"), **_listing(primary, "objects")}
        return ReplicaStatus(url, False, [], _snapshot_ids(p_snaps), len(data), sum(data.values()),
                             len(_listing(primary, "index")))
    plan = _plan(primary, replica)
    r_snaps = _listing(replica, "snapshots")
    return ReplicaStatus(
        url, True,
        snapshots_present=_snapshot_ids(set(p_snaps) & set(r_snaps)),
        snapshots_missing=_snapshot_ids(set(p_snaps) - set(r_snaps)),
        data_missing=len(plan["data"]), data_bytes_missing=sum(plan["data"].values()),
        index_missing=len(plan["index"]), damaged=sorted(plan["damaged"]),
    )


def _plan(primary: Repository, replica: Repository) -> dict:
    with ThreadPoolExecutor(max_workers=8) as pool:
        folders = list(DATA_FOLDERS) + ["index", "snapshots"]
        p_lists = dict(zip(folders, pool.map(lambda f: _listing(primary, f), folders)))
        r_lists = dict(zip(folders, pool.map(lambda f: _listing(replica, f), folders)))
    data, damaged = {}, []
    for folder in DATA_FOLDERS:
        for key, size in p_lists[folder].items():
            have = r_lists[folder].get(key)
            if have is None:
                data[key] = size
            elif have != size:
                data[key] = size
                damaged.append(key)
    index = {k: s for k, s in p_lists["index"].items() if k not in r_lists["index"]}
    snaps = {k: s for k, s in p_lists["snapshots"].items() if k not in r_lists["snapshots"]}
    return {"data": data, "damaged": damaged, "index": index, "snapshots": snaps,
            "snapshot_count": len(p_lists["snapshots"])}


def replicate(primary_url: str, replica_url: str, storage_options=None, replica_options=None,
              dry_run: bool = False) -> ReplicaResult | ReplicaStatus:
    """Bring one replica up to date with the primary (see the module docstring)."""
    primary = Repository.open(primary_url, storage_options)
    if dry_run:
        return status(primary, replica_url, replica_options)
    replica, created = open_replica(primary, replica_url, replica_options, create=True)
    plan = _plan(primary, replica)
    result = ReplicaResult(replica_url, created=created, snapshots=plan["snapshot_count"])

    for key in plan["damaged"]:
        # A data object whose size is wrong can only be a damaged copy: replace it.
        replica.fs.rm_file(replica.path(key))
        result.replaced_damaged += 1

    def copy_data(item):
        key, size = item
        _copy(primary, replica, key, size, verify_hash=False)
        return size

    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        for size in pool.map(copy_data, sorted(plan["data"].items())):
            result.data_copied += 1
            result.bytes_copied += size
        # Index only after every data object is there, manifests only after the index.
        for key, size in sorted(plan["index"].items()):
            _copy(primary, replica, key, size, verify_hash=True)
            result.index_copied += 1
        for key, size in sorted(plan["snapshots"].items()):
            _copy(primary, replica, key, size, verify_hash=True)
            result.snapshots_copied += 1
    # Copies interrupted in an earlier run (a server stopped mid-copy) leave
    # temporary names behind on filesystems such as SFTP: remove the old ones.
    from .gc import remove_stale_temporaries

    result.temporaries_removed = remove_stale_temporaries(replica, 1.0)
    return result


def _copy(primary: Repository, replica: Repository, key: str, size: int, verify_hash: bool) -> None:
    src, dst = primary.path(key), replica.path(key)
    if size > STREAM_ABOVE:
        with primary.fs.open(src, "rb") as fin:
            storage.write_stream_once(replica.fs, dst, fin, CHUNK)
    else:
        data = primary.fs.cat_file(src)
        if len(data) != size:
            raise ReplicaVerifyError(key=key, replica=replica.url, reason=f"read {len(data)} bytes, listed {size}")
        storage.write_once(replica.fs, dst, data)
        if verify_hash:
            back = replica.fs.cat_file(dst)
            if blake3.blake3(back).digest() != blake3.blake3(data).digest():
                raise ReplicaVerifyError(key=key, replica=replica.url, reason="content differs after writing")
            return
    got = replica.fs.info(dst).get("size")
    if got is not None and int(got) != size:
        raise ReplicaVerifyError(key=key, replica=replica.url, reason=f"size {got}, expected {size}")
