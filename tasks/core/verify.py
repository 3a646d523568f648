"""Checking a repository: structure always, data on request.

Structure (cheap: listings, footers, the index and manifests' hash columns):

* every manifest parses and carries keepflow metadata;
* every file hash in every manifest is in the index (else: "missing blob",
  reported with the snapshots and paths it affects);
* every indexed key exists and is at least ``offset + length`` long (else:
  "missing key" / "short key");
* nothing is stored under a wrong name: a pack's name is the BLAKE3 of its
  bytes and an object's name the BLAKE3 of its content — checked for the
  data that is read (below), because checking a name means reading the data.

Data (``read_data`` percent of the stored keys, chosen at random each run, so
repeated runs cover different data; 100 reads everything): each chosen key is
read once, its name is checked against its hash, and every blob the index
places in it is re-hashed ("corrupt blob" when it does not match).

Problems are plain dicts (kind, key, hash, detail, snapshots, paths) so the
flow can put them in a table artifact and the CLI can print or JSON them.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from . import index as indexmod
from . import manifest, snapshots, storage
from .repository import Repository

MAX_PATHS_PER_PROBLEM = 20
CHUNK = 8 * 1024 * 1024


@dataclass
class VerifyResult:
    repository: str
    snapshots: int = 0
    blobs: int = 0
    keys: int = 0
    keys_read: int = 0
    bytes_read: int = 0
    problems: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _problem(kind: str, detail: str, key: str | None = None, blob: str | None = None) -> dict:
    return {"kind": kind, "key": key, "hash": blob, "detail": detail, "snapshots": [], "paths": []}


def _load_index_reporting(repo: Repository, result: VerifyResult) -> pa.Table:
    """The index; a damaged index file (format 2 authenticates each) is a finding, the rest is used."""
    names = indexmod.list_index_names(repo)
    tables = []
    for name in names:
        try:
            tables.append(indexmod.read_index_files(repo, [name]))
        except FileNotFoundError:
            continue          # merged away by a run that committed meanwhile
        except Exception as exc:
            result.problems.append(_problem("bad index", f"index/{name} cannot be read: {exc}", key=f"index/{name}"))
    if not tables:
        return indexmod.schema(repo).empty_table()
    return indexmod.unique_hashes(pa.concat_tables(tables))


def check_structure(repo_url: str, storage_options: dict[str, Any] | None = None) -> VerifyResult:
    """Structural checks."""
    repo = Repository.open(repo_url, storage_options)
    result = VerifyResult(repo_url)
    idx = _load_index_reporting(repo, result)
    result.blobs = idx.num_rows

    # Manifests: parse, and attribute missing blobs to snapshots and paths.
    names = snapshots.list_snapshot_names(repo)
    result.snapshots = len(names)
    indexed = idx["hash"]
    missing: dict[str, dict] = {}
    lists_seen: dict[str, str | None] = {}     # format 2: list id -> None (good) or what is wrong
    for name in names:
        try:
            info = manifest.read_info(repo, name)
            table = manifest.read_manifest(repo, info, columns=["path", "type", "hash"])
        except Exception as exc:  # a damaged manifest is a finding, not a crash
            result.problems.append(_problem("bad manifest", f"snapshots/{name} cannot be read: {exc}",
                                            key=f"snapshots/{name}"))
            continue
        files = table.filter(pc.equal(table["type"], "file"))
        absent = files.filter(pc.invert(pc.is_in(files["hash"], value_set=indexed)))
        if repo.version >= 2:
            absent = pa.concat_tables([absent, _files_with_bad_lists(repo, files, idx, lists_seen)])
        for path, blob in zip(absent["path"].to_pylist(), absent["hash"].to_pylist(), strict=True):
            p = missing.setdefault(blob, _problem("missing blob", "referenced by a manifest but not in the index",
                                                  blob=blob))
            if info.id not in p["snapshots"]:
                p["snapshots"].append(info.id)
            if len(p["paths"]) < MAX_PATHS_PER_PROBLEM and path not in p["paths"]:
                p["paths"].append(path)
    result.problems.extend(missing.values())
    for list_id, trouble in sorted(lists_seen.items()):
        if trouble:
            known_problem = missing.get(list_id)
            if known_problem is not None:
                known_problem["kind"], known_problem["detail"] = "bad list", trouble

    # Keys: every indexed key exists and is long enough.
    listing = {**storage.list_keys(repo.fs, repo.root, "packs"), **storage.list_keys(repo.fs, repo.root, "objects")}
    result.keys = len(listing)
    if idx.num_rows:
        ends = pc.add(idx["offset"], idx["length"])
        needed = pa.table({"key": idx["key"], "end": ends}).group_by("key").aggregate([("end", "max")])
        for key, end in zip(needed["key"].to_pylist(), needed["end_max"].to_pylist(), strict=True):
            size = listing.get(key)
            if size is None:
                result.problems.append(_problem("missing key", "indexed but not stored", key=key))
            elif size < end:
                result.problems.append(_problem("short key", f"{size} bytes stored, index needs {end}", key=key))
    return result


def _files_with_bad_lists(repo: Repository, files: pa.Table, idx: pa.Table, seen: dict) -> pa.Table:
    """Format 2: the files whose chunk list cannot be read, or names a chunk the index lacks.

    Each list is read once per verify (``seen``), however many snapshots use it.
    """
    from .chunk_lists import read_lists

    lists = idx.filter(pc.equal(idx["type"], 1))
    used = files.filter(pc.is_in(files["hash"], value_set=lists["hash"]))
    if used.num_rows == 0:
        return used.slice(0, 0)
    new = pc.unique(used["hash"])
    new = new.filter(pc.invert(pc.is_in(new, value_set=pa.array(list(seen), pa.string()))))
    if len(new):
        rows = lists.filter(pc.is_in(lists["hash"], value_set=new))
        indexed = idx["hash"]
        for list_id, chunks in zip(rows["hash"].to_pylist(), read_lists(repo, rows), strict=True):
            if chunks is None:
                seen[list_id] = "its chunk list cannot be read or does not authenticate"
                continue
            ids = pa.array([c for c, _ in chunks], pa.string())
            absent = len(ids) - pc.sum(pc.is_in(ids, value_set=indexed)).as_py()
            seen[list_id] = f"{absent} of its {len(ids)} chunks are not in the index" if absent else None
    bad = pa.array([k for k, v in seen.items() if v], pa.string())
    return used.filter(pc.is_in(used["hash"], value_set=bad))


def check_data(repo_url: str, percent: float, storage_options: dict[str, Any] | None = None, seed: int | None = None,
               part: int = 0, parts: int = 1) -> tuple[list[dict], int, int]:
    """Re-hash ``percent`` of the stored keys (and every blob in them).

    The keys are chosen with ``seed`` (random per run, fixed within one), and
    split round-robin into ``parts``: part ``part`` is checked here, so a flow
    can spread the reading over several task runs.
    """
    if percent <= 0:
        return [], 0, 0
    repo = Repository.open(repo_url, storage_options)
    idx = indexmod.load_index(repo)
    if idx.num_rows == 0:
        return [], 0, 0
    if repo.version >= 2:
        return _check_data_v2(repo, idx, percent, seed, part, parts)
    by_key: dict[str, list[tuple[str, int, int]]] = {}
    for blob, key, off, length in zip(idx["hash"].to_pylist(), idx["key"].to_pylist(),
                                      idx["offset"].to_pylist(), idx["length"].to_pylist(), strict=True):
        by_key.setdefault(key, []).append((blob, off, length))
    chosen = choose_keys(sorted(by_key), percent, seed)[part::parts]

    def check(key):
        problems, nbytes = [], 0
        try:
            if key.startswith("objects/"):
                hasher = blake3.blake3()
                with repo.fs.open(repo.path(key), "rb") as f:
                    while chunk := f.read(CHUNK):
                        hasher.update(chunk)
                        nbytes += len(chunk)
                name = key.rsplit("/", 1)[-1]
                if hasher.hexdigest() != name:
                    problems.append(_problem("corrupt blob", "content does not match its name", key=key, blob=name))
                return problems, nbytes
            data = repo.fs.cat_file(repo.path(key))
        except FileNotFoundError:
            return [_problem("missing key", "indexed but not stored", key=key)], 0
        except OSError as exc:
            return [_problem("unreadable key", str(exc), key=key)], 0
        nbytes = len(data)
        if blake3.blake3(data).hexdigest() != key.rsplit("/", 1)[-1]:
            problems.append(_problem("wrong name", "pack bytes do not match the pack's name", key=key))
        for blob, off, length in by_key[key]:
            if blake3.blake3(data[off: off + length]).hexdigest() != blob:
                problems.append(_problem("corrupt blob", f"bytes {off}-{off + length} do not match", key=key,
                                         blob=blob))
        return problems, nbytes

    problems, total = [], 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        for found, nbytes in pool.map(check, chosen):
            problems.extend(found)
            total += nbytes
    return problems, len(chosen), total


def _check_data_v2(repo: Repository, idx: pa.Table, percent: float, seed, part: int, parts: int):
    """Format 2: each chosen pack read whole; its name, its header against the index, every blob opened."""
    from . import pack

    by_key: dict[str, list[dict]] = {}
    for row in idx.to_pylist():
        by_key.setdefault(row["key"], []).append(row)
    chosen = choose_keys(sorted(by_key), percent, seed)[part::parts]

    def check(key):
        try:
            data = repo.fs.cat_file(repo.path(key))
        except FileNotFoundError:
            return [_problem("missing key", "indexed but not stored", key=key)], 0
        except OSError as exc:
            return [_problem("unreadable key", str(exc), key=key)], 0
        problems = []
        if blake3.blake3(data).hexdigest() != key.rsplit("/", 1)[-1]:
            problems.append(_problem("wrong name", "pack bytes do not match the pack's name", key=key))
        try:
            salt, entries = pack.header2_from_bytes(repo.keys, data, key)
        except Exception as exc:
            return problems + [_problem("bad pack", str(exc), key=key)], len(data)
        by_id = {e.id: e for e in entries}
        view = memoryview(data)
        for row in by_key[key]:
            e = by_id.get(row["hash"])
            if e is None or (e.seq, e.offset, e.length) != (row["seq"], row["offset"], row["length"]) \
                    or salt != row["salt"]:
                problems.append(_problem("corrupt blob", "the pack's header does not place it where the index does",
                                         key=key, blob=row["hash"]))
                continue
            try:
                pack.open_blob2(repo.keys, salt, e, view[e.offset: e.offset + e.length])
            except Exception as exc:
                problems.append(_problem("corrupt blob", str(exc), key=key, blob=row["hash"]))
        return problems, len(data)

    problems, total = [], 0
    with ThreadPoolExecutor(max_workers=2) as pool:     # AES-GCM holds the GIL: more threads buy nothing
        for found, nbytes in pool.map(check, chosen):
            problems.extend(found)
            total += nbytes
    return problems, len(chosen), total


def choose_keys(keys: list[str], percent: float, seed: int | None) -> list[str]:
    """``percent`` of ``keys`` (at least one), a random sample fixed by ``seed``."""
    count = len(keys) if percent >= 100 else max(1, round(len(keys) * percent / 100))
    return random.Random(seed).sample(keys, count)


def attribute(repo_url: str, problems: list[dict], storage_options: dict[str, Any] | None = None) -> None:
    """Fill in the snapshots and paths that corrupt blobs affect (format 2: a chunk's are those of
    the files whose chunk lists name it)."""
    blobs = {p["hash"] for p in problems if p["kind"] == "corrupt blob" and p["hash"]}
    by_key = {p["key"] for p in problems if p["kind"] in ("missing key", "short key", "wrong name", "unreadable key")}
    if not blobs and not by_key:
        return
    repo = Repository.open(repo_url, storage_options)
    if by_key or repo.version >= 2:
        idx = indexmod.load_index(repo)
    if by_key:
        for key, blob in zip(idx["key"].to_pylist(), idx["hash"].to_pylist(), strict=True):
            if key in by_key:
                blobs.add(blob)
    # Format 2: a damaged chunk is in no manifest; the files it harms are those whose lists name it.
    lists_of = _lists_naming(repo, idx, blobs) if repo.version >= 2 else {}
    blobs.update(list_id for ids in lists_of.values() for list_id in ids)
    affected: dict[str, tuple[set, list]] = {}
    value_set = pa.array(sorted(blobs), pa.string())
    for info in snapshots.list_snapshots(repo, damaged=[]):   # damaged ones are findings already
        table = manifest.read_manifest(repo, info, columns=["path", "hash"])
        hit = table.filter(pc.is_in(table["hash"], value_set=value_set))
        for path, blob in zip(hit["path"].to_pylist(), hit["hash"].to_pylist(), strict=True):
            snaps, paths = affected.setdefault(blob, (set(), []))
            snaps.add(info.id)
            if len(paths) < MAX_PATHS_PER_PROBLEM and path not in paths:
                paths.append(path)
    key_blobs: dict[str, set] = {}
    if by_key:
        for key, blob in zip(idx["key"].to_pylist(), idx["hash"].to_pylist(), strict=True):
            if key in by_key:
                key_blobs.setdefault(key, set()).add(blob)
    for p in problems:
        related = {p["hash"]} if p["hash"] else key_blobs.get(p["key"], set())
        related = related.union(*(lists_of.get(b, ()) for b in related))
        for blob in related:
            snaps, paths = affected.get(blob, (set(), []))
            p["snapshots"] = sorted(set(p["snapshots"]) | snaps)
            p["paths"] = (p["paths"] + [x for x in paths if x not in p["paths"]])[:MAX_PATHS_PER_PROBLEM]


def _lists_naming(repo: Repository, idx: pa.Table, chunk_ids: set) -> dict[str, set]:
    """Format 2: chunk id -> the ids of the list blobs (chunked files' content ids) naming it, for
    the ``chunk_ids`` some list names. Lists that cannot be read are findings of check_structure."""
    from .chunk_lists import read_lists

    lists = idx.filter(pc.equal(idx["type"], 1)) if chunk_ids else idx.slice(0, 0)
    found: dict[str, set] = {}
    for list_id, chunks in zip(lists["hash"].to_pylist(), read_lists(repo, lists), strict=True):
        for chunk_id, _ in chunks or ():
            if chunk_id in chunk_ids:
                found.setdefault(chunk_id, set()).add(list_id)
    return found


def verify(repo_url: str, read_data: float = 0.0, storage_options: dict[str, Any] | None = None,
           seed: int | None = None) -> VerifyResult:
    """Everything in one call (the flow spreads the same steps over task runs)."""
    result = check_structure(repo_url, storage_options)
    problems, keys_read, nbytes = check_data(repo_url, read_data, storage_options, seed)
    result.problems.extend(problems)
    result.keys_read, result.bytes_read = keys_read, nbytes
    attribute(repo_url, result.problems, storage_options)
    return result


def parse_percent(text: str | float) -> float:
    """'10%', '10' or 10 -> 10.0; bounds 0..100."""
    from .errors import UsageError

    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise UsageError(f"--read-data takes a percentage such as 10% or 100%, not {text!r}") from None
    if not 0 <= value <= 100:
        raise UsageError(f"--read-data must be between 0% and 100%, not {text!r}")
    return value


# -- format 2 without the key ------------------------------------------------------------------

CIPHERTEXT_FOLDERS = ("keys", "index", "snapshots", "trash")


def check_ciphertext(repo_url: str, percent: float = 0.0, storage_options: dict[str, Any] | None = None,
                     seed: int | None = None) -> VerifyResult:
    """``verify --ciphertext-only``: what can be checked with no password (a replication host).

    Every file under keys/, index/, snapshots/ and trash/ must have the BLAKE3
    of its bytes as the last field of its name; every pack must end in a
    well-formed footer, and ``percent`` of the packs are read whole and their
    names checked. Tags and cross-references need the key and are not checked.
    """
    from . import pack

    repo = Repository.open(repo_url, storage_options, unlock=False)
    result = VerifyResult(repo_url)
    if repo.version < 2:
        from .errors import UsageError

        raise UsageError(f"{repo_url} is a format 1 repository (plaintext): run `keepflow verify` without "
                         "--ciphertext-only, it needs no password")

    def named_by_hash(folder: str, name: str) -> bool:
        digest = name.split(".", 1)[0].rsplit("-", 1)[-1]
        try:
            data = repo.fs.cat_file(repo.path(folder, name))
        except OSError:
            return False
        result.bytes_read += len(data)
        return blake3.blake3(data).hexdigest() == digest

    for folder in CIPHERTEXT_FOLDERS:
        for info in storage.list_files(repo.fs, repo.path(folder)):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if ".tmp-" in name:
                continue
            if folder == "snapshots":
                result.snapshots += 1
            if not named_by_hash(folder, name):
                result.problems.append(_problem("wrong name", "its bytes do not match the hash in its name",
                                                key=f"{folder}/{name}"))
    listing = storage.list_keys(repo.fs, repo.root, "packs")
    result.keys = len(listing)
    chosen = set(choose_keys(sorted(listing), percent, seed)) if percent > 0 and listing else set()

    def check_pack(key: str) -> list[dict]:
        size = listing[key]
        try:
            footer = repo.fs.cat_file(repo.path(key), start=max(0, size - pack.FOOTER2_SIZE), end=size)
        except OSError as exc:
            return [_problem("unreadable key", str(exc), key=key)]
        if not pack.well_formed_footer2(footer, size):
            return [_problem("bad pack", "it does not end in a well-formed format 2 pack footer", key=key)]
        if key in chosen:
            data = repo.fs.cat_file(repo.path(key))
            if blake3.blake3(data).hexdigest() != key.rsplit("/", 1)[-1]:
                return [_problem("wrong name", "pack bytes do not match the pack's name", key=key)]
        return []

    with ThreadPoolExecutor(max_workers=8 if not repo.is_local else 2) as pool:
        for found in pool.map(check_pack, sorted(listing)):
            result.problems.extend(found)
    result.keys_read = len(chosen)
    result.bytes_read += sum(listing[k] for k in chosen)
    return result
