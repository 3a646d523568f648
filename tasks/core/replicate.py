"""Keeping a replica repository in step with the primary.

A replica is a full repository (same layout, same ``keepflow.json`` with the
same repository id) on another provider, restorable on its own. Replication
copies what the replica lacks, in commit order:

0. format 2: ``keys/``, mirrored exactly: key files the replica lacks are
   copied, and key files the primary no longer has are removed from the
   replica (a revoked password stops opening replicas too). This is the only
   deletion replicate makes;
1. data: ``packs/`` (format 1: and ``objects/``) keys missing on the replica
   (or present with the wrong size: a damaged copy is replaced);
2. ``index/`` files;
3. ``snapshots/`` manifests.

So at every moment the replica is a consistent repository: a manifest only
appears after every blob it references and the index entries that locate
them. An interrupted replication leaves a consistent replica that simply
lacks the newest snapshots; running it again copies only what is still
missing (nothing is copied twice). Leases (``locks/``) and garbage marks
(``trash/``) are never copied: they describe work on the primary.

What is missing is decided by listing both sides (one recursive listing per
folder, not a HEAD per object) and comparing key names and sizes.

Replicas are byte copies, so replication needs no password, whatever the
format: both sides are opened without unlocking (``Repository.open(...,
unlock=False)``) and nothing here touches a key. A new replica gets the
primary's ``keepflow.json`` byte for byte (never re-encoded: format 2's
config inside it is sealed with the master key). A location holding another
repository (another id), or a repository of another format or encryption,
is refused: a byte copy cannot turn one into the other.

Every copy is verified. Format 2 names every file after the BLAKE3 of its
bytes (key files and packs: the whole name; index files and manifests: the
last ``-``-separated field), so each copy is checked against its name twice:
the bytes read from the primary (a file damaged on the primary is not
copied; the run copies everything else, then fails naming it) and what the
replica returns after writing (a copy that does not match is removed, so
the next run copies it again). Format 1: size for data objects (read back
from the replica's listing), BLAKE3 of the bytes for index files and
manifests (read back after writing).

Index files that the primary merged away (a run's batch files are merged into
one file at commit) may still exist on a replica that copied them earlier;
they are harmless duplicates (readers drop duplicate hashes).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from . import storage
from .errors import KeepflowError, RepositoryNotFoundError
from .repository import CONFIG_NAME, Repository

DATA_FOLDERS = ("packs", "objects")
KEYS_FOLDER = "keys"
CHUNK = 8 * 1024 * 1024
STREAM_ABOVE = 64 * 1024 * 1024   # objects bigger than this are streamed, not held in memory
COPY_THREADS = 8                  # copies are I/O-bound: overlap the round trips
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ReplicaMismatchError(KeepflowError):
    template = ("{replica} holds a different keepflow repository (id {found}, expected {expected}); "
                "use an empty location for a new replica")


class ReplicaFormatError(KeepflowError):
    template = ("{replica} holds a {found} repository, the primary is {expected}: a replica is a byte copy "
                "of its primary and cannot change format; use an empty location for a new replica")


class ReplicaVerifyError(KeepflowError):
    template = "copy of {key} to {replica} did not verify ({reason}); run replicate again"


class PrimaryDamagedError(KeepflowError):
    template = ("{count} files on the primary do not match the hash in their names and were not copied to "
                "{replica} (first: {first}); everything else is in step; check the primary with "
                "`keepflow verify --ciphertext-only` and repair it (or restore those files from a replica)")


class PrimaryWithoutKeysError(KeepflowError):
    template = ("the primary is encrypted but lists no key file under keys/; replicate does not mirror that "
                "to {replica} (its key files may be the only way in): restore the primary's keys/ first")


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
    keys_missing: int = 0             # format 2: key files to copy
    keys_to_remove: int = 0           # format 2: key files the primary no longer has

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
    keys_copied: int = 0
    keys_removed: int = 0
    not_copied: list[dict] = field(default_factory=list)    # {key, detail}: damaged on the primary, or foreign

    def to_dict(self) -> dict:
        return asdict(self)


def _listing(repo: Repository, folder: str) -> dict[str, int]:
    """key (relative to the repository root) -> size, for one top folder."""
    return storage.list_keys(repo.fs, repo.root, folder)


def _folders(repo: Repository) -> list[str]:
    """The folders replicate copies, in commit order (format 2 has keys/ and no objects/)."""
    if repo.version >= 2:
        return [KEYS_FOLDER, "packs", "index", "snapshots"]
    return list(DATA_FOLDERS) + ["index", "snapshots"]


def _data_folders(repo: Repository) -> tuple[str, ...]:
    return ("packs",) if repo.version >= 2 else DATA_FOLDERS


def name_hash(key: str) -> str | None:
    """Format 2: the BLAKE3 hex a stored file's name carries (None for a name that carries none).

    Key files and packs are named by it; index files and manifests end with it
    (``<label>-<hex>``, ``<time>-<id>-<hex>``, ``.parquet`` appended when not encrypted).
    """
    name = key.rsplit("/", 1)[-1]
    if name.endswith(".parquet"):
        name = name[: -len(".parquet")]
    digest = name.rsplit("-", 1)[-1]
    return digest if _HEX64.fullmatch(digest) else None


def _snapshot_ids(keys) -> list[str]:
    """``<time>-<id>`` of each manifest name (format 1 ``<time>-<id>.parquet``, format 2 ``<time>-<id>-<hex>``)."""
    out = []
    for k in keys:
        name = k.rsplit("/", 1)[-1]
        plain = name[: -len(".parquet")] if name.endswith(".parquet") else None
        base = plain if plain is not None else name
        label, _, digest = base.rpartition("-")
        if label and _HEX64.fullmatch(digest):
            out.append(label)                     # format 2
        elif plain is not None:
            out.append(plain)                     # format 1
    return sorted(out)


def _describe_format(repo: Repository) -> str:
    if repo.version < 2:
        return "format 1"
    how = f"encrypted, {repo.config.encryption}" if repo.encrypted else "not encrypted"
    return f"format {repo.version} ({how})"


def _check_same_repository(primary: Repository, replica: Repository, url: str) -> None:
    if (replica.version, replica.encrypted) != (primary.version, primary.encrypted):
        raise ReplicaFormatError(replica=url, found=_describe_format(replica), expected=_describe_format(primary))
    if replica.config.id != primary.config.id:
        raise ReplicaMismatchError(replica=url, found=replica.config.id[:8], expected=primary.config.id[:8])


def open_replica(primary: Repository, url: str, storage_options: dict[str, Any] | None = None,
                 create: bool = True) -> tuple[Repository | None, bool]:
    """Open the replica at ``url`` (never unlocked); create it with the primary's ``keepflow.json`` if empty."""
    try:
        replica = Repository.open(url, storage_options, create=False, unlock=False)
    except RepositoryNotFoundError:
        if not create:
            return None, False
        return _create_replica(primary, url, storage_options), True
    _check_same_repository(primary, replica, url)
    return replica, False


