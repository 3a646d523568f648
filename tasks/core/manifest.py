"""Snapshot manifests: one Parquet file per snapshot, the commit point.

A manifest lists every entry of the snapshot (files, directories, symlinks)
with its metadata and, for files, the BLAKE3 hash of its content. Every
snapshot is complete on its own: there is no chain to replay on restore.

The facts about the snapshot (id, parent, source, host, tags, times, counts)
live in the Parquet key-value metadata under ``keepflow.snapshot`` as JSON,
so listing snapshots reads only file footers, never rows. Manifests are
named ``<UTC-timestamp>-<id>.parquet`` so a plain listing is in time order,
and are written once with the write-once helper: they are never replaced.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from . import parquet_io, xattrs

META_KEY = b"keepflow.snapshot"

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),        # relative POSIX path, no leading slash
        ("type", pa.string()),        # file | dir | symlink | fifo | chardev | blockdev
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),     # null where the source has none
        ("inode", pa.int64()),        # null where the source has none
        ("mode", pa.int32()),         # st_mode permission and type bits
        ("uid", pa.int64()),          # int64: ids above 2^31 exist (user namespaces, NFS, AD)
        ("gid", pa.int64()),
        ("hash", pa.string()),        # BLAKE3-256 hex of the content, files only
        ("link_target", pa.string()),  # symlinks only; readable form when not UTF-8 (see below)
        # Optional columns: null unless needed; manifests written before them lack
        # them, and read_manifest fills them with nulls.
        ("mtime_ns_exact", pa.decimal128(38, 0)),  # the true mtime when mtime_ns had to be clamped
        ("link_target_bytes", pa.binary()),        # the raw target when it is not valid UTF-8
        ("rdev", pa.int64()),                      # device number of chardev/blockdev entries
        ("hardlink_to", pa.string()),              # a file's first name (by path) when it has several
        ("xattrs", xattrs.TYPE),                   # extended attributes and ACLs (see xattrs.py)
        ("path_bytes", pa.binary()),               # the raw path when it is not valid UTF-8
    ]
)
OPTIONAL_COLUMNS = ("mtime_ns_exact", "link_target_bytes", "rdev", "hardlink_to", "xattrs", "path_bytes")
# Entries with no content that restore recreates from their metadata alone.
SPECIAL_TYPES = ("fifo", "chardev", "blockdev")
# mtime_ns is int64 nanoseconds: 1677-09-21 to 2262-04-11. Outside that range
# it holds the nearest bound (so diffing and older readers keep working) and
# mtime_ns_exact the exact value, which restore applies.
NS_MIN, NS_MAX = -(2**63), 2**63 - 1


def clamp_ns(ns: int) -> int:
    return NS_MIN if ns < NS_MIN else NS_MAX if ns > NS_MAX else ns


def readable_bytes(raw: bytes) -> str:
    """A name or link target that is not UTF-8, shown with its bad bytes as \\xNN escapes."""
    return raw.decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """False for an OS string that holds undecodable bytes (surrogate escapes)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown(name: str) -> str:
    """``name`` as a user sees it: an OS string holding undecodable bytes
    becomes its ``readable_bytes`` form."""
    return name if is_utf8(name) else readable_bytes(os.fsencode(name))


def fs_path(path: str, raw: bytes | None) -> str:
    """The OS path of a manifest entry: ``path``, or the raw bytes when the name is not UTF-8.

    ``os.fsdecode`` gives a string with surrogate escapes that every ``os``
    call turns back into exactly those bytes, so callers keep using ``str``.
    """
    return path if raw is None else os.fsdecode(raw)


@dataclass
class SnapshotInfo:
    id: str
    time: str                      # start, ISO 8601 UTC
    end_time: str = ""
    parent: str | None = None
    source: str = ""
    host: str = ""
    tags: list[str] = field(default_factory=list)
    files: int = 0
    dirs: int = 0
    bytes: int = 0                 # logical size of all files
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    skipped: int = 0
    start_ns: int = 0              # scan start, for the racy-timestamp guard
    keepflow_version: str = ""
    key: str = ""                  # file name under snapshots/, filled on listing

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("key")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str = "") -> "SnapshotInfo":
        data = json.loads(raw)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known, key=key) if "key" not in known else cls(**known)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def datetime(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.time)


def manifest_name(info: SnapshotInfo) -> str:
    stamp = info.datetime.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{info.id}.parquet"


def with_snapshot_metadata(table: pa.Table, info: SnapshotInfo) -> pa.Table:
    table = table.cast(MANIFEST_SCHEMA)
    return table.replace_schema_metadata({META_KEY: info.to_json().encode()})


def write_manifest(repo, table: pa.Table, info: SnapshotInfo) -> str:
    """Write the manifest last: once this file exists, the snapshot exists."""
    name = manifest_name(info)
    table = with_snapshot_metadata(table.sort_by("path"), info)
    parquet_io.write_table_once(repo.fs, repo.path("snapshots", name), table)
    info.key = name
    return name


def read_manifest(repo, info: SnapshotInfo, columns=None) -> pa.Table:
    """The manifest's rows (``columns`` only); optional columns an older manifest lacks come back null."""
    table = parquet_io.read_table(repo.fs, repo.path("snapshots", info.key), columns=columns,
                                  optional=OPTIONAL_COLUMNS)
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names and (columns is None or name in columns):
            field = MANIFEST_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(list(columns)) if columns is not None else table


def read_info(repo, name: str) -> SnapshotInfo:
    meta = parquet_io.read_key_value_metadata(repo.fs, repo.path("snapshots", name))
    return SnapshotInfo.from_json(meta[META_KEY], key=name)
