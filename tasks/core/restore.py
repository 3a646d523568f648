"""Restoring a snapshot (or part of it) to a folder or an fsspec URL.

``prepare`` resolves the snapshot, filters its entries with the include
patterns (gitignore syntax; a matching folder brings everything below it),
joins the files with the index to learn where each blob lives, and writes the
restore plan, sorted by (key, offset), to the run folder (scratch.py: local by
default, shared storage for a cluster), one work list per batch. Folders are
created up front so that batches can run in any order.

``restore_range`` handles one batch of the plan. Blobs in the same pack are
read together: the needed ranges are sorted and coalesced into spans (gaps
under ``COALESCE_GAP`` are read through rather than paying another request),
one range read per span. Blobs stored whole (``objects/``) are streamed in
chunks. Every blob's BLAKE3 is checked before any file is put in place; a
mismatch is reported naming the file and nothing is written under its name.
Files are written to a temporary name in the destination folder, given their
mode and mtime, then renamed: a crash never leaves a partial file under the
real name. A blob used by several paths is read once. The temporaries a
killed restore left in the folders being restored into are removed by
``prepare`` before any batch writes (restore_writer.remove_stale_temporaries),
so a rerun leaves exactly the snapshot.

``--overwrite``: ``never`` leaves existing files alone, ``if-changed`` (the
default) skips a file whose size and content hash already match, ``always``
rewrites.

``finish`` creates symlinks (never followed) and applies folder metadata
deepest first, after all files are in place (writing a file would change its
folder's mtime).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3
import pyarrow as pa
import pyarrow.compute as pc

from . import manifest, memory, progress, restore_chunks, restore_entries, restore_plan, snapshots, storage
from . import scratch as scratch_io
from .blob_sources import BlobSources
from .errors import TargetError, UsageError
from .repository import Repository
from .restore_writer import RestoreBatchResult, TargetWriter, remove_stale_temporaries
from .scan import compile_patterns

# Format 2: what opening a blob needs besides key, offset and length.
V2_ROW_COLUMNS = ("kind", "seq", "salt", "raw_length", "compressed")

COALESCE_GAP = 1024 * 1024
# Batches of a local repository into a local target write their files one batch at a
# time per process: creating a file is kernel time (~25-60 µs here, the inode and its
# folder entry, whatever the tool), which a second thread does not speed up on this
# ext4, while the two threads' GIL hand-offs at every syscall cost CPU. Measured on
# 100,000 small files in process (bench.format2_profile restore): 2 threads took the
# same wall time as 1 and ~40% more CPU. Remote repositories and targets keep
# overlapping their reads.
_LOCAL_WRITES = threading.Lock()
CHUNK = 4 * 1024 * 1024
MAX_BATCH_FILES = 16384                # as backup.MAX_BATCH_FILES (Prefect's cost per task run)
MAX_BATCH_BYTES = 256 * 1024 * 1024
OVERWRITE_MODES = ("never", "if-changed", "always")
_BATCH_COLUMNS = ["path", "hash", "key", "offset", "length", "mode", "mtime_ns", "mtime_ns_exact", "uid", "gid", "size",
                  "xattrs", "path_bytes"]


@dataclass
class RestorePlan:
    repo_url: str
    snapshot: str
    snapshot_time: str
    target: str
    scratch: str
    overwrite: str
    dry_run: bool
    batches: list[tuple[int, int]]
    files: int
    dirs: int
    symlinks: int
    bytes: int
    fresh_target: bool = False
    sparse: bool = True                 # write holes for runs of zeros in large files
    xattrs: bool = True                 # set extended attributes and ACLs
    temporaries_removed: int = 0
    fallbacks: list[str] = field(default_factory=list)
    fallback_options: dict = field(default_factory=dict)
    primary_url: str = ""
    missing: list[tuple[str, str]] = field(default_factory=list)
    run_id: str = ""
    repo_config: dict | None = None     # keepflow.json of repo_url, so batches need not read it again

    def to_dict(self) -> dict:
        return asdict(self)


def prepare(repo_url: str, target: str, *, snapshot: str = "latest", as_of: str | None = None,
            includes: Sequence[str] = (), overwrite: str = "if-changed", dry_run: bool = False,
            storage_options: dict[str, Any] | None = None, target_options: dict[str, Any] | None = None,
            fallbacks: Sequence[str] = (),
            fallback_options: dict | None = None, work_dir: str | None = None,
            sparse: bool = True, xattrs: bool = True) -> RestorePlan:
    """Plan a restore; ``work_dir`` is where the run folder goes (scratch.work_dir)."""
    if overwrite not in OVERWRITE_MODES:
        raise UsageError(f"--overwrite must be one of {', '.join(OVERWRITE_MODES)}, not {overwrite!r}")
    spec = compile_patterns(includes, origin="--include")
    repo, info, rows, used_url = _open_with_failover(repo_url, storage_options, list(fallbacks),
                                                     fallback_options or {}, snapshot, as_of)
    tfs, troot = _target_fs(target, target_options)
    fresh = storage.is_local(tfs) and not os.path.lexists(troot)
    local = storage.is_local(tfs)
    openers = [_opener(u, storage_options if u == repo_url else (fallback_options or {}).get(u))
               for u in [repo_url, *fallbacks] if u != used_url]
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    scratch = scratch_io.create("restore", run_id, work_dir)
    try:
        with rows:
            # The manifest a row group at a time, looked up in the compact index, the
            # work lists written as batches fill (restore_plan.py): bounded memory.
            facts = restore_plan.write_plan(repo, rows, scratch, spec=spec, local_target=local, fallbacks=openers,
                                            batch_columns=_BATCH_COLUMNS, max_files=MAX_BATCH_FILES,
                                            max_bytes=MAX_BATCH_BYTES, parent_folders=_parent_folders,
                                            dir_paths=_fs_paths)
        if spec is not None and facts.selected == 0:
            raise UsageError(f"no entry of snapshot {info.short_id} matches --include {' '.join(includes)}")
    except BaseException:
        scratch_io.remove(scratch)      # nobody else knows the folder yet
        raise
    memory.release()
    removed = []
    if not dry_run:
        try:
            _make_dirs(tfs, troot, facts.folders, target)
            if not fresh:
                removed = remove_stale_temporaries(tfs, troot, facts.folders)
        except BaseException:
            scratch_io.remove(scratch)
            raise
    batches, n_files, n_bytes = facts.batches, facts.files, facts.bytes
    missing_paths = facts.missing
    return RestorePlan(
        repo_url=used_url, snapshot=info.id, snapshot_time=info.time, target=target, scratch=scratch,
        overwrite=overwrite, dry_run=dry_run, batches=batches, files=n_files, dirs=facts.dirs,
        symlinks=facts.symlinks, bytes=n_bytes, fresh_target=fresh, sparse=sparse, xattrs=xattrs,
        temporaries_removed=len(removed),
        fallbacks=[u for u in [repo_url, *fallbacks] if u != used_url], fallback_options=fallback_options or {},
        primary_url=repo_url,
        missing=[(p, "blob not in the repository index") for p in missing_paths],
        run_id=run_id, repo_config=repo.config.to_plan(),
    )


def _opener(url: str, options):
    """A callable opening the replica at ``url`` (None when it cannot be opened)."""
    def open_replica():
        try:
            return Repository.open(url, options)
        except Exception:
            return None
    return open_replica


def _open_with_failover(repo_url, storage_options, fallbacks, fallback_options, snapshot, as_of):
    """Open the primary and read the snapshot's manifest; on failure, the first
    fallback that can. Usage errors (unknown snapshot id...) are not retried
    on fallbacks: they would fail the same way."""
    from .errors import KeepflowError

    first_error = None
    for url in [repo_url, *fallbacks]:
        opts = storage_options if url == repo_url else fallback_options.get(url)
        try:
            repo = Repository.open(url, opts)
            info = snapshots.resolve(repo, snapshot, as_of=as_of)
            # Opened (format 2: read and authenticated) here, so a damaged manifest falls over to a replica.
            rows = manifest.ManifestRows(repo, info, manifest.MANIFEST_SCHEMA.names).__enter__()
            return repo, info, rows, url
        except UsageError:
            raise
        except (KeepflowError, OSError) as exc:
            if first_error is None:
                first_error = exc
            if not fallbacks:
                raise
    assert first_error is not None      # the loop ran (the primary at least) and each try failed
    raise first_error


def _target_fs(target: str, options=None):
    try:
        return storage.open_url(target, options)
    except UsageError:
        raise
    except Exception as exc:
        raise TargetError(target=target, reason=str(exc)) from None


def _fs_paths(table: pa.Table, local: bool) -> list[str]:
    """The entries' paths as the target's filesystem needs them: a name that
    is not UTF-8 gets its exact bytes back on a local target (manifest.fs_path)."""
    paths = table["path"].to_pylist()
    if not local or table["path_bytes"].null_count == table.num_rows:
        return paths
    return [manifest.fs_path(p, raw) for p, raw in zip(paths, table["path_bytes"].to_pylist(), strict=True)]


def _parent_folders(table: pa.Table, local: bool) -> set[str]:
    """The folders holding the entries of ``table`` ("" is the target itself): vectorised
    (a Python string per entry was ~100 MiB per million files), per name only when some
    names need their raw bytes on a local target (``_fs_paths``)."""
    if table.num_rows == 0:
        return set()
    if local and table["path_bytes"].null_count < table.num_rows:
        return {p.rsplit("/", 1)[0] if "/" in p else "" for p in _fs_paths(table, local)}
    paths = table["path"]
    parents = pc.if_else(pc.match_substring(paths, "/"), pc.replace_substring_regex(paths, "/[^/]*$", ""), "")
    return set(pc.unique(parents).to_pylist())


def _makedirs_private(path: str) -> None:
    """``os.makedirs`` with every folder it creates owner-only (0700).

    A folder is private until ``finish`` gives it the snapshot's mode, so a
    folder that is 0700 in the snapshot is never world-readable while the
    restore runs or after it was killed (restic does the same).
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise


