"""The blob index: where each blob lives (hash -> key, offset, length).

Readers never guess locations; they look blobs up here, so a blob stored
whole in ``objects/`` is simply ``offset 0, length size``.

Each batch of a backup writes its own index file as soon as its packs are
stored (``index/<run>-b<batch>.parquet``), so a run that dies half-way leaves
its stored blobs findable and the next run does not store them again. When
the run commits, its batch files are merged into one ``index/<run>.parquet``
written before the batch files are removed; a reader that lists the folder in
between sees the same entries twice, which is harmless (duplicates are
dropped on load, the first location wins).

Existence checks use the index, never a HEAD request per blob (dvc's
``oids_exist`` trade-off, decided once: the index is always small next to the
data it describes, about 120 bytes per blob).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import crypto, ids, parquet_io, storage
from .errors import BlobFormatError, UnindexedBlobsError
from .known_blobs import (  # noqa: F401  (re-exported)
    CACHED_RUNS,
    KnownBlobs,
    cached_runs,
    forget_run,
    known_blobs,
    share,
)
from .store import INDEX2_SCHEMA, INDEX_SCHEMA

if TYPE_CHECKING:
    from .repository import Repository

# Format 2's stored index table (ARCHITECTURE.md, "### Index files").
STORED2_SCHEMA = pa.schema([("id", ids.BINARY_ID), ("type", pa.int8()), ("pack", ids.BINARY_ID),
                            ("salt", pa.binary(32)), ("seq", pa.int32()), ("offset", pa.int64()),
                            ("length", pa.int64()), ("raw_length", pa.int64()), ("compressed", pa.bool_())])

# How many of the affected files an UnindexedBlobsError names.
NAMED_FILES = 10


def list_index_names(repo: Repository) -> list[str]:
    files = storage.list_files(repo.fs, repo.path("index"))
    names = (f["name"].rsplit("/", 1)[-1] for f in files)
    return sorted(n for n in names if repo.index_label(n) is not None)


def schema(repo: Repository) -> pa.Schema:
    """The in-memory index schema of the repository's format."""
    return INDEX2_SCHEMA if repo.version >= 2 else INDEX_SCHEMA


def to_stored(table: pa.Table) -> pa.Table:
    """Format 2: in-memory rows (hex ids, pack keys) to the stored table (binary ids, pack names)."""
    return pa.table({"id": ids.hex_to_binary(table["hash"]), "type": table["type"],
                     "pack": ids.pack_names_from_keys(table["key"]), "salt": table["salt"], "seq": table["seq"],
                     "offset": table["offset"], "length": table["length"], "raw_length": table["raw_length"],
                     "compressed": table["compressed"]}, schema=STORED2_SCHEMA)


def from_stored(table: pa.Table) -> pa.Table:
    table = table.cast(STORED2_SCHEMA)
    return pa.table({"hash": ids.binary_to_hex(table["id"]), "key": ids.pack_keys_from_binary(table["pack"]),
                     "offset": table["offset"], "length": table["length"], "type": table["type"],
                     "seq": table["seq"], "salt": table["salt"], "raw_length": table["raw_length"],
                     "compressed": table["compressed"]}, schema=INDEX2_SCHEMA)


def encode_index_file(repo: Repository, table: pa.Table) -> bytes:
    """The stored bytes of an index file holding ``table`` (in-memory rows)."""
    if repo.version < 2:
        return parquet_io.table_to_bytes(table.cast(INDEX_SCHEMA))
    return _encode_stored(repo, to_stored(table))


def _encode_stored(repo: Repository, stored: pa.Table) -> bytes:
    """Format 2: the file bytes of a stored-form index table."""
    data = parquet_io.table_to_bytes(stored)
    return crypto.seal(repo.keys, crypto.INDEX, data) if repo.encrypted else data


