"""A backup in three steps that the flow runs as tasks: prepare, store batches, commit.

``prepare`` opens (or creates) the repository, picks the parent snapshot,
scans the source, diffs, and writes the plan (the diffed scan) as Parquet in
the run folder (scratch.py: local by default, shared storage for a cluster),
one diffed slice at a time, so the diffed scan is never whole in memory.
It cuts the files to read into batches bounded in file count and bytes and
writes each batch's work list there; only batch numbers and the small plan
dict travel as task parameters, never file lists (Prefect hashes and records
task inputs). The plan carries the repository's config, so a batch, wherever
it runs, opens the repository without reading keepflow.json again.

``store_range`` reads its batch's work list, stores what is new (see
store.py), writes the batch's index file, saves its per-file results in the
run folder, and hands back a small summary (counts, skipped files, and the
process that ran it).

``commit`` merges the results into the plan, drops files that were skipped,
merges the run's index files, and writes the manifest: the last write, the
commit point. Before the manifest exists nothing is visible; the blobs and
index files already written are reused by the next run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import diff as diffmod
from . import index as indexmod
from . import manifest, memory, progress, snapshots, storage
from . import scratch as scratch_io
from .columns import share_nulls
from .errors import SnapshotNotFoundError, UsageError
from .known_blobs import KnownBlobs, indexed_now
from .repository import COMPRESSIONS, Repository
from .scan import read_xattrs_of, scan_stream
from .store import store_batch

# Files per batch task run. Each task run costs the Prefect server ~75 ms of CPU (SQLite, on the
# same cores): a 1M-file first backup cut at 4,096 files made 245 task runs and 18.8 s of server
# CPU, at 16,384 62 runs and 6.3-8.3 s (wall 54-60 s either way on a noisy 2-core machine).
MAX_BATCH_FILES = 16384
MAX_BATCH_BYTES = 128 * 1024 * 1024
KEEPFLOW_VERSION = "0.1.0"


@dataclass
class BackupPlan:
    run_id: str
    repo_url: str
    source: str                 # normalised: absolute path or URL
    scratch: str                # the run folder's URL (scratch.py): plan, work lists, results
    host: str
    start_time: str
    start_ns: int
    parent: str | None
    parent_key: str | None
    batches: list[tuple[int, int]]
    files: int
    dirs: int
    to_read: int
    bytes_to_read: int
    new: int
    changed: int
    unchanged: int
    deleted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    dry_run: bool = False
    repo_config: dict | None = None     # keepflow.json as read by the plan (None: dry run, no repository yet)
    compression: str | None = None      # format 2: this backup's zstd mode (None: the repository's default)
    # The known-blob set the plan loaded, as a local file of the run folder that the run's other
    # processes map instead of loading their own copy (known_blobs.share); None: each loads the index.
    known_blobs_file: str | None = None
    known_blobs_count: int = 0
    xattrs: bool = False                # the entries' extended attributes were read (SnapshotInfo.xattrs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchSummary:
    batch: int
    files: int
    bytes_read: int
    bytes_stored: int
    blobs_stored: int
    packs_written: int
    objects_written: int
    skipped: list[tuple[str, str]]
    process: str = ""           # "<host>:<pid>" that ran the batch (thread pool: the flow's own)
    bytes_written: int = 0      # what went to the repository (format 2: compressed, encrypted, with pack headers)


def normalise_source(source: str) -> str:
    if "://" in source:
        return source.rstrip("/")
    return os.path.abspath(os.path.expanduser(source))


def check_inputs(source: str, excludes: Sequence[str] = (), source_options: dict[str, Any] | None = None) -> None:
    """Refuse bad input before anything is created (no repository, no lease)."""
    from .errors import SourceNotFoundError
    from .scan import compile_patterns

    compile_patterns(excludes)
    fs, root = storage.open_url(normalise_source(source), source_options)
    try:
        is_dir = fs.isdir(root)
    except OSError as exc:
        raise storage.describe_error(source, exc) from None
    if not is_dir:
        raise SourceNotFoundError(source=source)


def prepare(source: str, repo_url: str, *, excludes: Sequence[str] = (), tags: Sequence[str] = (), rehash: bool = False,
            parent: str | None = None, dry_run: bool = False, storage_options: dict[str, Any] | None = None,
            source_options: dict[str, Any] | None = None, work_dir: str | None = None, checked: bool = False,
            xattrs: bool = True, compression: str | None = None) -> BackupPlan:
    """Plan a backup; ``work_dir`` is where the run folder goes (scratch.work_dir).

    ``checked``: the caller already ran ``check_inputs`` (the flow does, before
    it takes the lease), so the source is not looked at twice.
    """
    if compression is not None and compression not in COMPRESSIONS:
        raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    if not checked:
        check_inputs(source, excludes, source_options)
    source = normalise_source(source)
    start = dt.datetime.now(dt.UTC)
    # A dry run must not create anything: open without creating, and plan
    # against an empty repository when there is none yet.
    if dry_run:
        try:
            repo = Repository.open(repo_url, storage_options, create=False)
        except Exception as exc:  # RepositoryNotFoundError: nothing stored yet
            from .errors import RepositoryNotFoundError
            if not isinstance(exc, RepositoryNotFoundError):
                raise
            repo = None
    else:
        repo = Repository.open(repo_url, storage_options, create=True)
    if compression is not None and repo is not None and repo.version < 2 and compression != "off":
        raise UsageError(f"{repo_url} is a format 1 repository, which stores data uncompressed; "
                         "--compression needs format 2 (`keepflow init --format 2` a new repository)")

    run_id = start.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    host = socket.gethostname()
    parent_info = None
    if repo is not None:
        # A damaged manifest cannot be a parent; the parent only saves reading.
        damaged: list[snapshots.DamagedManifest] = []
        snaps = snapshots.list_snapshots(repo, damaged)
        if parent:
            parent_info = snapshots.resolve(repo, parent, snapshots=snaps, damaged=damaged)
        else:
            parent_info = snapshots.find_parent(snaps, source, host)
    elif parent:
        raise SnapshotNotFoundError(ref=parent, url=repo_url)
    # With a parent, reused hashes are checked against the index (distrust_unindexed).
    # The run's known-blob set is loaded for that now, before the scan, while
    # little else is in memory; this process's batches then reuse it.
    known = (indexmod.known_blobs(repo, run_id)
             if repo is not None and parent_info is not None and not rehash else None)
    try:
        exclude_paths = []
        if repo is not None and repo.is_local and "://" not in source:
            exclude_paths.append(repo.root)
        elif repo is None and "://" not in repo_url:
            exclude_paths.append(os.path.abspath(repo_url))
        # An unchanged entry's extended attributes are its parent's (diff.py,
        # "Extended attributes"): the scan reads none, the diff says which to read.
        inherit = bool(xattrs and not rehash and parent_info is not None and parent_info.xattrs)
        scanned = scan_stream(source, excludes=excludes, exclude_paths=exclude_paths,
                              storage_options=source_options, with_xattrs=xattrs and not inherit)
        xattrs_root = scanned.local_root if xattrs else None
        # The scan, the parent and the diff stream through together, a slice of
        # paths at a time (diff.diff_stream), and the plan and the work lists
        # are written as they come: no whole-tree table exists at any moment.
        scratch = scratch_io.create("backup", run_id, work_dir)
        shared_file = scratch_io.local_file(scratch, "known-blobs.bin") if known is not None else None
        if shared_file is not None and known is not None and not indexmod.share(known, shared_file):
            shared_file = None
        shared_count = len(known) if shared_file is not None and known is not None else 0
        counts = {"new": 0, "changed": 0, "unchanged": 0, "deleted": 0}
        files = dirs = 0
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(memory.gc_paused())       # a few objects per entry, none in cycles
                parent_rows = None
                if repo is not None and parent_info is not None:
                    wanted = diffmod.PARENT_COLUMNS + (["xattrs"] if inherit else [])
                    reader = stack.enter_context(manifest.ManifestRows(repo, parent_info, wanted))
                    parent_rows = (reader.groups() if reader.sorted_by_path() else
                                   [diffmod.sorted_parent(manifest.read_manifest(repo, parent_info, wanted))])
                plan_writer = scratch_io.TableWriter(scratch, "plan")
                work_lists = _WorkLists(scratch)
                stack.callback(work_lists.shutdown)
                offset = 0
                for part in diffmod.diff_stream(scanned.chunks, parent_rows,
                                                parent_info.start_ns if parent_info else 0, rehash=rehash,
                                                inherit_xattrs=inherit):
                    if known is not None and part.unchanged:
                        part = diffmod.distrust_unindexed(part, known)
                    for key in counts:
                        counts[key] += getattr(part, key)
                    table = part.table
                    if part.xattrs_to_read is not None and xattrs_root is not None:
                        table = read_xattrs_of(table, part.xattrs_to_read, xattrs_root, scanned.skipped)
                    types = table["type"]
                    files += pc.sum(pc.equal(types, "file")).as_py() or 0
                    dirs += pc.sum(pc.equal(types, "dir")).as_py() or 0
                    plan_writer.write(table)
                    local = np.flatnonzero(table["needs_read"].to_numpy(zero_copy_only=False))
                    take = pa.array(local)
                    work_lists.add(local + offset, table["size"].to_numpy(zero_copy_only=False)[local],
                                   table["path"].take(take), table["path_bytes"].take(take))
                    offset += table.num_rows
                    del part, table, types
                plan_writer.close()
                batches = work_lists.close()
        except BaseException:
            scratch_io.remove(scratch)      # nobody else knows the folder yet
            raise
    except BaseException:
        if known is not None and repo is not None:      # nobody will ask for this run's set again
            indexmod.forget_run(repo.url, run_id)
        raise
    memory.release()
    return BackupPlan(
        run_id=run_id, repo_url=repo_url, source=source, scratch=scratch, host=host,
        start_time=start.isoformat(timespec="microseconds"), start_ns=scanned.start_ns,
        parent=parent_info.id if parent_info else None,
        parent_key=parent_info.key if parent_info else None,
        batches=batches, files=files, dirs=dirs,
        to_read=work_lists.files, bytes_to_read=work_lists.bytes,
        new=counts["new"], changed=counts["changed"], unchanged=counts["unchanged"], deleted=counts["deleted"],
        skipped=list(scanned.skipped), tags=list(tags), dry_run=dry_run,
        repo_config=repo.config.to_plan() if repo is not None else None, compression=compression,
        known_blobs_file=shared_file, known_blobs_count=shared_count, xattrs=xattrs_root is not None,
    )


def cut_batches(needs: np.ndarray, sizes: np.ndarray,
                max_files: int = MAX_BATCH_FILES, max_bytes: int = MAX_BATCH_BYTES) -> list[tuple[int, int]]:
    """Row ranges of the plan, each with at most ``max_files`` files to read and
    about ``max_bytes`` (a single bigger file gets a batch of its own)."""
    rows = np.flatnonzero(needs)
    return _plan_ranges(rows, scratch_io.cut_ranges(sizes[rows], max_files, max_bytes))


def _plan_ranges(rows: np.ndarray, work_ranges) -> list[tuple[int, int]]:
    """Work-list ranges expressed as plan row ranges."""
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in work_ranges]


class _WorkLists:
    """The batches' work lists, cut and written as the diff gives out files to read.

    Cut as ``scratch.cut_ranges`` cuts the whole list (its ranges are greedy,
    so every range but the last of any prefix is final): the rows to read are
    held only until their batch is complete, never for the whole tree.
    Remote run folders get the files from a few threads, as ``write_parts`` does.
    """

    def __init__(self, scratch: str) -> None:
        self._scratch = scratch
        self._rows: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._paths: list[pa.Array] = []
        self._raw: list[pa.Array] = []
        self.batches: list[tuple[int, int]] = []       # plan row ranges
        self.files = self.bytes = 0
        fs, _ = storage.open_url(scratch)
        self._pool = None if storage.is_local(fs) else ThreadPoolExecutor(max_workers=scratch_io.REMOTE_WRITERS)
        self._writes: list[Any] = []

    def add(self, rows: np.ndarray, sizes: np.ndarray, paths: pa.Array, raw: pa.Array) -> None:
        if not len(rows):
            return
        self._rows.append(rows)
        self._sizes.append(sizes)
        self._paths.append(paths)
        self._raw.append(raw)
        self.files += len(rows)
        self.bytes += int(sizes.sum())
        self._cut(final=False)

    def close(self) -> list[tuple[int, int]]:
        """Write the last batch; every work list is written once this returns."""
        self._cut(final=True)
        for write in self._writes:
            write.result()
        return self.batches

    def shutdown(self) -> None:
        """Stop the writer threads (after ``close``, or on failure before the folder is removed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _cut(self, final: bool) -> None:
        if not self._rows:
            return
        rows, sizes = np.concatenate(self._rows), np.concatenate(self._sizes)
        ranges = scratch_io.cut_ranges(sizes, MAX_BATCH_FILES, MAX_BATCH_BYTES)
        done = ranges if final else ranges[:-1]
        if not done:
            self._rows, self._sizes = [rows], [sizes]
            return
        work = pa.table({"row": pa.array(rows, pa.int64()), "path": pa.chunked_array(self._paths, pa.string()),
                         "path_bytes": pa.chunked_array(self._raw, pa.binary())})
        for start, end in done:
            number = len(self.batches)
            self.batches.append((int(rows[start]), int(rows[end - 1]) + 1))
            piece = work.slice(start, end - start)
            if self._pool is None:
                scratch_io.write_part(self._scratch, "batch", number, piece)
            else:
                self._writes.append(self._pool.submit(scratch_io.write_part, self._scratch, "batch", number, piece))
        rest = done[-1][1]
        left = work.slice(rest)
        self._rows, self._sizes = ([rows[rest:]], [sizes[rest:]]) if len(left) else ([], [])
        self._paths = [left["path"].combine_chunks()] if len(left) else []
        self._raw = [left["path_bytes"].combine_chunks()] if len(left) else []


def store_range(plan: dict, batch_no: int, storage_options: dict[str, Any] | None = None,
                source_options: dict[str, Any] | None = None) -> BatchSummary:
    """Store the files of batch ``batch_no`` of the plan."""
    work = scratch_io.read_part(plan["scratch"], "batch", batch_no)
    paths = work["path"].to_pylist()
    if work["path_bytes"].null_count < work.num_rows:     # names that are not UTF-8: open their bytes
        paths = [manifest.fs_path(p, raw) for p, raw in zip(paths, work["path_bytes"].to_pylist(), strict=True)]
    rows = work["row"].to_pylist()

    dry_run = plan["dry_run"]
    if plan.get("repo_config") is not None:
        # The plan read keepflow.json already: a batch on any machine reuses it.
        repo = Repository.attach(plan["repo_url"], plan["repo_config"], storage_options)
        shared = (plan["known_blobs_file"], plan["known_blobs_count"]) if plan.get("known_blobs_file") else None
        known = indexmod.known_blobs(repo, plan["run_id"], shared)
    elif dry_run:                          # nothing stored yet: plan against an empty repository
        repo = cast("Repository", _DryRunRepo(plan["repo_url"]))     # what a dry run's batch reads of one
        known = indexmod.KnownBlobs()
    else:
        repo = Repository.open(plan["repo_url"], storage_options, create=False)
        known = indexmod.known_blobs(repo, plan["run_id"])
    source_fs, source_root = storage.open_url(plan["source"], source_options)
    if batch_no == 0:
        progress.start("store", plan["to_read"], plan["bytes_to_read"])
    result = store_batch(repo, source_fs, source_root, paths, rows, known, dry_run=dry_run,
                         compression=plan.get("compression"))
    if not dry_run:
        indexmod.write_index(repo, result.index_table(repo.version), f"{plan['run_id']}-b{batch_no:05d}")
    scratch_io.write_part(plan["scratch"], "result", batch_no, result.result_table())
    return BatchSummary(batch_no, len(result.rows), result.bytes_read, result.bytes_stored,
                        result.blobs_stored, result.packs_written, result.objects_written, result.skipped,
                        process=f"{socket.gethostname()}:{os.getpid()}", bytes_written=result.bytes_written)


class _DryRunRepo:
    """Stands in for a repository that does not exist yet during --dry-run."""

    def __init__(self, url) -> None:
        from .repository import RepoConfig

        self.url, self.config, self.is_local = url, RepoConfig(), False
        self.version, self.keys, self.encrypted = 1, None, False

    @staticmethod
    def blob_id(data: bytes) -> str:
        return blake3.blake3(data).hexdigest()

    def path(self, *parts):
        return "/".join(parts)

    pack_key = staticmethod(Repository.pack_key)
    object_key = staticmethod(Repository.object_key)


@dataclass
class CommitResult:
    info: manifest.SnapshotInfo
    skipped: list[tuple[str, str]]


def commit(plan: dict, summaries: list[BatchSummary], storage_options: dict[str, Any] | None = None) -> CommitResult:
    """Merge batch results and write the manifest (unless dry run).

    Memory: the index-wide steps run first, while nothing else is loaded
    (merging the run's index files, format 2's chunk guard, and reading the
    index's ids for the commit guard as 32-byte digests, known_blobs.py).
    Then the plan is read a row group at a time, each group merged with the
    results of the batches that cover it, counted, checked by the commit guard
    and appended to the manifest being written (manifest.ManifestWriter), so
    neither the plan, the results nor the manifest is ever whole in memory.
    """
    scratch = plan["scratch"]
    repo = indexed = None
    what = f"backup of {plan['source']}"
    if not plan["dry_run"]:
        # Every batch has ended: this process's copy of the run's set is not needed again.
        indexmod.forget_run(plan["repo_url"], plan["run_id"])
        repo = Repository.open(plan["repo_url"], storage_options, create=False)
        memory.release()                # what the batches left
        merged = indexmod.merge_run_index(repo, plan["run_id"])
        memory.release()
        # The commit guard's view: the index as a reader sees it now, all files read
        # again (once: format 2's chunk guard checks against the same set).
        indexed = indexed_now(repo)
        if repo.version >= 2:
            indexmod.require_chunks_indexed(repo, [plan["run_id"]], what, indexed, own_lists=merged.lists)
        del merged
        memory.release()

    # The manifest is written a plan row group at a time (manifest.ManifestWriter):
    # each merged group is counted, checked by the commit guard and appended, so
    # the manifest is never a whole table in memory. Nothing reaches the
    # repository before ``close``, after the guard has seen every row.
    writer = manifest.ManifestWriter(repo) if repo is not None else None
    counts = {"new": 0, "changed": 0, "unchanged": 0}
    totals = [0, 0, 0]          # files, dirs, bytes
    columns = [f.name for f in manifest.MANIFEST_SCHEMA]
    try:
        for group in _merged_groups(scratch, plan, summaries):
            _add_group(group, counts, totals)
            if writer is not None:
                out = group.select(columns)
                # A snapshot never references a blob a reader could not find.
                assert repo is not None and indexed is not None      # both opened above when not a dry run
                _require_indexed(repo, out, indexed, what)
                writer.write(out)
            del group
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    files, dirs, total_bytes = totals
    del indexed
    memory.release()
    skipped = list(plan["skipped"]) + [tuple(s) for b in summaries for s in b.skipped]

    end = dt.datetime.now(dt.UTC)
    info = manifest.SnapshotInfo(
        id=uuid.uuid4().hex[:16] if not plan["dry_run"] else "dry-run",
        time=plan["start_time"], end_time=end.isoformat(timespec="microseconds"),
        parent=plan["parent"], source=plan["source"], host=plan["host"], tags=list(plan["tags"]),
        files=files, dirs=dirs, bytes=total_bytes,
        new=counts["new"], changed=counts["changed"], unchanged=counts["unchanged"], deleted=plan["deleted"],
        bytes_read=sum(b.bytes_read for b in summaries), bytes_stored=sum(b.bytes_stored for b in summaries),
        bytes_written=sum(b.bytes_written for b in summaries),
        skipped=len(skipped), start_ns=plan["start_ns"], keepflow_version=KEEPFLOW_VERSION,
        xattrs=bool(plan.get("xattrs")),
    )
    if writer is not None:
        writer.close(info)          # the commit point
    scratch_io.remove(scratch)
    return CommitResult(info, skipped)


def _add_group(group: pa.Table, counts: dict, totals: list[int]) -> None:
    """Add a manifest group's counts (diff.final_counts) and its files, dirs and bytes."""
    for key, value in diffmod.final_counts(group).items():
        counts[key] += value
    is_file = pc.equal(group["type"], "file")
    totals[0] += pc.sum(is_file).as_py() or 0
    totals[1] += pc.sum(pc.equal(group["type"], "dir")).as_py() or 0
    totals[2] += pc.sum(pc.if_else(is_file, group["size"], 0)).as_py() or 0


def _merge_results(scratch: str, plan: dict, summaries: list[BatchSummary]) -> pa.Table:
    """``_merged_groups`` as one table (tests, callers that want it whole)."""
    return pa.concat_tables(list(_merged_groups(scratch, plan, summaries)))


def _merged_groups(scratch: str, plan: dict, summaries: list[BatchSummary]) -> Iterator[pa.Table]:
    """The plan with every batch's results merged in, and files that were to be
    read but have no result (skipped) left out: the manifest's rows, one plan
    row group at a time.

    Batches cover consecutive, non-overlapping plan row ranges (``plan["batches"]``),
    so walking the plan's row groups in order, a batch's results are read when
    the first group it covers comes and dropped after the last.
    """
    pending = sorted((tuple(plan["batches"][s.batch]), s.batch) for s in summaries)
    active: list[tuple[int, pa.Table]] = []      # (end row, results) of the batches in reach
    start = 0
    for group in scratch_io.read_groups(scratch, "plan"):
        end = start + group.num_rows
        while pending and pending[0][0][0] < end:
            (_, batch_end), number = pending.pop(0)
            active.append((batch_end, scratch_io.read_part(scratch, "result", number)))
        needs = group["needs_read"].to_numpy(zero_copy_only=False)
        keep = ~needs
        found = [r.filter(pc.and_(pc.greater_equal(r["row"], start), pc.less(r["row"], end)))
                 for _, r in active]
        found = [r for r in found if r.num_rows]
        if found:
            results = pa.concat_tables(found)
            pos = np.full(group.num_rows, -1, dtype=np.int64)
            pos[results["row"].to_numpy() - start] = np.arange(results.num_rows)
            has = pos >= 0
            keep |= has
            take = pa.array(np.where(has, pos, 0))
            has_arr = pa.array(has)
            for col in ("hash", "size", "mtime_ns", "ctime_ns"):
                i = group.schema.get_field_index(col)
                group = group.set_column(i, group.schema.field(i),
                                         pc.if_else(has_arr, results[col].take(take), group[col]))
        if not keep.all():
            group = group.filter(pa.array(keep))
        yield share_nulls(group)
        active = [(e, r) for e, r in active if e > end]
        start = end


def _require_indexed(repo: Repository, entries: pa.Table, indexed: KnownBlobs, what: str) -> None:
    """The commit guard over ``indexed`` (the index as a reader sees it, as digests):
    vectorised, a slice at a time, so it builds no hash table over a million
    strings. Should any file's hash be missing, ``index.require_indexed`` looks
    at those files against the index read once more and raises the error that
    names them."""
    held = indexed.contains_many(entries["hash"])
    missing = pc.and_(pc.equal(entries["type"], "file"), pc.invert(held))
    if pc.any(missing).as_py():
        indexmod.require_indexed(repo, entries.filter(missing).select(["path", "type", "hash"]), what)


def cleanup(plan: dict) -> bool:
    """Drop the run's state whatever happened: its run folder and this process's
    known-blob cache. True when the run folder is gone (never raises)."""
    indexmod.forget_run(plan["repo_url"], plan["run_id"])
    return scratch_io.remove(plan["scratch"])
