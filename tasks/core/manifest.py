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

import base64
import builtins
import contextlib
import datetime as dt
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3
import pyarrow as pa

from . import parquet_io, spool, storage, xattrs
from .spool import BLOCK_BYTES, SPOOL_BYTES  # noqa: F401  (the writer's spool; re-exported)

if TYPE_CHECKING:
    from .repository import Repository

META_KEY = b"keepflow.snapshot"
# A manifest being written or read is spooled in memory up to this size, then in an
# unlinked local temporary file (ManifestWriter, open_manifest): ~1/3 of a 1M-file manifest.

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
    bytes_stored: int = 0          # plaintext bytes of the new blobs this snapshot's run stored
    bytes_written: int = 0         # bytes its run wrote to the repository (format 2: compressed, encrypted)
    skipped: int = 0
    start_ns: int = 0              # scan start, for the racy-timestamp guard
    keepflow_version: str = ""
    xattrs: bool = False           # its entries' extended attributes were read (absent: not known)
    key: str = ""                  # file name under snapshots/, filled on listing

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("key")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: builtins.bytes | str, key: str = "") -> SnapshotInfo:   # (the field bytes hides the type)
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
    stamp = info.datetime.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{info.id}.parquet"


def with_snapshot_metadata(table: pa.Table, info: SnapshotInfo) -> pa.Table:
    table = table.cast(MANIFEST_SCHEMA)
    return table.replace_schema_metadata({META_KEY: info.to_json().encode()})


def write_manifest(repo: Repository, table: pa.Table, info: SnapshotInfo) -> str:
    """Write the manifest last: once this file exists, the snapshot exists."""
    writer = ManifestWriter(repo)
    writer.write(_by_path(table))
    return writer.close(info)


