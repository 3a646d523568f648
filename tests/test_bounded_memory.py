"""Bounded memory gives the same answers: the streamed scan, the diff in slices,
the compact known-blob set (issue 10, part 5).

Each test runs the memory-bounded code with its bounds made tiny, so trees of
a few hundred entries cross every flush, slice and fold boundary, and
compares the result with the plain version (one chunk, one join, a Python set).
"""

from __future__ import annotations

import os
import random
import stat
import threading

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keepflow.tasks.core import diff as diffmod
from keepflow.tasks.core import known_blobs as kb
from keepflow.tasks.core import scan as scanmod
from keepflow.tasks.core.columns import nulls, share_nulls
from keepflow.tasks.core.known_blobs import KnownBlobs

from tests.conftest import age_tree, make_tree

# -- scan -------------------------------------------------------------------------

def _odd_tree(root):
    """More entries than the tiny FLUSH_ROWS below, in one big folder with its own
    ignore file, plus every kind of entry that fills an optional column."""
    spec = {f"big/f{i:04d}": f"content {i}" for i in range(700)}
    spec.update({f"d{j}/s{k}/g{k}": "x" * k for j in range(9) for k in range(5)})
    spec["big/.keepflowignore"] = "f000*\n"          # applies to the folder's first slice and the rest
    spec["link"] = ("link", "big/f0100")
    spec["empty"] = None
    tree = make_tree(root, spec)
    os.link(tree / "big" / "f0200", tree / "d0" / "hard")
    os.mkfifo(tree / "d1" / "fifo")
    (tree / os.fsdecode(b"d2/caf\xe9")).write_text("latin-1 name")
    os.setxattr(tree / "d3" / "s1" / "g1", "user.note", b"kept")
    return tree


@pytest.mark.parametrize("flush_rows", [7, 64])
def test_scan_larger_than_flush_rows_is_the_same_sorted_table(tmp_path, monkeypatch, flush_rows):
    src = _odd_tree(tmp_path / "src")
    monkeypatch.setattr(scanmod, "FLUSH_ROWS", 10**9)      # one chunk, one listing per folder: the plain scan
    plain = scanmod.scan(str(src))
    monkeypatch.setattr(scanmod, "FLUSH_ROWS", flush_rows)
    streamed = scanmod.scan(str(src))

    assert streamed.table.num_rows > 10 * flush_rows
    assert streamed.table.column_names == scanmod.SCAN_COLUMNS
    assert streamed.table.schema.equals(plain.table.schema)
    assert streamed.table.equals(plain.table)
    assert streamed.skipped == plain.skipped
    paths = streamed.table["path"].to_pylist()
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    # The columns hold what lstat says (not just what the plain scan says).
    rows = {r["path"]: r for r in streamed.table.to_pylist()}
    assert not any(p.startswith("big/f000") for p in rows)                    # the big folder's ignore file
    assert rows["big/f0123"]["size"] == os.lstat(src / "big" / "f0123").st_size
    assert rows["big/f0123"]["inode"] == os.lstat(src / "big" / "f0123").st_ino
    assert rows["link"]["type"] == "symlink" and rows["link"]["link_target"] == "big/f0100"
    assert rows["d0/hard"]["hardlink_to"] == "big/f0200" and rows["big/f0200"]["hardlink_to"] is None
    assert rows["d1/fifo"]["type"] == "fifo"
    assert rows["d2/caf\\xe9"]["path_bytes"] == b"d2/caf\xe9"
    assert rows["d3/s1/g1"]["xattrs"] == [{"name": "user.note", "value": b"kept"}]
    assert stat.S_ISDIR(rows["empty"]["mode"])


def test_a_shown_name_that_clashes_is_reported_in_a_streamed_scan(tmp_path, monkeypatch):
    spec = {f"f{i:03d}": "x" for i in range(50)}
    spec["caf\\xe9"] = "literal backslash"          # the shown form of the raw name below
    src = make_tree(tmp_path / "src", spec)
    (src / os.fsdecode(b"caf\xe9")).write_text("raw byte")
    monkeypatch.setattr(scanmod, "FLUSH_ROWS", 8)
    result = scanmod.scan(str(src))
    paths = result.table["path"].to_pylist()
    assert paths.count("caf\\xe9") == 1 and result.table.num_rows == 51
    assert [p for p, _ in result.skipped] == ["caf\\xe9"]