def _make_dirs(fs, root, wanted, target):
    try:
        if storage.is_local(fs):
            if os.path.exists(root) and not os.path.isdir(root):
                raise TargetError(target=target, reason="it exists and is not a folder")
            for d in sorted(wanted):
                _makedirs_private(os.path.join(root, d) if d else root)
        else:
            for d in sorted(wanted):
                fs.makedirs(storage.join(root, d) if d else root, exist_ok=True)
    except TargetError:
        raise
    except OSError as exc:
        raise TargetError(target=target, reason=exc.strerror or str(exc)) from None


def restore_range(plan: dict, batch_no: int, storage_options: dict[str, Any] | None = None,
                  target_options: dict[str, Any] | None = None) -> RestoreBatchResult:
    """Restore batch ``batch_no`` of the plan."""
    table = scratch_io.read_part(plan["scratch"], "batch", batch_no)
    sources = BlobSources(plan, storage_options)
    tfs, troot = _target_fs(plan["target"], target_options)
    writer = TargetWriter(tfs, troot, plan["overwrite"], plan["dry_run"], fresh=plan["fresh_target"],
                          sparse=plan.get("sparse", True))
    if batch_no == 0:
        progress.start("restore", plan["files"], plan["bytes"])
    result = writer.result
    wanted_columns = _BATCH_COLUMNS + [c for c in V2_ROW_COLUMNS if c in table.column_names]
    cols = {c: table[c].to_pylist() for c in wanted_columns if c != "xattrs" or plan.get("xattrs", True)}
    v2 = "seq" in cols
    opener = restore_chunks.BlobOpener(sources, cols) if v2 else None
    if v2:
        writer.content_id = restore_chunks.content_id_function(sources.any_repo())

    # Group the paths by blob: a blob is read once however many files use it.
    by_hash: dict[str, list[int]] = {}
    order: list[int] = []
    for i, h in enumerate(cols["hash"]):
        if h not in by_hash:
            by_hash[h] = []
            order.append(i)
        by_hash[h].append(i)

    # Decide first which blobs are needed at all (existing identical files skip).
    needed = [i for i in order if any([writer.wants(cols, j) for j in by_hash[cols["hash"][i]]])]
    if plan["dry_run"]:
        for i in needed:
            for j in by_hash[cols["hash"][i]]:
                if writer.pending(j):
                    result.written += 1
                    result.bytes_written += cols["size"][j]
        return result

    by_key: dict[str, list[int]] = {}
    chunked = []
    for i in needed:
        if v2 and cols["kind"][i] == 1:
            chunked.append(i)
            continue
        by_key.setdefault(cols["key"][i], []).append(i)
    if chunked:
        restore_chunks.restore_chunked(plan, batch_no, sources, cols, chunked, by_hash, writer)
    with _LOCAL_WRITES if writer.local and _local_primary(sources) else contextlib.nullcontext():
        _restore_blobs(sources, cols, by_key, by_hash, writer, opener)
    writer.flush_progress()
    result.sources = dict(sources.used)
    return result