class ManifestWriter:
    """A manifest written a row group at a time; nothing exists in the repository until ``close``.

    The rows (sorted by path, checked) go through pyarrow's ``ParquetWriter``
    into a spooled temporary file (memory up to ``SPOOL_BYTES``, then an
    unlinked file in the local temporary folder), one row group per
    ``write``, so neither the manifest table nor its Parquet bytes need to be
    whole in memory (1M files: the table, the Parquet bytes, the ciphertext
    and the joined file were four copies, +238 MiB at the write). The
    snapshot facts, known only once every row has been seen, go into the
    footer's key-value metadata at ``close``. Format 2 then makes the file
    of the format (ARCHITECTURE.md, "### Snapshots (manifests)") in two passes over the
    spooled body (the salt covers the whole body before a byte can be
    encrypted), the ciphertext going into a second spooled file while its
    BLAKE3 (the name) is computed, and the result is written create-only in
    chunks (``storage.write_stream_once``): same bytes, same atomicity.
    """

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (closed by close or discard)
        self._writer: Any = None
        self._last: str | None = None

    def write(self, table: pa.Table) -> None:
        """Append rows; ``table`` holds ``MANIFEST_SCHEMA``'s columns, sorted by path and
        after every row written before (ValueError otherwise: a manifest is sorted)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from . import ids

        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
        n = table.num_rows
        if n:
            paths = table["path"]
            if (n > 1 and not pc.all(pc.less_equal(paths.slice(0, n - 1), paths.slice(1))).as_py()) or (
                    self._last is not None and paths[0].as_py() < self._last):
                raise ValueError("manifest rows must come sorted by path")
            self._last = paths[n - 1].as_py()
        if self._repo.version >= 2:
            table = table.set_column(table.schema.get_field_index("hash"), pa.field("hash", ids.BINARY_ID),
                                     ids.hex_to_binary(table["hash"]))
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._spool, table.schema, compression="zstd")
        if n:
            self._writer.write_table(table, row_group_size=n)

    def discard(self) -> None:
        """Drop what was written (nothing reached the repository)."""
        self._spool.close()

    def close(self, info: SnapshotInfo) -> str:
        """Finish the file and write it to the repository (create-only); returns its name."""
        try:
            if self._writer is None:
                self.write(MANIFEST_SCHEMA.empty_table())
            # The facts as the file's key-value metadata and, as pq.write_table puts them, in
            # the stored Arrow schema too (ARROW:schema, pyarrow's own encoding), so a reader
            # of the schema alone (pq.read_schema) finds them as in every older manifest.
            facts = {META_KEY: info.to_json().encode()}
            schema = self._writer.schema.with_metadata(facts)
            self._writer.add_key_value_metadata(
                {**facts, b"ARROW:schema": base64.b64encode(schema.serialize().to_pybytes())})
            self._writer.close()
            body = self._spool
            body_len = body.tell()
            repo = self._repo
            stamp = manifest_name(info)[: -len(".parquet")]
            if repo.version < 2:
                name = manifest_name(info)
                body.seek(0)
                storage.write_stream_once(repo.fs, repo.path("snapshots", name), body)
            elif not repo.encrypted:
                name = f"{stamp}-{_b3_of(body)}.parquet"
                body.seek(0)
                storage.write_stream_once(repo.fs, repo.path("snapshots", name), body)
            else:
                with _encrypted(repo, body, body_len, info.to_json().encode()) as (data, digest):
                    name = f"{stamp}-{digest}"
                    storage.write_stream_once(repo.fs, repo.path("snapshots", name), data)
        finally:
            self._spool.close()
        info.key = name
        return name


@contextlib.contextmanager
def _encrypted(repo: Repository, body: Any, body_len: int, facts: bytes) -> Iterator[tuple[Any, str]]:
    """Format 2's encrypted manifest file made from a spooled Parquet body, in a
    spooled file of its own: ``(file positioned at 0, BLAKE3 hex of its bytes)``."""
    from . import crypto

    keys = repo.keys
    salt_h = keys.salt_hasher(crypto.SNAPSHOT)      # deterministic_salt(magic, len, body, facts), streamed
    salt_h.update(_U64.pack(body_len))
    body.seek(0)
    for block in spool.blocks(body):
        salt_h.update(block)
    salt_h.update(facts)
    salt = salt_h.digest()
    enc = crypto.stream_encryptor(keys, crypto.SNAPSHOT, salt, 0)
    digest = blake3.blake3()
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as out:

        def emit(data: bytes) -> None:
            digest.update(data)
            out.write(data)

        body.seek(0)
        for block in spool.blocks(body):
            emit(enc.update(block))
        emit(enc.finalize())
        emit(enc.tag)
        enc_facts = crypto.encrypt(keys.cipher(crypto.SNAPSHOT, salt), 1, facts, crypto.SNAPSHOT)
        emit(enc_facts + salt + _U32.pack(len(enc_facts)) + crypto.SNAPSHOT)
        out.seek(0)
        yield out, digest.hexdigest()


def _b3_of(f: Any) -> str:
    f.seek(0)
    h = blake3.blake3()
    for block in spool.blocks(f):
        h.update(block)
    return h.hexdigest()


def _by_path(table: pa.Table) -> pa.Table:
    """``table`` sorted by path. A backup's rows come sorted already (the plan is the
    sorted scan): checked vectorised, that skips ``sort_by``'s copy of the whole
    manifest (1M files: +490 MiB peak at the write, bench.memory_phases)."""
    import pyarrow.compute as pc

    paths, n = table["path"], table.num_rows
    if n < 2 or pc.all(pc.less(paths.slice(0, n - 1), paths.slice(1))).as_py():
        return table
    return table.sort_by("path")


# -- format 2 (ARCHITECTURE.md, "### Snapshots (manifests)") ------------------------------
#
#   AEAD(K_f, N(0), parquet, "KFSNAP02") || AEAD(K_f, N(1), facts, "KFSNAP02") || salt (32)
#       || u32 len(EncFacts) || "KFSNAP02"
#
# ``hash`` is stored as fixed_size_binary(32); in memory it stays 64-character hex.

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
LIST_TAIL = 4096          # one read of the file's end gives the facts (a second when longer)


def _tail_fields(tail: bytes) -> tuple[int, bytes]:
    """``(len(EncFacts), salt)`` from the last bytes of a format 2 manifest; ValueError when malformed."""
    from . import crypto

    magic = crypto.SNAPSHOT
    if len(tail) < 12 + crypto.SALT_SIZE or tail[-8:] != magic:
        raise ValueError(f"it does not end with {magic.decode()}")
    (flen,) = _U32.unpack(tail[-12:-8])
    return flen, tail[-12 - crypto.SALT_SIZE: -12]


def _facts_from_tail(repo: Repository, tail: bytes, size: int, name: str, path: str) -> bytes:
    from . import crypto

    magic = crypto.SNAPSHOT
    flen, salt = _tail_fields(tail)
    need = 12 + crypto.SALT_SIZE + flen
    if need > size:
        raise ValueError("its facts length does not fit")
    if need > len(tail):
        tail = repo.fs.cat_file(path, start=size - need, end=size)
    enc = tail[len(tail) - need: len(tail) - 12 - crypto.SALT_SIZE]
    try:
        return crypto.decrypt(repo.keys.cipher(magic, salt), 1, enc, magic)
    except crypto.AuthenticationFailed:
        raise ValueError("its facts do not authenticate (damaged, or not this repository's)") from None


def _open_body(repo: Repository, name: str) -> Any:
    """The Parquet body of format 2 manifest ``name`` in a spooled temporary file (at 0),
    checked (name, tag) before anyone parses it; ValueError when damaged.

    Streaming: the file is copied in blocks while its BLAKE3 is computed, then
    the body decrypted block by block (crypto.stream_decryptor) into a second
    spooled file, and given out only once the tag has verified. Memory holds a
    block at a time, never the ciphertext and the plaintext of the whole file
    (1M files: two copies of ~50 MiB each, for the parent's read in every backup).
    """
    from . import crypto

    raw, digest = spool.hashed_copy(repo.fs, repo.path("snapshots", name))
    try:
        size = raw.tell()
        if digest != name.split(".", 1)[0].rsplit("-", 1)[-1]:
            raise ValueError("its name is not the BLAKE3 of its bytes (damaged)")
        raw.seek(0)
        if not repo.encrypted:
            return raw
        magic = crypto.SNAPSHOT
        raw.seek(max(0, size - 12 - crypto.SALT_SIZE))
        flen, salt = _tail_fields(raw.read())
        body_end = size - 12 - crypto.SALT_SIZE - flen
        if body_end < crypto.TAG_SIZE:
            raise ValueError("its facts length does not fit")
        raw.seek(body_end - crypto.TAG_SIZE)
        tag = raw.read(crypto.TAG_SIZE)
        try:
            out = spool.decrypted(repo.keys, magic, salt, raw, body_end - crypto.TAG_SIZE, tag)
        except crypto.AuthenticationFailed:
            raise ValueError("it does not authenticate (damaged, or not this repository's)") from None
        raw.close()
        return out
    except BaseException:
        raw.close()
        raise


def _read_table_v2(repo: Repository, name: str, columns: Sequence[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    from . import ids

    with _open_body(repo, name) as body:
        pf = pq.ParquetFile(body)
        cols = columns
        if cols is not None:
            present = set(pf.schema_arrow.names)
            cols = [c for c in cols if c in present or c not in OPTIONAL_COLUMNS]
        table = pf.read(columns=cols)
    if "hash" in table.column_names:
        table = table.set_column(table.schema.get_field_index("hash"), pa.field("hash", pa.string()),
                                 ids.binary_to_hex(table["hash"]))
    return table


def read_manifest(repo: Repository, info: SnapshotInfo, columns: Sequence[str] | None = None) -> pa.Table:
    """The manifest's rows (``columns`` only); optional columns an older manifest lacks come back null."""
    if repo.version >= 2:
        table = _read_table_v2(repo, info.key, columns)
    else:
        table = parquet_io.read_table(repo.fs, repo.path("snapshots", info.key), columns=columns,
                                      optional=OPTIONAL_COLUMNS)
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names and (columns is None or name in columns):
            field = MANIFEST_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(list(columns)) if columns is not None else table


class ManifestRows:
    """A manifest's rows a row group at a time (``columns`` only), for readers that
    walk it in path order (the backup's diff against its parent) instead of
    holding it whole: ``with ManifestRows(repo, info, cols) as rows: for t in rows.groups(): ...``.

    A format 2 body is checked (name, tag) before the first row is parsed, as
    ``read_manifest`` does; optional columns an older manifest lacks come back
    null, and ``hash`` as hex text, as there.
    """

    def __init__(self, repo: Repository, info: SnapshotInfo, columns: Sequence[str]) -> None:
        self._repo, self._info, self._columns = repo, info, list(columns)
        self._stack = contextlib.ExitStack()
        self._file: Any = None

    def __enter__(self) -> ManifestRows:
        import pyarrow.parquet as pq

        if self._file is not None:          # opened already (restore opens it to fall over, then walks it)
            return self
        repo = self._repo
        try:
            if repo.version >= 2:
                body = self._stack.enter_context(_open_body(repo, self._info.key))
            elif storage.is_local(repo.fs):
                body = repo.path("snapshots", self._info.key)
            else:
                body = self._stack.enter_context(repo.fs.open(repo.path("snapshots", self._info.key), "rb"))
            self._file = pq.ParquetFile(body)
        except BaseException:
            self._stack.close()
            raise
        present = set(self._file.schema_arrow.names)
        self._read = [c for c in self._columns if c in present or c not in OPTIONAL_COLUMNS]
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None
        self._stack.close()

    def groups(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Each row group as a table of ``columns`` (default: the reader's), in file order."""
        from . import ids

        wanted = self._columns if columns is None else list(columns)
        read = [c for c in self._read if c in wanted]
        for i in range(self._file.num_row_groups):
            table = self._file.read_row_group(i, columns=read)
            if "hash" in table.column_names and self._repo.version >= 2:
                table = table.set_column(table.schema.get_field_index("hash"), pa.field("hash", pa.string()),
                                         ids.binary_to_hex(table["hash"]))
            for name in OPTIONAL_COLUMNS:
                if name in wanted and name not in table.column_names:
                    field = MANIFEST_SCHEMA.field(name)
                    table = table.append_column(field, pa.nulls(table.num_rows, field.type))
            yield table.select(wanted)

    def sorted_by_path(self) -> bool:
        """True when every path is greater than the one before, across row groups
        (read from the path column alone; a manifest keepflow wrote always is)."""
        import pyarrow.compute as pc

        last: str | None = None
        for table in self.groups(["path"]):
            paths, n = table["path"], table.num_rows
            if not n:
                continue
            if n > 1 and not pc.all(pc.less(paths.slice(0, n - 1), paths.slice(1))).as_py():
                return False
            first = paths[0].as_py()
            if last is not None and not last < first:
                return False
            last = paths[n - 1].as_py()
        return True


def read_info(repo: Repository, name: str) -> SnapshotInfo:
    """The snapshot facts of manifest ``name``, without reading its rows."""
    path = repo.path("snapshots", name)
    if repo.version < 2 or not repo.encrypted:
        meta = parquet_io.read_key_value_metadata(repo.fs, path)
        info = SnapshotInfo.from_json(meta[META_KEY], key=name)
    else:
        size = int(repo.fs.size(path))
        tail = repo.fs.cat_file(path, start=max(0, size - LIST_TAIL), end=size)
        info = SnapshotInfo.from_json(_facts_from_tail(repo, tail, size, name, path), key=name)
    if repo.version >= 2:
        stamp = manifest_name(info)[: -len(".parquet")]
        if not name.startswith(stamp + "-"):
            raise ValueError(f"its name does not match its facts (snapshot {info.id[:8]} of {info.time})")
    return info