def _name_order_tree(root):
    """Names whose path order is not their walk order: a folder's contents sort at
    its name + "/", between its siblings ("a", "a b", "a.txt" < "a/..." < "a0")."""
    spec = {name: name for name in ("a b", "a.txt", "a-", "a0", "b", "\u00e4", "\u4e2d", "A", "~")}
    spec.update({f"a/{i:03d}": "x" for i in range(40)})
    spec.update({"a/b/c": "deep", "a/b c": "x", "a.d/e": "x", "a/b/c d/e": "x"})
    spec.update({f"flat/f{i:04d}": f"{i}" for i in range(300)})     # a folder larger than FLUSH_ROWS
    spec.update({f"flat/sub{j}/g": "y" for j in range(5)})
    tree = make_tree(root, spec)
    (tree / os.fsdecode(b"a/caf\xe9")).write_text("raw name")
    os.mkdir(tree / os.fsdecode(b"raw\xff"))
    (tree / os.fsdecode(b"raw\xff/inner")).write_text("under a raw folder")
    os.link(tree / "a.txt", tree / "a/b/hard")          # the first name in path order leads
    os.link(tree / "a.txt", tree / "0-hard")
    return tree


@pytest.mark.parametrize("flush_rows,chunk_rows", [(8, 5), (64, 37), (10**9, 10**9)])
def test_scan_stream_gives_the_tree_in_path_order_chunks(tmp_path, monkeypatch, flush_rows, chunk_rows):
    src = _name_order_tree(tmp_path / "src")
    monkeypatch.setattr(scanmod, "FLUSH_ROWS", flush_rows)
    stream = scanmod.scan_stream(str(src), chunk_rows=chunk_rows)
    chunks = list(stream.chunks)
    assert all(0 < c.num_rows <= chunk_rows for c in chunks)
    assert all(c.schema.names == scanmod.SCAN_COLUMNS for c in chunks)
    table = pa.concat_tables(chunks)
    paths = table["path"].to_pylist()
    # Arrow's own sort of the same paths is the identity: the walk gave them out sorted, each once.
    assert pc.sort_indices(table["path"]).to_pylist() == list(range(table.num_rows))
    assert len(set(paths)) == len(paths)
    on_disk = {os.path.join(d, n) for d, ds, fs in os.walk(os.fsencode(src)) for n in ds + fs}
    assert len(paths) == len(on_disk) == 373
    assert paths.index("a") < paths.index("a b") < paths.index("a.txt") < paths.index("a/000") < paths.index("a0")
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows["0-hard"]["hardlink_to"] is None
    assert rows["a.txt"]["hardlink_to"] == rows["a/b/hard"]["hardlink_to"] == "0-hard"
    assert rows["raw\\xff/inner"]["path_bytes"] == b"raw\xff/inner"
    assert rows["a/caf\\xe9"]["path_bytes"] == b"a/caf\xe9"
    monkeypatch.setattr(scanmod, "FLUSH_ROWS", 10**9)
    assert table.equals(scanmod.scan(str(src)).table)      # the same rows as the one-table scan