def _read_stored(repo: Repository, names: list[str]) -> pa.Table:
    """Format 2: the index files ``names`` in their stored form (binary ids and pack
    names, not hex and keys), concatenated: for steps that only copy or filter rows."""
    def one(name):
        data = _stored_parquet(repo, repo.fs.cat_file(repo.path("index", name)), name)
        try:
            return pq.read_table(pa.BufferReader(data)).cast(STORED2_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError) as exc:
            raise BlobFormatError(key=f"index/{name}", reason=f"not an index table ({exc})") from None

    if repo.is_local or len(names) < 3:
        tables = [one(n) for n in names]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            tables = list(pool.map(one, names))
    return pa.concat_tables(tables) if tables else STORED2_SCHEMA.empty_table()


def iter_stored(repo: Repository, name: str) -> Iterator[pa.Table]:
    """Format 2: index file ``name`` in stored form, a row group at a time (its bytes
    checked first and spooled, ``_open_checked``): for readers that hold the
    index compactly and must not hold a merged 1M-row file's table whole."""
    with _open_checked(repo, name) as body:
        try:
            pf = pq.ParquetFile(body)
            for i in range(pf.num_row_groups):
                yield pf.read_row_group(i).cast(STORED2_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError) as exc:
            raise BlobFormatError(key=f"index/{name}", reason=f"not an index table ({exc})") from None


def decode_index_file(repo: Repository, data: bytes, name: str) -> pa.Table:
    """In-memory rows from an index file's bytes; BlobFormatError when it is damaged."""
    if repo.version < 2:
        return pq.read_table(pa.BufferReader(data)).cast(INDEX_SCHEMA)
    data = _stored_parquet(repo, data, name)
    try:
        return from_stored(pq.read_table(pa.BufferReader(data)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError) as exc:
        raise BlobFormatError(key=f"index/{name}", reason=f"not an index table ({exc})") from None


def _stored_parquet(repo: Repository, data: bytes, name: str) -> bytes:
    """Format 2: the Parquet bytes of an index file, its name and (encrypted) its seal checked."""
    import blake3

    if blake3.blake3(data).hexdigest() != name.rsplit("-", 1)[-1].split(".", 1)[0]:
        raise BlobFormatError(key=f"index/{name}", reason="its name is not the BLAKE3 of its bytes")
    if repo.encrypted:
        try:
            data = crypto.unseal(repo.keys, crypto.INDEX, data)
        except crypto.AuthenticationFailed:
            raise BlobFormatError(key=f"index/{name}", reason="it does not authenticate") from None
    return data


def _read_ids(repo: Repository, name: str) -> list[pa.Array]:
    """Format 2: one index file's blob ids as stored, ``fixed_size_binary(32)`` (one
    array per row group), nothing else decoded (no hex, no pack keys): what the
    known-blob set and the commit guard need.

    Streamed (``_open_checked``): a run's merged file of 1M blobs is ~45 MB, and
    holding its bytes and its plaintext beside the ids cost ~+130 MiB at the
    commit guard's read and at every backup's known-blob load."""
    with _open_checked(repo, name) as body:
        try:
            column = pq.ParquetFile(body).read(columns=["id"])["id"]
            return [chunk.cast(ids.BINARY_ID) for chunk in column.chunks]
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError) as exc:
            raise BlobFormatError(key=f"index/{name}", reason=f"not an index table ({exc})") from None