def _local_primary(sources: BlobSources) -> bool:
    repo = sources.repo(sources.primary_url)
    return repo is not None and storage.is_local(repo.fs)


def _restore_blobs(sources: BlobSources, cols: dict, by_key: dict[str, list[int]], by_hash: dict[str, list[int]],
                   writer: TargetWriter, opener: restore_chunks.BlobOpener | None) -> None:
    """Read, verify and write the blobs of ``by_key`` (pack key -> rows), span by span."""
    result = writer.result
    for key, items in by_key.items():
        if key.startswith("objects/"):
            for i in items:
                _restore_large(sources, cols, i, by_hash, writer)
            continue
        for span_start, span_end, members in _spans(cols, items):
            try:
                data: bytes | memoryview | None = sources.primary_range(key, span_start, span_end)
            except OSError:
                data = None  # each blob is then fetched from a fallback below
            if data is not None:
                result.bytes_read += len(data)
                data = memoryview(data)        # blob slices without copies
            for i in members:
                blob_hash, length = cols["hash"][i], cols["length"][i]
                blob: bytes | memoryview | None = None
                if data is not None:
                    off = cols["offset"][i] - span_start
                    blob = data[off: off + length]
                    if opener is not None:
                        blob = opener.open(i, blob)
                    elif blake3.blake3(blob).hexdigest() != blob_hash:
                        blob = None
                    if blob is not None:
                        sources.count(sources.primary_url)
                if blob is None:
                    check = None if opener is None else functools.partial(opener.open, i)
                    blob, problem = sources.from_fallbacks(key, cols["offset"][i], length, blob_hash, check=check)
                    if blob is None:
                        for j in by_hash[blob_hash]:
                            result.errors.append((cols["path"][j], problem or "unreadable"))
                        continue
                for j in by_hash[blob_hash]:
                    if writer.pending(j):
                        writer.write_bytes(cols, j, blob)