def test_diff_stream_against_a_manifest_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    from keepflow.tasks.core import manifest as manifestmod
    from keepflow.tasks.core.repository import Repository

    from tests.core_helpers import backup

    src = _odd_tree(tmp_path / "src")
    age_tree(src)
    repo_url = str(tmp_path / "repo")
    monkeypatch.setattr(scanmod, "CHUNK_ROWS", 23)        # the manifest gets a row group per 23 rows
    first, _, _ = backup(src, repo_url)
    repo = Repository.open(repo_url)
    with manifestmod.ManifestRows(repo, first.info, diffmod.PARENT_COLUMNS) as rows:
        groups = list(rows.groups())
        assert len(groups) > 10 and rows.sorted_by_path()
    parent = manifestmod.read_manifest(repo, first.info, columns=diffmod.PARENT_COLUMNS)
    assert pa.concat_tables(groups).equals(parent)
    for path in ("big/f0300", "d5/s3/g3"):                  # changed since
        with open(src / path, "ab") as f:
            f.write(b"more")
    os.remove(src / "big" / "f0444")                      # deleted
    (src / "d4" / "new").write_text("new")               # new
    whole = diffmod.diff(scanmod.scan(str(src)).table, parent, first.info.start_ns)
    assert (whole.new, whole.changed, whole.deleted) == (1, 2, 1)
    for chunk_rows in (7, 23, 64):
        stream = scanmod.scan_stream(str(src), chunk_rows=chunk_rows)
        with manifestmod.ManifestRows(repo, first.info, diffmod.PARENT_COLUMNS) as rows:
            parts = list(diffmod.diff_stream(stream.chunks, rows.groups(), first.info.start_ns))
        assert len(parts) > 1
        assert pa.concat_tables([p.table for p in parts]).equals(whole.table)
        assert (sum(p.new for p in parts), sum(p.changed for p in parts), sum(p.unchanged for p in parts),
                sum(p.deleted for p in parts)) == (whole.new, whole.changed, whole.unchanged, whole.deleted)
    # The next backup, streaming both sides, stores just the change and verifies clean.
    monkeypatch.setattr(scanmod, "CHUNK_ROWS", 9)
    second, plan, _ = backup(src, repo_url)
    assert (plan["new"], plan["changed"], plan["deleted"], plan["to_read"]) == (1, 2, 1, 3)
    from keepflow.tasks.core import verify as verifymod
    assert verifymod.verify(repo_url, read_data=1.0).problems == []


def test_diff_stream_refuses_a_scan_out_of_path_order():
    chunk = pa.table({"path": ["b", "c"], "type": ["file", "file"], "size": [1, 1], "mtime_ns": [1, 1],
                      "ctime_ns": [1, 1], "inode": [1, 2]})
    earlier = chunk.set_column(0, "path", pa.array(["a", "a2"]))
    parent = _parent_of(chunk, {"b": "0" * 64, "c": "1" * 64})
    with pytest.raises(RuntimeError, match="path order"):
        list(diffmod.diff_stream([chunk, earlier], [parent]))


def test_all_null_columns_are_shared_not_allocated():
    column = nulls(pa.decimal128(38, 0), 1_000_000)
    assert len(column) == column.null_count == 1_000_000
    # 16 chunks of one 64Ki-row array: its buffers are counted once per chunk by
    # nbytes, yet exist once.
    assert len({c.buffers()[1].address for c in column.chunks}) == 1
    table = pa.table({"a": pa.nulls(10, pa.int64()), "b": list(range(10))})
    shared = share_nulls(table)
    address = table["b"].chunk(0).buffers()[1].address
    assert shared.equals(table) and shared["b"].chunk(0).buffers()[1].address == address


# -- diff ---------------------------------------------------------------------------

def _parent_of(table: pa.Table, hashes: dict[str, str]) -> pa.Table:
    files = table.filter(pc.equal(table["type"], "file"))
    return table.select(diffmod.PARENT_COLUMNS[:-1]).append_column(
        "hash", pa.array([hashes.get(p) if t == "file" else None
                          for p, t in zip(table["path"].to_pylist(), table["type"].to_pylist(), strict=True)],
                         pa.string())
    ) if files.num_rows else table


