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


def check_structure(repo_url: str, storage_options=None) -> VerifyResult:
    """Structural checks."""
    repo = Repository.open(repo_url, storage_options)
    result = VerifyResult(repo_url)
    idx = indexmod.load_index(repo)
    result.blobs = idx.num_rows

    # Manifests: parse, and attribute missing blobs to snapshots and paths.
    names = snapshots.list_snapshot_names(repo)
    result.snapshots = len(names)
    indexed = idx["hash"]
    missing: dict[str, dict] = {}
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
        for path, blob in zip(absent["path"].to_pylist(), absent["hash"].to_pylist()):
            p = missing.setdefault(blob, _problem("missing blob", "referenced by a manifest but not in the index",
                                                  blob=blob))
            if info.id not in p["snapshots"]:
                p["snapshots"].append(info.id)
            if len(p["paths"]) < MAX_PATHS_PER_PROBLEM and path not in p["paths"]:
                p["paths"].append(path)
    result.problems.extend(missing.values())

    # Keys: every indexed key exists and is long enough.
    listing = {**storage.list_keys(repo.fs, repo.root, "packs"), **storage.list_keys(repo.fs, repo.root, "objects")}
    result.keys = len(listing)
    if idx.num_rows:
        ends = pc.add(idx["offset"], idx["length"])
        needed = pa.table({"key": idx["key"], "end": ends}).group_by("key").aggregate([("end", "max")])
        for key, end in zip(needed["key"].to_pylist(), needed["end_max"].to_pylist()):
            size = listing.get(key)
            if size is None:
                result.problems.append(_problem("missing key", "indexed but not stored", key=key))
            elif size < end:
                result.problems.append(_problem("short key", f"{size} bytes stored, index needs {end}", key=key))
    return result


def check_data(repo_url: str, percent: float, storage_options=None, seed: int | None = None,
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
    by_key: dict[str, list[tuple[str, int, int]]] = {}
    for blob, key, off, length in zip(idx["hash"].to_pylist(), idx["key"].to_pylist(),
                                      idx["offset"].to_pylist(), idx["length"].to_pylist()):
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


def choose_keys(keys: list[str], percent: float, seed: int | None) -> list[str]:
    """``percent`` of ``keys`` (at least one), a random sample fixed by ``seed``."""
    count = len(keys) if percent >= 100 else max(1, round(len(keys) * percent / 100))
    return random.Random(seed).sample(keys, count)


def attribute(repo_url: str, problems: list[dict], storage_options=None) -> None:
    """Fill in the snapshots and paths that corrupt blobs affect."""
    blobs = {p["hash"] for p in problems if p["kind"] == "corrupt blob" and p["hash"]}
    by_key = {p["key"] for p in problems if p["kind"] in ("missing key", "short key", "wrong name", "unreadable key")}
    if not blobs and not by_key:
        return
    repo = Repository.open(repo_url, storage_options)
    if by_key:
        idx = indexmod.load_index(repo)
        for key, blob in zip(idx["key"].to_pylist(), idx["hash"].to_pylist()):
            if key in by_key:
                blobs.add(blob)
    affected: dict[str, tuple[set, list]] = {}
    value_set = pa.array(sorted(blobs), pa.string())
    for info in snapshots.list_snapshots(repo, damaged=[]):   # damaged ones are findings already
        table = manifest.read_manifest(repo, info, columns=["path", "hash"])
        hit = table.filter(pc.is_in(table["hash"], value_set=value_set))
        for path, blob in zip(hit["path"].to_pylist(), hit["hash"].to_pylist()):
            snaps, paths = affected.setdefault(blob, (set(), []))
            snaps.add(info.id)
            if len(paths) < MAX_PATHS_PER_PROBLEM and path not in paths:
                paths.append(path)
    key_blobs: dict[str, set] = {}
    if by_key:
        for key, blob in zip(idx["key"].to_pylist(), idx["hash"].to_pylist()):
            if key in by_key:
                key_blobs.setdefault(key, set()).add(blob)
    for p in problems:
        related = {p["hash"]} if p["hash"] else key_blobs.get(p["key"], set())
        for blob in related:
            snaps, paths = affected.get(blob, (set(), []))
            p["snapshots"] = sorted(set(p["snapshots"]) | snaps)
            p["paths"] = (p["paths"] + [x for x in paths if x not in p["paths"]])[:MAX_PATHS_PER_PROBLEM]


def verify(repo_url: str, read_data: float = 0.0, storage_options=None, seed: int | None = None) -> VerifyResult:
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