def _create_replica(primary: Repository, url: str, storage_options: dict[str, Any] | None) -> Repository:
    """A new replica: the primary's ``keepflow.json``, byte for byte (the location was found empty)."""
    data = primary.fs.cat_file(primary.path(CONFIG_NAME))
    fs, root = storage.open_url(url, storage_options)
    path = storage.join(root, CONFIG_NAME)
    try:
        fs.makedirs(root, exist_ok=True)
        created = storage.write_once(fs, path, data)
        back = fs.cat_file(path)
    except Exception as exc:
        if not storage.is_storage_failure(exc):
            raise
        raise storage.describe_error(url, exc) from None
    replica = Repository.open(url, storage_options, unlock=False)
    _check_same_repository(primary, replica, url)      # somebody else created it at the same moment
    if created and back != data:
        raise ReplicaVerifyError(key=CONFIG_NAME, replica=url, reason="what the replica returns differs")
    return replica


def status(primary: Repository | str, url: str, storage_options: dict[str, Any] | None = None) -> ReplicaStatus:
    """What the replica has and lacks; changes nothing. Listings only: no password needed.

    ``primary`` is an opened repository or its URL (opened without unlocking).
    """
    if isinstance(primary, str):
        primary = Repository.open(primary, unlock=False)
    replica, _ = open_replica(primary, url, storage_options, create=False)
    p_snaps = _listing(primary, "snapshots")
    if replica is None:
        data = {k: v for f in _data_folders(primary) for k, v in _listing(primary, f).items()}
        keys = _listing(primary, KEYS_FOLDER) if primary.version >= 2 else {}
        return ReplicaStatus(url, False, [], _snapshot_ids(p_snaps), len(data), sum(data.values()),
                             len(_listing(primary, "index")), keys_missing=len(keys))
    plan = _plan(primary, replica)
    r_snaps = plan["replica_snapshots"]
    return ReplicaStatus(
        url, True,
        snapshots_present=_snapshot_ids(set(p_snaps) & set(r_snaps)),
        snapshots_missing=_snapshot_ids(set(p_snaps) - set(r_snaps)),
        data_missing=len(plan["data"]), data_bytes_missing=sum(plan["data"].values()),
        index_missing=len(plan["index"]), damaged=sorted(plan["damaged"]),
        keys_missing=len(plan["keys"]), keys_to_remove=len(plan["keys_extra"]),
    )