def test_diff_in_slices_equals_one_join(tmp_path, monkeypatch):
    src = _odd_tree(tmp_path / "src")
    age_tree(src)
    first = scanmod.scan(str(src))
    rng = random.Random(5)
    paths = first.table["path"].to_pylist()
    parent = _parent_of(first.table, {p: f"{rng.getrandbits(256):064x}" for p in paths})
    # The parent also holds files the scan no longer has, and lacks some it has.
    gone = pa.table({c: pa.array([v] * 3, parent.schema.field(c).type) for c, v in
                     [("path", "a-gone"), ("type", "file"), ("size", 1), ("mtime_ns", 1), ("ctime_ns", 1),
                      ("inode", 1), ("hash", "0" * 64)]})
    gone = gone.set_column(0, "path", pa.array(["a-gone", "big/f0500x", "zz-gone"]))
    keep = pa.array([rng.random() < 0.9 for _ in range(parent.num_rows)])
    parent = pa.concat_tables([parent.filter(keep), gone]).sort_by("path")
    # Some files changed since: their size differs.
    for path in ("big/f0300", "d5/s3/g3"):
        with open(src / path, "ab") as f:
            f.write(b"more")
    scanned = scanmod.scan(str(src)).table

    def run(chunk_rows, parent_table):
        monkeypatch.setattr(diffmod, "CHUNK_ROWS", chunk_rows)
        return diffmod.diff(scanned, parent_table, first.start_ns)

    whole = run(10**9, parent)
    shuffled = parent.take(np.random.default_rng(1).permutation(parent.num_rows))
    for chunk_rows, parent_table in ((16, parent), (100, parent), (16, shuffled)):
        sliced = run(chunk_rows, parent_table)
        assert (sliced.new, sliced.changed, sliced.unchanged, sliced.deleted) == \
            (whole.new, whole.changed, whole.unchanged, whole.deleted)
        assert sliced.table.equals(whole.table)
    assert whole.deleted == 3 and whole.changed >= 2 and whole.new > 0 and whole.unchanged > 0
    # parent_hash is kept for files that are read again only; final counts are unchanged by that.
    reread = pc.and_(whole.table["needs_read"], pc.is_valid(whole.table["parent_hash"]))
    assert pc.sum(reread).as_py() == whole.changed
    stored = whole.table.set_column(whole.table.schema.get_field_index("hash"), "hash",
                                    pc.if_else(whole.table["needs_read"], pa.scalar("f" * 64), whole.table["hash"]))
    assert diffmod.final_counts(stored) == {"new": whole.new, "changed": whole.changed, "unchanged": whole.unchanged}


def test_distrust_unindexed_with_a_known_blob_set_equals_the_arrow_lookup(tmp_path):
    src = make_tree(tmp_path / "src", {f"f{i:03d}": f"c{i}" for i in range(200)})
    age_tree(src)
    first = scanmod.scan(str(src))
    hashes = {r["path"]: blake3.blake3(r["path"].encode()).hexdigest() for r in first.table.to_pylist()}
    result = diffmod.diff(scanmod.scan(str(src)).table, _parent_of(first.table, hashes), first.start_ns)
    indexed = [h for i, h in enumerate(sorted(hashes.values())) if i % 3]
    plain = diffmod.distrust_unindexed(result, pa.array(indexed, pa.string()))
    compact = diffmod.distrust_unindexed(result, KnownBlobs(pa.array(indexed, pa.string())))
    assert plain.table.equals(compact.table)
    assert (compact.changed, compact.unchanged) == (plain.changed, plain.unchanged) and compact.changed > 60
    # A file that is read again keeps its parent hash, so it can still count as unchanged.
    lost = pc.and_(compact.table["needs_read"], pc.is_valid(compact.table["parent_hash"]))
    assert pc.sum(lost).as_py() == compact.changed


# -- known blobs ----------------------------------------------------------------------

class _PlainKnownBlobs:
    """The set of Python strings KnownBlobs used to be, as the reference."""

    def __init__(self, hashes=()):
        self._stored = set(hashes)
        self._claims: dict[str, int] = {}

    def __len__(self):
        return len(self._stored)

    def contains(self, h):
        return h in self._stored

    def contains_or_claim(self, h, packer):
        if h in self._stored or h in self._claims:
            return True
        self._claims[h] = id(packer)
        packer.claimed.add(h)
        return False

    def add(self, hashes):
        self._stored.update(hashes)

    def settle(self, packer, stored):
        for h in packer.claimed:
            if self._claims.get(h) == id(packer):
                del self._claims[h]
        if stored:
            self._stored.update(packer.claimed)
        packer.claimed = set()