def _spans(cols, items):
    items = sorted(items, key=lambda i: cols["offset"][i])
    span_start = span_end = None
    members: list[int] = []
    for i in items:
        off, length = cols["offset"][i], cols["length"][i]
        if span_start is None:
            span_start, span_end, members = off, off + length, [i]
        elif off - span_end <= COALESCE_GAP:
            span_end = max(span_end, off + length)
            members.append(i)
        else:
            yield span_start, span_end, members
            span_start, span_end, members = off, off + length, [i]
    if members:
        yield span_start, span_end, members


def _restore_large(sources, cols, i, by_hash, writer):
    paths = [j for j in by_hash[cols["hash"][i]] if writer.pending(j)]
    if not paths:
        return
    first, rest = paths[0], paths[1:]
    key = cols["key"][i]
    restored = False
    for url in sources.all_urls():
        repo = sources.repo(url)
        if repo is None:
            continue
        try:
            if writer.write_stream(cols, first, repo.fs, repo.path(key), cols["hash"][i]):
                sources.count(url)
                restored = True
                break
        except OSError:
            continue
    if not restored:
        for j in paths:
            writer.result.errors.append((cols["path"][j], f"cannot read a verified copy of {key} from "
                                         f"{', '.join(sources.all_urls())}"))
        return
    for j in rest:
        writer.copy_from(cols, first, j)


def finish(plan: dict, target_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Create symlinks, hard links, FIFOs and devices, then apply folder metadata
    (restore_entries.py); returns errors."""
    other = scratch_io.read(plan["scratch"], "other")
    tfs, troot = _target_fs(plan["target"], target_options)
    if plan["dry_run"] or not storage.is_local(tfs):
        return []
    placer = restore_entries.EntryPlacer(troot, plan["overwrite"], with_xattrs=plan.get("xattrs", True))
    return placer.place_all(other.to_pylist())


def cleanup(plan: dict) -> bool:
    """Remove the run folder (never raises); True when it is gone."""
    return scratch_io.remove(plan["scratch"])
