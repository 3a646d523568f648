"""Format 2's keyed FastCDC chunker (tasks/core/chunker.py) and blob compression (tasks/core/compress.py).

The specification is ARCHITECTURE.md, "Content-defined chunking" and
"Compression". The chunker is checked against two references written from
other sources: pyfastcdc's pure-Python implementation with the secret table
``G[b] = GEAR[perm[b]] ^ s`` swapped in, and the specification's own
byte-at-a-time pseudocode. Test data comes from BLAKE3's extendable output,
so every run (and every machine) sees the same bytes.
"""

from __future__ import annotations

import array
import io
import random
import struct
import threading
from pathlib import Path

import blake3
import pytest
from pyfastcdc.py import fastcdc as pyimpl
from pyfastcdc.py.constants import GEAR, MASKS

from keepflow.tasks.core import compress as zc
from keepflow.tasks.core.chunker import Chunker, derive_permutation, derive_seed

KiB, MiB = 1024, 1024 * 1024
M64 = 2**64 - 1
ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = blake3.blake3(b"another chunker key").digest()
SMALL = dict(min_size=2 * KiB, avg_size=8 * KiB, max_size=64 * KiB, nc=2)


def stream(label: str, n: int) -> bytes:
    """``n`` pseudo-random bytes, the same on every run."""
    return blake3.blake3(label.encode()).digest(length=n)