class _Packer:
    def __init__(self):
        self.claimed: set[str] = set()


def _ids(rng, n):
    return [f"{rng.getrandbits(256):064x}" for _ in range(n)]


def test_known_blobs_answer_exactly_like_a_set_of_strings(monkeypatch):
    monkeypatch.setattr(kb, "FOLD_MIN", 16)              # fold the run's additions often
    rng = random.Random(11)
    indexed = _ids(rng, 3000) + ["not-an-id", "AB" * 32, "ab" * 31]   # tests and old repositories hold odd ids too
    indexed += indexed[:40]                                         # every location of a duplicated blob
    fresh = _ids(rng, 2000)
    odd_fresh = ["x", "CD" * 32, "ab" * 32 + "0"]
    compact = KnownBlobs(pa.chunked_array([pa.array(indexed[:1500]), pa.array(indexed[1500:])]))
    plain = _PlainKnownBlobs(indexed)
    assert len(compact) == len(plain)
    pool = indexed + fresh + odd_fresh + [h.upper() for h in fresh[:20]]
    packers = [(_Packer(), _Packer()) for _ in range(30)]
    for step, (mine, reference) in enumerate(packers):
        batch = rng.sample(pool, 200)
        for h in batch:
            assert compact.contains(h) == plain.contains(h), h
            assert compact.contains_or_claim(h, mine) == plain.contains_or_claim(h, reference), h
        assert mine.claimed == reference.claimed
        if step % 3 == 1:                                # another batch meets the same contents meanwhile
            other, other_ref = _Packer(), _Packer()
            for h in batch[:50]:
                assert compact.contains_or_claim(h, other) == plain.contains_or_claim(h, other_ref)
            compact.settle(other, stored=False)
            plain.settle(other_ref, stored=False)
        stored = step % 4 != 3                           # every fourth batch fails: its claims are released
        if stored:
            extra = rng.sample(fresh, 30)                 # hashes the batch added itself (large files)
            compact.add(extra)
            plain.add(extra)
        compact.settle(mine, stored=stored)
        plain.settle(reference, stored=stored)
        assert mine.claimed == set() and len(compact) == len(plain)
    assert len(compact._sorted) > 3000                   # the run's additions were folded in
    for h in pool:
        assert compact.contains(h) == plain.contains(h), h
    # A released claim can be taken again by a retry.
    retry, retry_ref = _Packer(), _Packer()
    assert ([compact.contains_or_claim(h, retry) for h in fresh]
            == [plain.contains_or_claim(h, retry_ref) for h in fresh])
    # Vectorised lookups agree with one-by-one ones, nulls and odd strings included.
    column = pa.array(pool + [None], pa.string())
    assert compact.contains_many(column).to_pylist() == [compact.contains(h) for h in pool] + [False]


def test_known_blobs_lookups_during_a_fold_never_miss(monkeypatch):
    monkeypatch.setattr(kb, "FOLD_MIN", 64)
    rng = random.Random(2)
    known = KnownBlobs(_ids(rng, 5000))
    added = _ids(rng, 4000)
    done, misses = threading.Event(), []

    def reader():
        while not done.is_set():
            for h in list(seen):
                if not known.contains(h):
                    misses.append(h)

    seen: list[str] = []
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(0, len(added), 50):
            known.add(added[i:i + 50])
            seen.extend(added[i:i + 50])
    finally:
        done.set()
        thread.join()
    assert not misses and len(known) == 9000 and all(known.contains(h) for h in added)


def test_known_blobs_hold_32_bytes_per_indexed_id():
    rng = random.Random(3)
    ids = _ids(rng, 100_000)
    known = KnownBlobs(pa.array(ids))
    part = known._sorted
    assert len(part.raw) == 32 * len(ids) and len(known) == len(ids)
    assert len(part.directory) * part.directory.itemsize <= 4 * len(ids)
    assert np.all(part.digests[1:] > part.digests[:-1])