def _open_checked(repo: Repository, name: str):
    """Format 2: the Parquet body of index file ``name`` in a spooled temporary file (at 0),
    name and seal checked before anyone parses it (``_stored_parquet``, streamed):
    copied in blocks while its BLAKE3 is computed, then decrypted block by block
    into a second spooled file, given out only once the tag has verified."""
    from . import spool

    key = f"index/{name}"
    raw, digest = spool.hashed_copy(repo.fs, repo.path("index", name))
    try:
        size = raw.tell()
        if digest != name.rsplit("-", 1)[-1].split(".", 1)[0]:
            raise BlobFormatError(key=key, reason="its name is not the BLAKE3 of its bytes")
        raw.seek(0)
        if not repo.encrypted:
            return raw
        magic = crypto.INDEX
        trailer = crypto.SALT_SIZE + len(magic)
        if size < crypto.TAG_SIZE + trailer:
            raise BlobFormatError(key=key, reason="it does not authenticate")
        raw.seek(size - trailer)
        salt, found = raw.read(crypto.SALT_SIZE), raw.read()
        raw.seek(size - trailer - crypto.TAG_SIZE)
        tag = raw.read(crypto.TAG_SIZE)
        if found != magic:
            raise BlobFormatError(key=key, reason="it does not authenticate")
        try:
            out = spool.decrypted(repo.keys, magic, salt, raw, size - trailer - crypto.TAG_SIZE, tag)
        except crypto.AuthenticationFailed:
            raise BlobFormatError(key=key, reason="it does not authenticate") from None
        raw.close()
        return out
    except BaseException:
        raw.close()
        raise


def read_index_files(repo: Repository, names: list[str]) -> pa.Table:
    """The rows of the index files ``names`` (in memory form), concatenated."""
    if repo.version < 2:
        return parquet_io.read_tables(repo.fs, [repo.path("index", n) for n in names], INDEX_SCHEMA)
    if not names:
        return INDEX2_SCHEMA.empty_table()

    def one(name):
        return decode_index_file(repo, repo.fs.cat_file(repo.path("index", name)), name)

    if repo.is_local or len(names) < 3:
        tables = [one(n) for n in names]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            tables = list(pool.map(one, names))
    return pa.concat_tables(tables)


def load_index(repo: Repository, columns: Sequence[str] | None = None, unique: bool = True) -> pa.Table:
    """All index entries, one row per hash (every location with ``unique=False``)."""
    for attempt in range(3):
        names = list_index_names(repo)
        try:
            table = read_index_files(repo, names)
            break
        except FileNotFoundError:
            # A run merged its batch files between our listing and reading.
            if attempt == 2:
                raise
    if table.num_rows == 0 or not unique:
        return table.select(columns) if columns else table
    table = unique_hashes(table)
    return table.select(columns) if columns else table


def load_ids(repo: Repository) -> pa.ChunkedArray:
    """Every blob id in the index as a reader sees it now (every index file read again,
    repeats kept), in its cheapest form: format 2's 32-byte binary ids straight from the
    stored ``id`` column, format 1's hex ``hash`` strings.

    For the known-blob set (``known_blobs.indexed_now``): loading the whole index table
    for it decoded every id to hex and built every pack key, only for ``KnownBlobs`` to
    decode the hex back to bytes (1M blobs: ~4.6 s of a no-change backup's CPU and a
    few hundred MiB of transient tables).
    """
    if repo.version < 2:
        return load_index(repo, columns=["hash"], unique=False)["hash"]
    for attempt in range(3):
        names = list_index_names(repo)
        try:
            if repo.is_local or len(names) < 3:
                parts = [_read_ids(repo, n) for n in names]
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=8) as pool:
                    parts = list(pool.map(lambda n: _read_ids(repo, n), names))
            return pa.chunked_array([chunk for part in parts for chunk in part], ids.BINARY_ID)
        except FileNotFoundError:
            # A run merged its batch files between our listing and reading.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def unique_hashes(table: pa.Table) -> pa.Table:
    hashes = table["hash"]
    if pc.count_distinct(hashes).as_py() == table.num_rows:
        return table
    # Keep the first row of each hash, in table order. ``first`` holds row
    # *positions*: take those rows (sorted), never ``sort_indices(first)``,
    # which are positions within ``first`` and would keep the first k rows of
    # the table, duplicates included, and drop the last unique hashes.
    indices = pa.table({"hash": hashes, "i": pa.array(range(table.num_rows), pa.int64())})
    first = indices.group_by("hash", use_threads=False).aggregate([("i", "min")])["i_min"]
    return table.take(pc.take(first, pc.sort_indices(first)))