def _plan(primary: Repository, replica: Repository) -> dict:
    folders = _folders(primary)
    with ThreadPoolExecutor(max_workers=8) as pool:
        p_lists = dict(zip(folders, pool.map(lambda f: _listing(primary, f), folders), strict=True))
        r_lists = dict(zip(folders, pool.map(lambda f: _listing(replica, f), folders), strict=True))
    v2 = primary.version >= 2
    copy: dict[str, dict[str, int]] = {}
    damaged = []
    for folder in folders:
        todo = copy.setdefault("data" if folder in DATA_FOLDERS else folder, {})
        # Format 1 compares sizes for data only (as it always has); format 2's files are all write-once
        # and named by their hash, so a size that differs is a damaged copy wherever it is.
        by_size = v2 or folder in DATA_FOLDERS
        for key, size in p_lists[folder].items():
            have = r_lists[folder].get(key)
            if have is None:
                todo[key] = size
            elif by_size and have != size:
                todo[key] = size
                damaged.append(key)
    keys_extra = []
    if v2:
        keys_extra = sorted(k for k in r_lists[KEYS_FOLDER] if k not in p_lists[KEYS_FOLDER]
                            and _HEX64.fullmatch(k.rsplit("/", 1)[-1]))
    return {"data": copy["data"], "damaged": damaged, "index": copy["index"], "snapshots": copy["snapshots"],
            "keys": copy.get(KEYS_FOLDER, {}), "keys_extra": keys_extra,
            "primary_keys": len(p_lists.get(KEYS_FOLDER, {})), "snapshot_count": len(p_lists["snapshots"]),
            "replica_snapshots": r_lists["snapshots"]}


def replicate(primary_url: str, replica_url: str, storage_options: dict[str, Any] | None = None,
              replica_options: dict[str, Any] | None = None,
              dry_run: bool = False) -> ReplicaResult | ReplicaStatus:
    """Bring one replica up to date with the primary (see the module docstring). Needs no password."""
    primary = Repository.open(primary_url, storage_options, unlock=False)
    if dry_run:
        return status(primary, replica_url, replica_options)
    replica, created = open_replica(primary, replica_url, replica_options, create=True)
    assert replica is not None          # create=True: opened or made
    plan = _plan(primary, replica)
    result = ReplicaResult(replica_url, created=created, snapshots=plan["snapshot_count"])
    v2 = primary.version >= 2

    for key in plan["damaged"]:
        # A write-once file whose size is wrong can only be a damaged copy: replace it.
        replica.fs.rm_file(replica.path(key))
        result.replaced_damaged += 1

    if v2:
        _mirror_keys(primary, replica, plan, result)

    def copy_one(item):
        key, size = item
        if v2:
            return _copy_checked(primary, replica, key, size), size
        _copy(primary, replica, key, size, verify_hash=False)
        return None, size

    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        for (key, _), (problem, size) in zip(sorted(plan["data"].items()),
                                             pool.map(copy_one, sorted(plan["data"].items())), strict=True):
            if problem:
                result.not_copied.append({"key": key, "detail": problem})
                continue
            result.data_copied += 1
            result.bytes_copied += size
        # Index only after every data object is there, manifests only after the index.
        for folder, counter in (("index", "index_copied"), ("snapshots", "snapshots_copied")):
            for key, size in sorted(plan[folder].items()):
                if v2:
                    problem = _copy_checked(primary, replica, key, size)
                    if problem:
                        result.not_copied.append({"key": key, "detail": problem})
                        continue
                else:
                    _copy(primary, replica, key, size, verify_hash=True)
                setattr(result, counter, getattr(result, counter) + 1)
    # Copies interrupted in an earlier run (a server stopped mid-copy) leave
    # temporary names behind on filesystems such as SFTP: remove the old ones.
    from .gc import remove_stale_temporaries

    result.temporaries_removed = remove_stale_temporaries(replica, 1.0)
    damaged = [n for n in result.not_copied if n["detail"] != FOREIGN]
    if damaged:
        raise PrimaryDamagedError(count=len(damaged), replica=replica_url, first=damaged[0]["key"])
    return result