# -- work lists -------------------------------------------------------------------------

def _cut_ranges_loop(sizes, max_files, max_bytes):
    """The per-entry loop cut_ranges used to be."""
    ranges, start, count, total = [], 0, 0, 0
    for i, size in enumerate(sizes):
        if count and (count >= max_files or total + size > max_bytes):
            ranges.append((start, i))
            start, count, total = i, 0, 0
        count += 1
        total += size
    if count:
        ranges.append((start, len(sizes)))
    return ranges


def test_vectorised_cut_ranges_equals_the_loop():
    from keepflow.tasks.core.scratch import cut_ranges

    rng = random.Random(7)
    for _ in range(2000):
        sizes = [rng.choice([0, 1, 5, 100, 1000, rng.randrange(3000)]) for _ in range(rng.randrange(60))]
        max_files, max_bytes = rng.randrange(1, 10), rng.randrange(1, 2500)
        assert cut_ranges(np.array(sizes, dtype=np.int64), max_files, max_bytes) == \
            _cut_ranges_loop(sizes, max_files, max_bytes)


def test_the_plan_is_written_and_read_back_a_row_group_at_a_time(tmp_path):
    from keepflow.tasks.core import scratch

    folder = scratch.create("backup", "20261202T000000Z-0123abcd", str(tmp_path))
    writer = scratch.TableWriter(folder, "plan")
    parts = [pa.table({"row": pa.array(range(a, a + n), pa.int64()), "path": [f"p{i}" for i in range(a, a + n)]})
             for a, n in ((0, 5), (5, 1), (6, 30))]
    for part in parts:
        writer.write(part)
    writer.close()
    groups = list(scratch.read_groups(folder, "plan"))
    assert [g.num_rows for g in groups] == [5, 1, 30]
    assert pa.concat_tables(groups).equals(pa.concat_tables(parts))
    assert scratch.read(folder, "plan").equals(pa.concat_tables(parts))
    scratch.remove(folder)


@pytest.mark.parametrize("fmt", [1, 2])
def test_the_known_blob_set_from_the_stored_ids_is_the_one_from_the_index_table(tmp_path, fmt):
    """index.load_ids reads format 2's binary ids as stored (no hex, no pack keys):
    KnownBlobs built from them holds what one built from load_index's hex holds."""
    from keepflow.tasks.core import index as indexmod
    from keepflow.tasks.core.repository import RepoConfig, Repository

    from tests.core_helpers import backup

    repo_url = str(tmp_path / "repo")
    Repository.init(repo_url, config=RepoConfig() if fmt == 1 else None)
    src = make_tree(tmp_path / "src", {f"d{i % 7}/f{i:03d}": f"content {i}" for i in range(300)})
    age_tree(src)
    backup(str(src), repo_url)
    (src / "d1" / "new").write_text("a second run, so a second index file")
    backup(str(src), repo_url)
    repo = Repository.open(repo_url)
    hexes = indexmod.load_index(repo, columns=["hash"], unique=False)["hash"]
    stored = indexmod.load_ids(repo)
    assert stored.type == (pa.string() if fmt == 1 else pa.binary(32)) and len(stored) == len(hexes)
    from_stored, from_hex = kb.indexed_now(repo), KnownBlobs(hexes)
    assert bytes(from_stored._sorted.raw) == bytes(from_hex._sorted.raw) and len(from_stored) == 301
    assert all(from_stored.contains(h) for h in hexes.to_pylist())
    # Nulls and slices of binary ids are taken as they are (only the valid ones).
    ids = pa.chunked_array([stored.combine_chunks().slice(5, 20),
                            pa.array([None, bytes(32)], pa.binary(32))]) if fmt == 2 else None
    if ids is not None:
        known = KnownBlobs(ids)
        assert len(known) == 21 and known.contains("00" * 32)
        assert all(known.contains(h) for h in hexes.to_pylist()[5:25])


# -- blob locations (restore's compact index) ---------------------------------------