def not_indexed(hashes: pa.Array | pa.ChunkedArray, indexed: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The distinct non-null ``hashes`` that ``indexed`` does not contain."""
    wanted = pc.drop_null(pc.unique(hashes))
    return wanted.filter(pc.invert(pc.is_in(wanted, value_set=indexed)))


def require_indexed(repo: Repository, entries: pa.Table, what: str) -> None:
    """The commit guard: every file hash in ``entries`` (path, type, hash) is in the index.

    Reads the index as it is now (every index file, the run's merged file
    included), so it checks what a reader will see after the commit, not what
    the writer believes it stored. Raises UnindexedBlobsError naming the files.
    """
    files = entries.filter(pc.equal(entries["type"], "file"))
    if files.num_rows == 0:
        return
    indexed = load_index(repo, columns=["hash"], unique=False)["hash"]
    absent = not_indexed(files["hash"], indexed)
    if len(absent) == 0:
        return
    hit = files.filter(pc.is_in(files["hash"], value_set=absent))
    paths = hit["path"].to_pylist()
    more = f" and {len(paths) - NAMED_FILES} more" if len(paths) > NAMED_FILES else ""
    named = ", ".join(paths[:NAMED_FILES]) + more
    raise UnindexedBlobsError(what=what, count=len(absent), files=len(paths), paths=named, url=repo.url)


def require_chunks_indexed(repo: Repository, labels: list[str], what: str, indexed: KnownBlobs | None = None,
                           own_lists: pa.Table | None = None) -> None:
    """Format 2's half of the commit guard: every chunk of every list blob in the index files
    labelled ``labels`` (the run's own) is indexed (in ``indexed``, the index as a reader
    sees it, ``known_blobs.indexed_now``; read here when not given).

    A list written by this run may name a chunk another batch claimed (known_blobs.py);
    should that batch have failed and its retry not stored the chunk, this stops the commit.
    ``own_lists``: those files' list rows in stored form, when the caller has them
    (``merge_run_index`` gives them), so the files are not read again.
    """
    from .chunk_lists import read_lists

    if own_lists is None:
        names = [n for n in list_index_names(repo) if repo.index_label(n) in labels]
        if not names:
            return
        # Only the list rows are decoded (stored form first: a 1M-file run's merged
        # file is 1M data rows, which this never turns into hex and keys).
        own = _read_stored(repo, names)
        own_lists = own.filter(pc.equal(own["type"], 1))
        del own
    lists = from_stored(own_lists)
    if lists.num_rows == 0:
        return
    lists = unique_hashes(lists)
    if indexed is None:
        indexed = KnownBlobs(load_ids(repo))
    unreadable, chunk_ids = 0, cast("list[str]", [])
    for chunks in read_lists(repo, lists):
        if chunks is None:
            unreadable += 1
        else:
            chunk_ids.extend(c for c, _ in chunks)
    wanted = pc.drop_null(pc.unique(pa.array(chunk_ids, pa.string())))
    absent = wanted.filter(pc.invert(indexed.contains_many(wanted).combine_chunks()))
    if unreadable or len(absent):
        raise UnindexedBlobsError(
            f"{what}: {len(absent)} chunks of this run's files are not in the index"
            + (f" and {unreadable} chunk lists cannot be read" if unreadable else "")
            + f"; no snapshot was written to {repo.url}; run the backup again (it stores them)")


def write_index(repo: Repository, table: pa.Table, name: str) -> str | None:
    """Write ``table`` as the index file labelled ``name``; returns its path (None when empty)."""
    if table.num_rows == 0:
        return None
    data = encode_index_file(repo, table)
    path = repo.path(repo.index_key(name, data))
    storage.write_once(repo.fs, path, data)
    return path


@dataclass
class MergedRunIndex:
    entries: int                        # rows merged
    lists: pa.Table | None = None       # format 2: the merged rows' chunk-list rows (stored form), for the chunk guard


def merge_run_index(repo: Repository, run_id: str) -> MergedRunIndex:
    """Merge the run's batch files (label ``<run>-b<NNNNN>``) into one labelled ``<run>``.

    Format 2 streams: each batch file is read, its rows go through pyarrow's
    ``ParquetWriter`` into a spooled file (``MERGE_ROWS`` to a row group), and
    that is sealed in a second pass (the deterministic salt covers the whole
    plaintext first) into the file written create-only: the rows of a run are
    never whole in memory (1M files: +290 MiB at the merge when they were).
    Same format as any index file (a sealed Parquet table), other row groups.
    """
    prefix = f"{run_id}-b"
    parts = [n for n in list_index_names(repo) if (repo.index_label(n) or "").startswith(prefix)]
    if not parts:       # (a retried commit: an earlier attempt merged them; the guard reads that file)
        return MergedRunIndex(0)
    lists = None
    if repo.version < 2:
        table = read_index_files(repo, parts)
        write_index(repo, table, run_id)
        entries = table.num_rows
        del table
    else:
        entries, lists = _merge_stored(repo, parts, run_id)
    for n in parts:
        try:
            repo.fs.rm_file(repo.path("index", n))
        except FileNotFoundError:
            pass
    return MergedRunIndex(entries, lists)


MERGE_ROWS = 65536


def _merge_stored(repo: Repository, names: list[str], label: str) -> tuple[int, pa.Table]:
    """Format 2: ``names`` copied in stored form (decoding 1M rows to hex ids and pack
    keys only to encode them back cost +420 MiB once) into one index file labelled
    ``label``; returns its rows and its chunk-list rows."""
    import tempfile

    import blake3

    from .spool import SPOOL_BYTES, blocks

    entries = 0
    lists: list[pa.Table] = []
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as body, \
            tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as sealed:
        writer = pq.ParquetWriter(body, STORED2_SCHEMA, compression="zstd")
        pending: list[pa.Table] = []
        held = 0
        for table in _stored_tables(repo, names):
            entries += table.num_rows
            lists.append(table.filter(pc.equal(table["type"], 1)))
            pending.append(table)
            held += table.num_rows
            if held >= MERGE_ROWS:
                writer.write_table(pa.concat_tables(pending), row_group_size=held)
                pending, held = [], 0
        if pending or not entries:
            writer.write_table(pa.concat_tables(pending) if pending else STORED2_SCHEMA.empty_table(),
                               row_group_size=max(1, held))
        writer.close()
        del pending
        digest = blake3.blake3()
        if repo.encrypted:
            # crypto.seal, streamed: AEAD(K_f, N(0), parquet, magic) || salt || magic.
            salt_h = repo.keys.salt_hasher(crypto.INDEX)
            body.seek(0)
            for block in blocks(body):
                salt_h.update(block)
            salt = salt_h.digest()
            enc = crypto.stream_encryptor(repo.keys, crypto.INDEX, salt, 0)
            body.seek(0)
            for block in blocks(body):
                out = enc.update(block)
                digest.update(out)
                sealed.write(out)
            tail = enc.finalize() + enc.tag + salt + crypto.INDEX
            digest.update(tail)
            sealed.write(tail)
            data = sealed
        else:
            body.seek(0)
            for block in blocks(body):
                digest.update(block)
            data = body
        data.seek(0)
        storage.write_stream_once(repo.fs, repo.path(repo.index_key(label, digest=digest.hexdigest())), data)
    return entries, pa.concat_tables(lists) if lists else STORED2_SCHEMA.empty_table()


def _stored_tables(repo: Repository, names: list[str]):
    """``_read_stored`` one file at a time, in order (remote: a few read ahead)."""
    if repo.is_local or len(names) < 3:
        for name in names:
            yield _read_stored(repo, [name])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(names), 8):
            yield from pool.map(lambda n: _read_stored(repo, [n]), names[start:start + 8])