def chunks_of(data: bytes, lengths: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in lengths:
        out.append(data[pos: pos + n])
        pos += n
    assert pos == len(data)
    return out


def ids(data: bytes, lengths: list[int]) -> list[bytes]:
    return [blake3.blake3(c).digest() for c in chunks_of(data, lengths)]


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(KEY)


@pytest.fixture(scope="module")
def small() -> Chunker:
    return Chunker(KEY, **SMALL)


@pytest.fixture(scope="module")
def random64() -> bytes:
    return stream("random 64 MiB", 64 * MiB)


# -- key derivation -----------------------------------------------------------------

def test_gear_table_and_masks_are_the_ones_the_specification_names():
    table = b"".join(struct.pack("<Q", g) for g in GEAR)
    assert blake3.blake3(table).hexdigest() == "9af822d1e10df25d0157a43ccd0a73b56d1c1d0a5d77acb4e6e979522d0fe149"
    assert MASKS[22] == 0x0000D93767537000 and MASKS[18] == 0x0000D90707537000


def _spec_perm(key: bytes) -> list[int]:
    x = blake3.blake3(b"keepflow 2 chunker permutation", key=key).digest(length=2048)
    perm = list(range(256))
    for i in range(255, 0, -1):
        (r,) = struct.unpack_from("<Q", x, 8 * i)
        j = r % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def test_permutation_and_seed_follow_the_specification_and_depend_on_the_key(chunker):
    assert sorted(chunker.perm) == list(range(256))
    assert list(chunker.perm) == _spec_perm(KEY)
    (s,) = struct.unpack("<Q", blake3.blake3(b"keepflow 2 chunker seed", key=KEY).digest(length=8))
    assert chunker.seed == s >> 1 < 2**63
    other = Chunker(OTHER_KEY)
    assert sorted(other.perm) == list(range(256))
    assert other.perm != chunker.perm and other.seed != chunker.seed
    # Far from the identity and from each other (a shuffle leaves ~1 fixed point).
    assert sum(a == b for a, b in zip(chunker.perm, other.perm, strict=True)) < 10
    assert sum(p == i for i, p in enumerate(chunker.perm)) < 10
    # Pinned: a change here changes every repository's cut points.
    assert derive_permutation(KEY)[:8].hex() == "7ea359383a8fe8ec" and derive_seed(KEY) == 0x6DF87238A1A1D7A7


def test_key_must_be_32_bytes_and_sizes_are_checked():
    with pytest.raises(ValueError):
        Chunker(b"short")
    with pytest.raises(ValueError):
        Chunker(KEY, min_size=2 * KiB, avg_size=12 * KiB, max_size=64 * KiB)   # avg not a power of two
    with pytest.raises(ValueError):
        Chunker(KEY, min_size=64 * KiB, avg_size=8 * KiB, max_size=64 * KiB)   # min > avg
    c = Chunker.from_config(KEY, {"name": "fastcdc2020-keyed", "min": 524288, "avg": 1048576,
                                  "max": 8388608, "nc": 2})
    assert (c.min_size, c.avg_size, c.max_size, c.nc) == (512 * KiB, MiB, 8 * MiB, 2)
    with pytest.raises(ValueError):
        Chunker.from_config(KEY, {"name": "rabin", "min": 1, "avg": 2, "max": 3, "nc": 0})


# -- cut points ---------------------------------------------------------------------

def test_two_keys_cut_the_same_data_differently(chunker):
    data = stream("two keys", 16 * MiB)
    a = chunker.cut(data, final=True)
    b = Chunker(OTHER_KEY).cut(data, final=True)
    assert sum(a) == sum(b) == len(data)
    offsets = lambda ls: {sum(ls[:i]) for i in range(1, len(ls))}     # noqa: E731
    assert len(offsets(a)) >= 8
    assert not offsets(a) & offsets(b)       # not one shared cut point in 16 MiB
    # The pinned cut points of this key on this data (a change here is a format change).
    assert a == [1301181, 1087586, 1465901, 1488049, 682399, 1764694, 1215015, 1167666, 1444776,
                 1187126, 1268983, 1565528, 1069328, 68984]


def _reference(c: Chunker) -> pyimpl.FastCDC:
    """pyfastcdc's pure-Python FastCDC with the secret table G[b] = GEAR[perm[b]] ^ s swapped in."""
    ref = pyimpl.FastCDC(c.avg_size, min_size=c.min_size, max_size=c.max_size, normalized_chunking=c.nc)
    g = [(GEAR[c.perm[b]] ^ c.seed) & M64 for b in range(256)]
    ref.config.gear = array.array("Q", g)
    ref.config.gear_ls = array.array("Q", [(x << 1) & M64 for x in g])
    return ref


def _spec_cuts(c: Chunker, data: bytes) -> list[int]:
    """The specification's pseudocode, one byte at a time, on the original (unpermuted) bytes."""
    g = [(GEAR[c.perm[b]] ^ c.seed) & M64 for b in range(256)]
    bits = c.avg_size.bit_length() - 1
    mask_s, mask_l = MASKS[bits + c.nc], MASKS[bits - c.nc]
    even = lambda x: x // 2 * 2                                        # noqa: E731
    out, pos = [], 0
    while pos < len(data):
        n = len(data) - pos
        if n <= c.min_size:
            out.append(n)
            break
        center, limit = c.avg_size, n
        if n > c.max_size:
            limit = c.max_size
        elif n < c.avg_size:
            center = n
        h, cut = 0, limit
        for k in range(even(c.min_size), even(limit)):
            h = ((h << 1) + g[data[pos + k]]) & M64
            if h & (mask_s if k < even(center) else mask_l) == 0:
                cut = k
                break
        out.append(cut)
        pos += cut
    return out


def test_cut_points_equal_fastcdc_with_the_secret_table(chunker):
    data = stream("reference", 8 * MiB + 4321)
    assert chunker.cut(data, final=True) == [ch.length for ch in _reference(chunker).cut_buf(data)]


@pytest.mark.parametrize("length", [0, 1, 2 * KiB, 2 * KiB + 1, 5 * KiB + 1, 8 * KiB, 64 * KiB, 64 * KiB + 1,
                                    300 * KiB + 7])
def test_small_sizes_equal_the_reference_and_the_specification_pseudocode(small, length):
    data = stream(f"small {length}", length)
    got = small.cut(data, final=True)
    assert got == [ch.length for ch in _reference(small).cut_buf(data)]
    assert got == _spec_cuts(small, data)
    # The tail rule the pseudocode has for short remainders, and a long zero run (cut at max).
    zeros = bytes(3 * 64 * KiB + 5)
    assert small.cut(zeros, final=True) == _spec_cuts(small, zeros) == [64 * KiB] * 3 + [5]


def test_cut_accepts_bytes_bytearray_and_memoryviews(small):
    data = stream("buffer types", 200 * KiB)
    want = small.cut(data, final=True)
    assert small.cut(bytearray(data), final=True) == want
    assert small.cut(memoryview(data), final=True) == want
    assert small.cut(memoryview(data).cast("I"), final=True) == want          # any item size, as bytes
    assert small.cut(memoryview(b"xx" + data)[2:], final=True) == want        # a slice at an offset


def test_unfinished_cut_returns_exactly_the_chunks_that_cannot_change(small):
    data = stream("prefixes", 700 * KiB + 3)
    whole = small.cut(data, final=True)
    rng = random.Random(5)
    for end in [0, 1, small.max_size - 1, small.max_size, small.max_size + 1] + [rng.randrange(len(data))
                                                                                 for _ in range(40)]:
        part = small.cut(data[:end], final=False)
        assert part == whole[: len(part)]
        starts = [sum(whole[:i]) for i in range(len(whole))]
        decided = [s for s in starts if end - s >= small.max_size]
        assert len(part) == len(decided), end     # every chunk with max bytes after its start, no more


def test_chunks_stay_within_min_and_max(chunker, random64):
    lengths = chunker.cut(random64, final=True)
    assert sum(lengths) == len(random64)
    assert all(chunker.min_size <= n <= chunker.max_size for n in lengths[:-1])
    assert 0 < lengths[-1] <= chunker.max_size
    assert 40 <= len(lengths) <= 80                 # mean 0.8-1.6 MiB at NC 2 (bench: 1.14-1.21)
    zeros = bytes(3 * chunker.max_size + 5)
    assert chunker.cut(zeros, final=True) == [chunker.max_size] * 3 + [5]


def test_inserting_100_bytes_in_the_middle_changes_at_most_3_chunks(chunker, random64):
    before = ids(random64, chunker.cut(random64, final=True))
    middle = len(random64) // 2
    edited = random64[:middle] + stream("inserted", 100) + random64[middle:]
    after = ids(edited, chunker.cut(edited, final=True))
    new = [i for i in after if i not in set(before)]
    assert 1 <= len(new) <= 3
    assert len(set(before) - set(after)) <= 3


def test_appending_1_mib_changes_only_the_last_chunks(chunker, random64):
    old = random64[: 32 * MiB]
    new = random64[: 33 * MiB]
    old_lengths = chunker.cut(old, final=True)
    new_lengths = chunker.cut(new, final=True)
    # Guaranteed: every chunk that started max bytes or more before the old end is kept in place.
    settled = chunker.cut(old, final=False)
    assert new_lengths[: len(settled)] == settled
    assert len(settled) >= len(old_lengths) - 8
    # Measured on this data: the changed chunks are the last ones, at most 2 chunks' worth of bytes.
    old_ids, new_ids = ids(old, old_lengths), ids(new, new_lengths)
    changed = [k for k, i in enumerate(new_ids) if i not in set(old_ids)]
    assert changed == list(range(len(new_ids) - len(changed), len(new_ids)))
    assert 1 <= len(changed) <= 2
    assert new_ids[: len(old_ids) - 1] == old_ids[:-1]
    assert sum(new_lengths[k] for k in changed) <= 2 * chunker.max_size


# -- streaming ----------------------------------------------------------------------

class ShortReads:
    """A reader whose ``read(n)`` returns a random 1..n bytes, like a pipe or a socket."""

    def __init__(self, data: bytes, seed: int):
        self.f = io.BytesIO(data)
        self.rng = random.Random(seed)

    def read(self, n: int) -> bytes:
        return self.f.read(self.rng.randint(1, n))


@pytest.mark.parametrize("length", [0, 1, 2 * KiB - 1, 2 * KiB, 64 * KiB, 64 * KiB + 1, 128 * KiB, 128 * KiB + 1,
                                    1 * MiB + 12345])
def test_streaming_equals_cutting_the_whole_buffer(small, length):
    data = stream(f"stream {length}", length)
    want = small.cut(data, final=True)
    max_size = small.max_size
    for window in (1, max_size // 2, max_size, 2 * max_size, 2 * max_size + 1, 3 * max_size + 7, 10 * max_size):
        held = list(small.iter_chunks(io.BytesIO(data).read, window=window))      # every view kept
        assert [len(c) for c in held] == want, window
        assert b"".join(held) == data, window
        # Chunks used at once and dropped (the window buffers get reused): same bytes.
        seen = [blake3.blake3(c).digest() for c in small.iter_chunks(ShortReads(data, window).read, window=window)]
        assert seen == ids(data, want), window


def test_streaming_with_the_format_sizes(chunker):
    for length in (100, 512 * KiB, 8 * MiB, 8 * MiB + 1, 16 * MiB, 20 * MiB + 3):
        data = stream(f"big stream {length}", length)
        want = chunker.cut(data, final=True)
        for window in (MiB, 16 * MiB, 17 * MiB + 1):
            got = [blake3.blake3(c).digest() for c in chunker.iter_chunks(io.BytesIO(data).read, window=window)]
            assert got == ids(data, want), (length, window)


class ShortReadinto(ShortReads):
    """The same as a ``readinto``: fills a random 1..len(view) bytes of the view it is given."""

    def readinto(self, view) -> int:
        return self.f.readinto(view[: self.rng.randint(1, len(view))])


def test_streaming_with_readinto_equals_cutting_the_whole_buffer(small, chunker):
    for cdc, length in ((small, 1 * MiB + 12345), (small, 0), (small, 5), (chunker, 20 * MiB + 3)):
        data = stream(f"readinto {length}", length)
        want = cdc.cut(data, final=True)
        for window in (1, 2 * cdc.max_size + 1, 5 * cdc.max_size):
            whole = [len(c) for c in cdc.iter_chunks(readinto=io.BytesIO(data).readinto, window=window)]
            assert whole == want, (length, window)
            got = [blake3.blake3(c).digest()
                   for c in cdc.iter_chunks(readinto=ShortReadinto(data, window).readinto, window=window)]
            assert got == ids(data, want), (length, window)


def test_streaming_carries_only_the_undecided_chunk_and_still_cuts_like_the_whole_buffer(small):
    # Runs of zeros cut at max (a chunk exactly max long at a window's end is decided), random
    # runs cut by the hash (one that ends a window is carried over); remainders shorter than
    # avg and min at window ends.
    rng = random.Random(11)
    parts = []
    for k in range(60):
        n = rng.choice([small.min_size - 1, small.avg_size - 3, small.max_size, small.max_size + 1,
                        3 * small.max_size, rng.randrange(1, 4 * small.max_size)])
        parts.append(bytes(n) if k % 3 == 0 else stream(f"mixed {k}", n))
    data = b"".join(parts)
    want = small.cut(data, final=True)
    assert small.max_size in want                       # the zero runs did cut at max
    for window in [2 * small.max_size + d for d in (0, 1, 2, 7, small.min_size, small.avg_size)] + [
            3 * small.max_size - 1, 4 * small.max_size]:
        got = [blake3.blake3(c).digest() for c in small.iter_chunks(io.BytesIO(data).read, window=window)]
        assert got == ids(data, want), window


def test_streaming_needs_exactly_one_reader(small):
    with pytest.raises(TypeError):
        list(small.iter_chunks())
    with pytest.raises(TypeError):
        list(small.iter_chunks(io.BytesIO(b"x").read, readinto=io.BytesIO(b"x").readinto))


def test_streaming_rejects_a_reader_that_returns_too_much(small):
    with pytest.raises(ValueError):
        list(small.iter_chunks(lambda n: bytes(n + 1)))


def test_one_chunker_cuts_in_two_threads_at_once(chunker, random64):
    want = chunker.cut(random64, final=True)
    got: list = [None, None]

    def run(k):
        got[k] = chunker.cut(random64, final=True)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want, want]


# -- compression --------------------------------------------------------------------

@pytest.fixture(scope="module")
def text() -> bytes:
    files = sorted((ROOT / "tasks" / "core").glob("*.py")) + [ROOT / "ARCHITECTURE.md"]
    return b"".join(p.read_bytes() for p in files)[: 2 * MiB]


@pytest.mark.parametrize("mode", zc.MODES)
def test_round_trip_in_every_mode(text, mode):
    for data in (text, text[:1000], b"a", stream("rt", 300 * KiB), bytes(MiB)):
        payload, compressed = zc.compress(data, mode)
        assert (zc.decompress(payload, len(data)) if compressed else bytes(payload)) == data


def test_text_compresses_and_levels_come_from_the_table(text):
    sizes = {}
    for mode in ("fastest", "auto", "max"):
        payload, compressed = zc.compress(text, mode)
        assert compressed
        sizes[mode] = len(payload)
    assert sizes["max"] < sizes["auto"] < sizes["fastest"] < 0.5 * len(text)
    # The repository's zstd_levels are used: "auto" at level 1 is "fastest" at level 1.
    assert zc.compress(text, "auto", {"fastest": 1, "auto": 1, "max": 9})[0] == zc.compress(text, "fastest")[0]
    with pytest.raises(ValueError):
        zc.compress(text, "best")
    with pytest.raises(ValueError):
        zc.compress(text, "max", {"auto": 3})


def test_random_data_is_stored_raw_and_off_never_compresses(text):
    data = stream("incompressible", MiB)
    for mode in ("auto", "fastest", "max"):
        payload, compressed = zc.compress(data, mode)
        assert not compressed and payload is data
    payload, compressed = zc.compress(text, "off")
    assert not compressed and payload is text
    assert zc.compress(bytes(1000), "off") == (bytes(1000), False)
    assert zc.compress(b"", "auto") == (b"", False)
    # The 1/32 rule: half random, half zeros saves far more than 1/32; 31/32 random saves less.
    mostly_random = stream("mostly", 31 * KiB) + bytes(KiB)
    assert zc.compress(mostly_random, "auto")[1] is False
    assert zc.compress(stream("half", 16 * KiB) + bytes(16 * KiB), "auto")[1] is True


def test_damaged_payloads_and_wrong_lengths_raise(text):
    data = text[: 256 * KiB]
    payload, compressed = zc.compress(data, "auto")
    assert compressed
    for wrong in (0, len(data) - 1, len(data) + 1, 2 * len(data)):
        with pytest.raises(zc.CorruptBlob):
            zc.decompress(payload, wrong)
    with pytest.raises(zc.CorruptBlob):
        zc.decompress(payload[:-1], len(data))                 # truncated
    with pytest.raises(zc.CorruptBlob):
        zc.decompress(payload + b"\0", len(data))              # bytes after the frame
    with pytest.raises(zc.CorruptBlob):
        zc.decompress(payload + payload, 2 * len(data))        # two frames are not one blob
    with pytest.raises(zc.CorruptBlob):
        zc.decompress(stream("not zstd", 1000), 1000)
    with pytest.raises(zc.CorruptBlob):
        zc.decompress(b"", 0)
    # A flipped byte anywhere: corruption is reported, never wrong bytes returned (a flip in
    # entropy-coder padding can leave the output intact: then the right bytes come back).
    rng = random.Random(3)
    raised = 0
    positions = [0, 4, 5, len(payload) // 2, len(payload) - 1] + [rng.randrange(len(payload)) for _ in range(200)]
    for pos in positions:
        damaged = bytearray(payload)
        damaged[pos] ^= 1 << rng.randrange(8)
        try:
            assert zc.decompress(bytes(damaged), len(data)) == data, pos
        except zc.CorruptBlob:
            raised += 1
    assert raised >= 0.95 * len(positions)
    with pytest.raises(zc.CorruptBlob):
        damaged = bytearray(payload)
        damaged[len(payload) // 2] ^= 0xFF
        zc.decompress(bytes(damaged), len(data))


def test_decompress_in_several_threads_at_once(text):
    blobs = [text[i: i + 64 * KiB] for i in range(0, len(text), 64 * KiB)]
    payloads = [zc.compress(b, "auto")[0] for b in blobs]
    errors = []

    def run():
        for _ in range(5):
            for b, p in zip(blobs, payloads, strict=True):
                if zc.decompress(p, len(b)) != b:
                    errors.append("mismatch")
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