def _mirror_keys(primary: Repository, replica: Repository, plan: dict, result: ReplicaResult) -> None:
    """Format 2: the replica's keys/ becomes the primary's (copy what it lacks, remove what the primary lost)."""
    if primary.encrypted and plan["primary_keys"] == 0:
        raise PrimaryWithoutKeysError(replica=replica.url)
    for key, size in sorted(plan["keys"].items()):
        problem = _copy_checked(primary, replica, key, size)
        if problem:
            result.not_copied.append({"key": key, "detail": problem})
        else:
            result.keys_copied += 1
    for key in plan["keys_extra"]:
        try:
            replica.fs.rm_file(replica.path(key))
        except FileNotFoundError:
            pass
        result.keys_removed += 1


FOREIGN = "its name carries no BLAKE3 hash: not a keepflow file, not copied"


class _HashingReader:
    """A file object that hashes what is read through it."""

    def __init__(self, f) -> None:
        self.f, self.hasher = f, blake3.blake3()

    def read(self, n=-1):
        block = self.f.read(n)
        self.hasher.update(block)
        return block


def _stored_hash(repo: Repository, key: str) -> str:
    hasher = blake3.blake3()
    with repo.fs.open(repo.path(key), "rb") as f:
        while block := f.read(CHUNK):
            hasher.update(block)
    return hasher.hexdigest()


def _copy_checked(primary: Repository, replica: Repository, key: str, size: int) -> str | None:
    """Format 2: copy one file, checked against the hash in its name on both sides.

    Returns None when copied, or why it was not (damaged on the primary, a
    foreign name); raises ReplicaVerifyError when the replica returns other
    bytes (that copy is removed first, so the next run copies it again).
    """
    expected = name_hash(key)
    if expected is None:
        return FOREIGN
    src, dst = primary.path(key), replica.path(key)
    if size > STREAM_ABOVE:
        with primary.fs.open(src, "rb") as fin:
            reader = _HashingReader(fin)
            wrote = storage.write_stream_once(replica.fs, dst, reader, CHUNK)
        if wrote and reader.hasher.hexdigest() != expected:
            _remove_quietly(replica, dst)
            return "damaged on the primary: its bytes do not match the hash in its name"
    else:
        data = primary.fs.cat_file(src)
        if len(data) != size:
            raise ReplicaVerifyError(key=key, replica=replica.url, reason=f"read {len(data)} bytes, listed {size}")
        if blake3.blake3(data).hexdigest() != expected:
            return "damaged on the primary: its bytes do not match the hash in its name"
        storage.write_once(replica.fs, dst, data)
    if _stored_hash(replica, key) != expected:
        _remove_quietly(replica, dst)
        raise ReplicaVerifyError(key=key, replica=replica.url,
                                 reason="what the replica returns does not match the hash in its name; removed")
    return None


def _remove_quietly(repo: Repository, path: str) -> None:
    try:
        repo.fs.rm_file(path)
    except FileNotFoundError:
        pass


def _copy(primary: Repository, replica: Repository, key: str, size: int, verify_hash: bool) -> None:
    """Format 1: copy one key; data checked by size, index files and manifests by BLAKE3 of the read-back."""
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