@pytest.mark.damages_repository      # a hand-made index: its rows point at packs that were never written
def test_blob_locations_answer_like_the_first_index_row_of_each_hash(tmp_path):
    from keepflow.tasks.core import index as indexmod
    from keepflow.tasks.core.locations import BlobLocations
    from keepflow.tasks.core.repository import RepoConfig, Repository

    url = str(tmp_path / "repo")
    Repository.init(url, config=RepoConfig())            # format 1: hex ids and keys as stored
    repo = Repository.open(url)
    rng = random.Random(4)
    ids = _ids(rng, 400)
    twins = [ids[i][:16] + f"{rng.getrandbits(192):048x}" for i in range(20)]   # same first 8 bytes
    odd = ["not-an-id", "AB" * 32]
    first = ids[:250] + twins + odd
    second = ids[200:] + odd[:1]                           # 50 repeats and one odd repeat: the first file wins
    for label, hashes in (("a-first", first), ("b-second", second)):
        indexmod.write_index(repo, pa.table({
            "hash": pa.array(hashes, pa.string()),
            "key": pa.array([f"packs/{label}/{i % 7}" for i in range(len(hashes))], pa.string()),
            "offset": pa.array(range(len(hashes)), pa.int64()),
            "length": pa.array([len(label) + i for i in range(len(hashes))], pa.int64())}), label)
    expected = {}
    for label, hashes in (("a-first", first), ("b-second", second)):
        for i, h in enumerate(hashes):
            expected.setdefault(h, (f"packs/{label}/{i % 7}", i, len(label) + i))
    locations = BlobLocations(repo)
    assert len(locations) == len(expected)
    asked = rng.sample(list(expected), 300) + _ids(rng, 30) + [None, "x", twins[3][:16] + "0" * 48]
    found = locations.locate(pa.array(asked, pa.string()))
    got = list(zip(found["key"].to_pylist(), found["offset"].to_pylist(), found["length"].to_pylist(), strict=True))
    assert got == [expected.get(h, (None, None, None)) for h in asked]


def test_a_shared_known_blob_set_answers_as_its_source(tmp_path, monkeypatch):
    """known_blobs.share writes the sorted digests and maps them back; attach maps them in another
    process's place; both answer every question as the set they came from, a fold past the map
    still works, and a file of the wrong size is not used."""
    import secrets

    from keepflow.tasks.core import known_blobs

    ids = [secrets.token_hex(32) for _ in range(40_000)]
    source = known_blobs.KnownBlobs(ids)
    path = str(tmp_path / "known-blobs.bin")
    twin = known_blobs.KnownBlobs(ids)
    assert known_blobs.share(twin, path)
    assert os.path.getsize(path) == 32 * len(ids)
    attached = known_blobs.attach(path, len(ids))
    assert attached is not None and known_blobs.attach(path, len(ids) + 1) is None
    others = [secrets.token_hex(32) for _ in range(1_000)]
    probe = pa.array(ids[::97] + others)
    for known in (twin, attached):
        assert len(known) == len(source)
        assert all(known.contains(h) for h in ids[::101]) and not any(known.contains(h) for h in others)
        assert known.contains_many(probe).to_pylist() == source.contains_many(probe).to_pylist()
    # A process that stores enough folds its additions into the mapped part (a private copy).
    added = [secrets.token_hex(32) for _ in range(70_000)]
    attached.add(added)
    assert all(attached.contains(h) for h in added[::503] + ids[::503]) and len(attached) == 110_000

    # In a process of the run, the shared file is used and the index never read.
    def no_index(repo):
        raise AssertionError("the index was read although the run shared its set")

    monkeypatch.setattr(known_blobs, "indexed_now", no_index)

    class Repo:
        url = "file:///nowhere"

    got = known_blobs.known_blobs(Repo(), "run-shared", (path, len(ids)))   # type: ignore[arg-type]
    known_blobs.forget_run(Repo.url, "run-shared")
    assert len(got) == len(ids) and got.contains(ids[7])
