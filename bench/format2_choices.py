"""Measure the choices behind repository format 2 (issue 9) on this machine.

    .venv/bin/python -m bench.format2_choices [--only aead,zstd,...] [--repeats 3] [--out FILE]

Sections (``--only`` takes any of them, comma-separated; all by default):

- ``aead``      AES-256-GCM, ChaCha20-Poly1305 and AES-256-GCM-SIV (``cryptography``):
                encrypt/decrypt throughput on 4 KiB, 64 KiB, 1 MiB and 8 MiB messages,
                1 thread and 2 threads (2 threads doing twice the work in the same time
                means the library releases the GIL); HKDF-SHA256 cost per derived key.
- ``zstd``      ``backports.zstd`` (the Python 3.14 ``compression.zstd`` API) against
                ``zstandard``: compression ratio and speed per level on text (the venv's
                ``.py`` files, compressed one 1 MiB block at a time, and small files one by
                one) and on random data (how fast incompressible data is recognised); the
                "sample first" shortcut; 2 threads.
- ``blake3``    unkeyed against keyed BLAKE3 (``blake3.blake3(key=...)``), 1 and 2 threads.
- ``cdc``       FastCDC (``pyfastcdc``) at min/avg/max 512 KiB / 1 MiB / 8 MiB on 64 MiB of
                random data: throughput, chunk sizes, 2 threads; what keying costs (the
                library's 64-bit XOR ``seed``; a secret byte permutation of the input in
                front of it, applied by ``bytes.translate``, numpy or ``pyarrow.compute.take``,
                checked to give the cut points of FastCDC with the table GEAR[perm[b]] ^ seed;
                a numpy gear hash with a whole secret table); the boundary-shift test at
                NC 2 (100 bytes inserted in the middle, 1 MiB appended: chunks that change).
- ``kdf``       scrypt (n, r=8, p=1) and Argon2id parameters against time.
- ``manifest``  a 1M-row manifest (MANIFEST_SCHEMA, generated): plain Parquet, whole-file
                AEAD around the Parquet bytes, and Parquet modular encryption
                (``pyarrow.parquet.encryption`` with an in-process KMS client): write/read
                time, size; listing the snapshot facts of 1,000 manifests each way; hex
                string ids against 32-byte binary ids.
- ``chunklist`` 1M files of which 1% are chunked (2-100 chunks each): a
                ``list<binary(32)>`` column in the manifest against a separate content table
                (content id -> chunk ids): size per snapshot and read time.

Every figure is the median of ``--repeats`` runs (3 by default); each run takes well under
a few seconds. The machine is shared: the load average is printed at the start and end.
Nothing here is keepflow code; the repository format is specified in ARCHITECTURE.md
("Repository format 2 (specification)") and the decisions are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import glob
import io
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KiB, MiB = 1024, 1024 * 1024
SECTIONS = ("aead", "zstd", "blake3", "cdc", "kdf", "manifest", "chunklist")
REPEATS = 3
OUT: list[str] = []


# -- helpers ------------------------------------------------------------------

def say(line: str = "") -> None:
    print(line, flush=True)
    OUT.append(line)


def table(header: list[str], rows: list[list]) -> None:
    say("| " + " | ".join(header) + " |")
    say("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |")
    for r in rows:
        say("| " + " | ".join(str(c) for c in r) + " |")
    say()


def timed(fn, repeats: int | None = None) -> float:
    """Median wall time of ``fn()`` over the repeats."""
    times = []
    for _ in range(repeats or REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def in_threads(fn, n: int) -> float:
    """Median wall time of running ``fn()`` in ``n`` threads at once."""
    def run():
        ts = [threading.Thread(target=fn) for _ in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return timed(run)


def gil_free(call) -> str:
    """Does one long ``call()`` (in a thread) keep the main thread from running Python?

    The main thread sleeps 0.5 ms at a time while the call runs in another thread and
    records the longest it waited to run again. A call that holds the GIL keeps it out for
    about the whole call; one that releases it lets it back within a scheduler tick, even on
    a busy machine. Reported as the longest wait against the call's duration (medians).
    """
    gaps, durations = [], []
    for _ in range(REPEATS):
        done = threading.Event()
        span = [0.0]

        def run():
            t0 = time.perf_counter()
            call()
            span[0] = time.perf_counter() - t0
            done.set()
        th = threading.Thread(target=run)
        t = time.perf_counter()
        th.start()                         # the call may start (and hold the GIL) before start() returns
        longest = time.perf_counter() - t
        while not done.is_set():
            t = time.perf_counter()
            time.sleep(0.0005)
            longest = max(longest, time.perf_counter() - t)
        th.join()
        gaps.append(longest)
        durations.append(span[0])
    gap, duration = statistics.median(gaps), statistics.median(durations)
    verdict = "holds the GIL" if gap > 0.5 * duration else "releases the GIL"
    return f"{verdict} (main thread kept out {gap * 1e3:.0f} ms of a {duration * 1e3:.0f} ms call)"


def gil_controls() -> str:
    """The probe on two known calls: hashlib releases the GIL for large inputs, bytes.count does not."""
    import hashlib
    big = os.urandom(256 * MiB)
    return (f"controls: hashlib.sha256 of 256 MiB {gil_free(lambda: hashlib.sha256(big).digest())}; "
            f"bytes.count over 256 MiB {gil_free(lambda: big.count(b'kf'))}")


def mibs(nbytes: float, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:,.0f}"


def size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def random_bytes(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def text_corpus(limit: int) -> tuple[bytes, list[bytes]]:
    """Up to ``limit`` bytes of the venv's .py files: concatenated, and as separate files."""
    site = os.path.join(ROOT, ".venv", "lib")
    files, total = [], 0
    for path in sorted(glob.glob(os.path.join(site, "python3*", "site-packages", "**", "*.py"), recursive=True)):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if not data:
            continue
        files.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"".join(files)[:limit], files


# -- AEAD ---------------------------------------------------------------------

def bench_aead() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV, ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    say("### AEAD (cryptography)")
    say()
    algs = {"AES-256-GCM": AESGCM, "ChaCha20-Poly1305": ChaCha20Poly1305, "AES-256-GCM-SIV": AESGCMSIV}
    total = 64 * MiB
    rows = []
    for name, cls in algs.items():
        aead = cls(os.urandom(32))
        for size in (4 * KiB, 64 * KiB, MiB, 8 * MiB):
            msg = os.urandom(size)
            count = total // size
            nonces = [i.to_bytes(12, "big") for i in range(count)]
            ct = aead.encrypt(nonces[0], msg, None)

            def enc():
                for nonce in nonces:
                    aead.encrypt(nonce, msg, None)

            def dec():
                for _ in range(count):
                    aead.decrypt(nonces[0], ct, None)

            t1 = timed(enc)
            t2 = in_threads(enc, 2)
            td = timed(dec)
            rows.append([name, size_label(size), mibs(total, t1), mibs(2 * total, t2),
                         f"{2 * total / t2 / (total / t1):.2f}x", mibs(total, td),
                         f"{t1 / count * 1e6:.1f}"])
    table(["cipher", "message", "encrypt MiB/s, 1 thread", "encrypt MiB/s, 2 threads", "2-thread speed-up",
           "decrypt MiB/s", "µs per encrypt"], rows)
    big = os.urandom(512 * MiB)
    say("GIL during one 512 MiB encrypt: " + ", ".join(
        f"{name} {gil_free(lambda: cls(os.urandom(32)).encrypt(bytes(12), big, None))}" for name, cls in algs.items())
        + ".")
    say()
    big = b""                    # freed (not del: the lambdas above name it)

    master = os.urandom(32)
    salts = [os.urandom(32) for _ in range(10_000)]

    def derive():
        for salt in salts:
            HKDF(hashes.SHA256(), 32, salt, b"keepflow bench").derive(master)

    t = timed(derive)
    setup = timed(lambda: [AESGCM(master) for _ in range(10_000)])
    say(f"HKDF-SHA256 (32 bytes from a 32-byte key and 32-byte salt): {t / len(salts) * 1e6:.1f} µs per key; "
        f"AESGCM(key) object: {setup / 10_000 * 1e6:.1f} µs.")
    say()


# -- zstd ---------------------------------------------------------------------

class _Backports:
    name = "backports.zstd"

    def __init__(self):
        from backports import zstd
        self.zstd = zstd
        self.version = ".".join(map(str, zstd.zstd_version_info))

    def compressor(self, level):
        zstd = self.zstd
        comp = zstd.ZstdCompressor(level=level)

        def compress(data):
            return comp.compress(data, zstd.ZstdCompressor.FLUSH_FRAME)
        return compress

    def decompress(self, data):
        return self.zstd.decompress(data)


class _Zstandard:
    name = "zstandard"

    def __init__(self):
        import zstandard
        self.zstandard = zstandard
        self.version = ".".join(map(str, zstandard.ZSTD_VERSION))
        self._local = threading.local()      # a ZstdDecompressor must not be shared between threads

    def compressor(self, level):
        return self.zstandard.ZstdCompressor(level=level).compress

    def decompress(self, data):
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = self.zstandard.ZstdDecompressor()
        return d.decompress(data)


def bench_zstd() -> None:
    say("### zstd")
    say()
    libs = [_Backports(), _Zstandard()]
    text, files = text_corpus(8 * MiB)
    blocks = [text[i: i + MiB] for i in range(0, len(text), MiB)]
    small = [f for f in files if len(f) < MiB][:1000]
    small_total = sum(map(len, small))
    rnd = random_bytes(8 * MiB)
    rblocks = [rnd[i: i + MiB] for i in range(0, len(rnd), MiB)]
    say(f"Text: {len(text) / MiB:.0f} MiB of the venv's .py files, compressed as 1 MiB blocks (chunk-like); "
        f"small files: {len(small):,} of those files one by one ({small_total / MiB:.1f} MiB, mean "
        f"{small_total / len(small) / KiB:.1f} KiB). Random: 8 MiB in 1 MiB blocks. zstd library versions: "
        + ", ".join(f"{lib.name} {lib.version}" for lib in libs) + ".")
    say()
    levels = (-5, -1, 1, 3, 6, 9, 12, 15, 19)
    rows = []
    for level in levels:
        for lib in libs:
            comp = lib.compressor(level)
            out = [comp(b) for b in blocks]
            ratio = sum(map(len, out)) / len(text)
            tc = timed(lambda: [comp(b) for b in blocks])
            td = timed(lambda: [lib.decompress(c) for c in out])
            sout = [comp(f) for f in small]
            sratio = sum(map(len, sout)) / small_total
            ts = timed(lambda: [comp(f) for f in small])
            rout = [comp(b) for b in rblocks]
            tr = timed(lambda: [comp(b) for b in rblocks])
            rows.append([level, lib.name, f"{ratio:.3f}", mibs(len(text), tc), mibs(len(text), td),
                         f"{sratio:.3f}", mibs(small_total, ts), f"{ts / len(small) * 1e6:.0f}",
                         mibs(len(rnd), tr), f"{sum(map(len, rout)) / len(rnd):.5f}"])
    table(["level", "library", "text ratio (1 MiB blocks)", "compress MiB/s", "decompress MiB/s",
           "small files ratio", "small files MiB/s", "µs per small file", "random: compress MiB/s",
           "random: stored/raw"], rows)

    # "auto": when does compression not pay, and can a sample tell early?
    lib = libs[0]
    comp1 = lib.compressor(1)
    comp3 = lib.compressor(3)
    sample = 64 * KiB

    def sampled(blocks_):
        kept = 0
        for b in blocks_:
            if len(comp1(b[:sample])) > 0.97 * min(sample, len(b)):
                kept += 1                  # judged incompressible: stored raw, not compressed
            else:
                comp3(b)
        return kept

    tr_full = timed(lambda: [comp3(b) for b in rblocks])
    tr_sample = timed(lambda: sampled(rblocks))
    tt_sample = timed(lambda: sampled(blocks))
    misjudged = sampled(blocks)
    say(f"Incompressible data at level 3 ({lib.name}): compressing each 1 MiB block whole "
        f"{mibs(len(rnd), tr_full)} MiB/s; testing a 64 KiB sample at level 1 first "
        f"{mibs(len(rnd), tr_sample)} MiB/s (random), {mibs(len(text), tt_sample)} MiB/s on text "
        f"({misjudged} of {len(blocks)} text blocks misjudged as incompressible).")
    say()

    rows = []
    for lib in libs:
        comp = lib.compressor(3)
        t1 = timed(lambda: [comp(b) for b in blocks])

        def work():
            c = lib.compressor(3)
            for b in blocks:
                c(b)
        t2 = in_threads(work, 2)
        out = [comp(b) for b in blocks]
        d1 = timed(lambda: [lib.decompress(c) for c in out])
        d2 = in_threads(lambda: [lib.decompress(c) for c in out], 2)
        rows.append([lib.name, mibs(len(text), t1), mibs(2 * len(text), t2), f"{t1 * 2 / t2:.2f}x",
                     mibs(len(text), d1), mibs(2 * len(text), d2), f"{d1 * 2 / d2:.2f}x"])
    big = text * 4
    def gil_both(lib) -> str:
        packed = lib.compressor(3)(big)
        return f"{lib.name} {gil_free(lambda: lib.compressor(3)(big))} / {gil_free(lambda: lib.decompress(packed))}"

    say("GIL during one 32 MiB compress at level 3 / its decompress: " + ", ".join(gil_both(lib) for lib in libs) + ".")
    say()
    table(["library (level 3, 1 MiB text blocks)", "compress 1 thread", "compress 2 threads", "speed-up",
           "decompress 1 thread", "decompress 2 threads", "speed-up"], rows)

    # Cross-library frames: a frame written by one must be read by the other.
    a = libs[0].compressor(3)(blocks[0])
    b = libs[1].compressor(3)(blocks[0])
    ok = libs[1].decompress(a) == blocks[0] and libs[0].decompress(b) == blocks[0]
    say(f"Frames are interchangeable (each library decompresses the other's): {ok}. "
        f"backports.zstd frames from ZstdCompressor.compress(..., FLUSH_FRAME) carry the content size: "
        f"{_frame_has_size(a)}; zstandard's: {_frame_has_size(b)}.")
    say()


def _frame_has_size(frame: bytes) -> bool:
    # RFC 8878: Frame_Header_Descriptor bits 7-6 = Frame_Content_Size_flag; single-segment bit 5.
    fhd = frame[4]
    return (fhd >> 6) != 0 or bool(fhd & 0x20)


# -- BLAKE3 -------------------------------------------------------------------

def bench_blake3() -> None:
    import blake3

    say("### BLAKE3 (blake3 " + getattr(blake3, "__version__", "?") + ")")
    say()
    key = os.urandom(32)
    total = 256 * MiB
    rows = []
    for size in (4 * KiB, MiB, 8 * MiB):
        msg = os.urandom(size)
        count = total // size
        for label, kw in (("unkeyed", {}), ("keyed", {"key": key})):
            def run():
                for _ in range(count):
                    blake3.blake3(msg, max_threads=1, **kw).digest()
            t1 = timed(run)
            t2 = in_threads(run, 2)
            rows.append([size_label(size), label, mibs(total, t1), mibs(2 * total, t2), f"{t1 * 2 / t2:.2f}x",
                         f"{t1 / count * 1e6:.1f}"])
    big = os.urandom(64 * MiB)
    for label, kw in (("unkeyed", {}), ("keyed", {"key": key})):
        t = timed(lambda: blake3.blake3(big, max_threads=blake3.blake3.AUTO, **kw).digest())
        rows.append(["64 MiB, max_threads=AUTO", label, mibs(len(big), t), "", "", f"{t * 1e6:.0f}"])
    table(["message", "mode", "MiB/s, 1 thread", "MiB/s, 2 threads", "speed-up", "µs per hash"], rows)
    huge = os.urandom(256 * MiB)
    say("GIL during one 256 MiB hash (max_threads=1): unkeyed "
        f"{gil_free(lambda: blake3.blake3(huge, max_threads=1).digest())}, keyed "
        f"{gil_free(lambda: blake3.blake3(huge, key=key, max_threads=1).digest())}.")
    say()


# -- content-defined chunking -------------------------------------------------

CDC_MIN, CDC_AVG, CDC_MAX, CDC_NC = 512 * KiB, MiB, 8 * MiB, 2


def keyed_permutation(key: bytes) -> bytes:
    """A secret permutation of the 256 byte values (Fisher-Yates on a keyed BLAKE3 stream)."""
    import blake3

    stream = blake3.blake3(b"keepflow bench byte permutation", key=key).digest(length=256 * 8)
    perm = list(range(256))
    for i in range(255, 0, -1):
        r = int.from_bytes(stream[8 * i: 8 * i + 8], "little")
        j = r % (i + 1)                  # bias below 2^-55: irrelevant here
        perm[i], perm[j] = perm[j], perm[i]
    return bytes(perm)


def numpy_gear_candidates(data: bytes, gear: np.ndarray, mask: int) -> np.ndarray:
    """Positions whose 64-byte-window gear hash matches ``mask`` (vectorised, whole secret table)."""
    g = gear[np.frombuffer(data, np.uint8)]
    h = g.copy()
    for k in (1, 2, 4, 8, 16, 32):           # window doubling: h_i = sum_j g[i-j] << j, j < 64
        h[k:] += h[:-k] << np.uint64(k)
    return np.flatnonzero((h & np.uint64(mask)) == 0)


def _chunks(cdc, data):
    return [(c.offset, c.length) for c in cdc.cut_buf(data)]


def bench_cdc() -> None:
    import blake3
    import pyfastcdc
    from pyfastcdc.py import constants as pyconst

    say("### Content-defined chunking (pyfastcdc " + pyfastcdc.__version__ + ")")
    say()
    data = random_bytes(64 * MiB, seed=7)
    key = blake3.blake3(b"keepflow bench chunker key").digest()   # fixed: the same cut points every run
    seed = int.from_bytes(blake3.blake3(b"seed", key=key).digest()[:8], "little") >> 1   # < 2^63 (see below)
    perm = keyed_permutation(key)
    lut = np.frombuffer(perm, np.uint8)
    rows = []
    configs = [("512 KiB / 1 MiB / 8 MiB, NC 1", dict(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)),
               ("512 KiB / 1 MiB / 8 MiB, NC 2", dict(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX,
                                                     normalized_chunking=2)),
               ("256 KiB / 1 MiB / 8 MiB, NC 1", dict(avg_size=CDC_AVG, min_size=256 * KiB, max_size=CDC_MAX)),
               ("512 KiB / 512 KiB / 8 MiB, NC 1", dict(avg_size=512 * KiB, min_size=CDC_MIN, max_size=CDC_MAX))]
    for label, kw in configs:
        for s_label, s in (("none", 0), ("64-bit XOR seed", seed)):
            cdc = pyfastcdc.FastCDC(**kw, seed=s)
            chunks = _chunks(cdc, data)
            lengths = [n for _, n in chunks]
            t1 = timed(lambda: _chunks(cdc, data))
            t2 = in_threads(lambda: _chunks(cdc, data), 2)
            rows.append([label, s_label, mibs(len(data), t1), mibs(2 * len(data), t2), f"{t1 * 2 / t2:.2f}x",
                         len(chunks), f"{statistics.mean(lengths) / KiB:,.0f}",
                         f"{sum(n * n for n in lengths) / sum(lengths) / KiB:,.0f}",
                         f"{min(lengths[:-1]) / KiB:,.0f}", f"{max(lengths) / KiB:,.0f}",
                         sum(1 for n in lengths if n == kw['max_size'])])
    table(["min / avg / max", "keying", "MiB/s, 1 thread", "MiB/s, 2 threads", "speed-up", "chunks in 64 MiB",
           "mean KiB", "size-biased mean KiB (chunk a random byte lies in)", "smallest KiB (not last)",
           "largest KiB", "cut at max"], rows)

    # What the seed is: GEAR[b] XOR seed for every b, so only 64 key bits, and a cut
    # decision reads bits <= 47 of the hash (the 2 MiB mask's top bit), which depend only
    # on seed bits <= 47. Check the tables against the source and the seed's range.
    gear = np.array(pyconst.GEAR, dtype=np.uint64)
    gear_ls = np.array(pyconst.GEAR_LS, dtype=np.uint64)
    ls_is_shift = bool(np.all(gear_ls == (gear << np.uint64(1))))
    masks = {k: pyconst.MASKS[k] for k in (18, 19, 20, 21, 22)}
    top_bit = max(int(m).bit_length() for m in masks.values()) - 1
    try:
        pyfastcdc.FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, seed=2**64 - 1)
        seed_range = "any 64-bit value"
    except OverflowError:
        seed_range = "below 2^63 (2^64-1 raises OverflowError in the Cython build)"
    say(f"pyfastcdc's `seed` XORs one 64-bit value into every gear-table entry (GEAR_LS == GEAR << 1: "
        f"{ls_is_shift}); the cut masks for 256 KiB .. 4 MiB (NC 1 and 2 around 1 MiB) are "
        + ", ".join(f"0x{int(m):016x}" for m in masks.values())
        + f", whose highest bit is {top_bit}, so cut points depend on at most {top_bit + 1} seed bits. "
        f"Seed range: {seed_range}. GEAR table BLAKE3 (2,048 bytes little-endian): "
        f"{blake3.blake3(gear.astype('<u8').tobytes()).hexdigest()}.")
    say()

    # Keying alternatives, all on the configuration the specification chooses
    # (512 KiB / 1 MiB / 8 MiB, NC 2).
    cdc = pyfastcdc.FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=CDC_NC, seed=seed)
    t_cut = timed(lambda: _chunks(cdc, data))
    t_translate = timed(lambda: data.translate(perm))
    t_translate2 = in_threads(lambda: data.translate(perm), 2)
    arr = np.frombuffer(data, np.uint8)
    out = np.empty_like(arr)
    t_np = timed(lambda: np.take(lut, arr, out=out))
    t_np2 = in_threads(lambda: np.take(lut, arr, out=np.empty_like(arr)), 2)

    import pyarrow as pa
    import pyarrow.compute as pc

    lut_arrow = pa.array(lut)

    def arrow_permute(buf):
        """The permuted copy through pyarrow (uint8 indices into a 256-entry table)."""
        idx = pa.Array.from_buffers(pa.uint8(), len(buf), [None, pa.py_buffer(buf)])
        return pc.take(lut_arrow, idx).buffers()[1]

    assert bytes(arrow_permute(data[:MiB]))[:MiB] == data[:MiB].translate(perm)
    t_arrow = timed(lambda: arrow_permute(data))
    t_arrow2 = in_threads(lambda: arrow_permute(data), 2)

    def perm_then_cut():
        return _chunks(cdc, data.translate(perm))

    def arrow_then_cut():
        return _chunks(cdc, memoryview(arrow_permute(data)).cast("B")[: len(data)])

    t_both_arrow = timed(arrow_then_cut)
    t_both_arrow2 = in_threads(arrow_then_cut, 2)

    t_both = timed(perm_then_cut)
    t_both2 = in_threads(perm_then_cut, 2)
    # The same cut points as FastCDC with the table G'[b] = GEAR[perm[b]] ^ seed, checked
    # with the library's pure-Python implementation on the first 8 MiB:
    from pyfastcdc.py import fastcdc as pyimpl
    ref = pyimpl.FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=CDC_NC, seed=seed)
    g2 = np.array([(int(gear[perm[b]]) ^ seed) & (2**64 - 1) for b in range(256)], dtype=np.uint64)
    import array as _array
    ref.config.gear = _array.array("Q", [int(x) for x in g2])
    ref.config.gear_ls = _array.array("Q", [(int(x) << 1) & (2**64 - 1) for x in g2])
    head = data[: 8 * MiB]
    equivalent = [(c.offset, c.length) for c in ref.cut_buf(head)] == _chunks(cdc, head.translate(perm))
    # A whole secret table (256 x 64 random bits) in numpy: only the hashing, cut rules aside.
    secret_gear = np.frombuffer(blake3.blake3(b"gear", key=key).digest(length=2048), dtype="<u8").astype(np.uint64)
    part = data[: 16 * MiB]
    t_gear = timed(lambda: numpy_gear_candidates(part, secret_gear, int(masks[18])))
    rows = [
        ["pyfastcdc, 64-bit XOR seed", mibs(len(data), t_cut), "", "2^48 effective (see above)"],
        ["bytes.translate (secret permutation), alone", mibs(len(data), t_translate),
         mibs(2 * len(data), t_translate2) + f" ({t_translate * 2 / t_translate2:.2f}x)", ""],
        ["numpy take (secret permutation), alone", mibs(len(data), t_np),
         mibs(2 * len(data), t_np2) + f" ({t_np * 2 / t_np2:.2f}x)", ""],
        ["pyarrow.compute.take (secret permutation), alone", mibs(len(data), t_arrow),
         mibs(2 * len(data), t_arrow2) + f" ({t_arrow * 2 / t_arrow2:.2f}x)", ""],
        ["secret permutation + pyfastcdc seed (translate, then cut)", mibs(len(data), t_both),
         mibs(2 * len(data), t_both2) + f" ({t_both * 2 / t_both2:.2f}x)",
         "log2(256!) + 48 = 1,732 bits; same cut points as table GEAR[perm[b]] ^ seed: " + str(equivalent)],
        ["secret permutation + pyfastcdc seed (pyarrow take, then cut)", mibs(len(data), t_both_arrow),
         mibs(2 * len(data), t_both_arrow2) + f" ({t_both_arrow * 2 / t_both_arrow2:.2f}x)", "the same"],
        ["numpy gear hash, whole random table (hash + candidates only)", mibs(len(part), t_gear), "",
         "16,384 bits"],
    ]
    table(["keying", "MiB/s, 1 thread", "MiB/s, 2 threads", "key space / check"], rows)
    quad = data * 4
    say("GIL: pyfastcdc cutting 64 MiB "
        f"{gil_free(lambda: _chunks(cdc, data))}; bytes.translate of 256 MiB {gil_free(lambda: quad.translate(perm))}; "
        f"pyarrow.compute.take of 256 MiB {gil_free(lambda: arrow_permute(quad))}.")
    say()
    quad = b""                   # freed (not del: the lambdas above name it)

    # Boundary shift: 100 bytes inserted in the middle of 64 MiB.
    insert = random_bytes(100, seed=99)
    mid = len(data) // 2
    changed = data[:mid] + insert + data[mid:]
    rows = []
    for label, fn in (("seed only", lambda d: _chunks(cdc, d)),
                      ("permutation + seed", lambda d: _chunks(cdc, d.translate(perm)))):
        before = {blake3.blake3(data[o: o + n]).digest() for o, n in fn(data)}
        after = [(o, n) for o, n in fn(changed)]
        new = [(o, n) for o, n in after if blake3.blake3(changed[o: o + n]).digest() not in before]
        rows.append([label, len(before), len(after), len(new), f"{sum(n for _, n in new) / MiB:.2f}"])
    # Appending 1 MiB to the end.
    appended = data + random_bytes(MiB, seed=98)
    before = {blake3.blake3(data[o: o + n]).digest() for o, n in _chunks(cdc, data.translate(perm))}
    after = _chunks(cdc, appended.translate(perm))
    new = [(o, n) for o, n in after if blake3.blake3(appended[o: o + n]).digest() not in before]
    rows.append(["1 MiB appended (permutation + seed)", len(before), len(after), len(new),
                 f"{sum(n for _, n in new) / MiB:.2f}"])
    table(["64 MiB random file (NC 2), 100 bytes inserted in the middle", "chunks before", "chunks after",
           "new chunks", "new MiB to store"], rows)


# -- KDF ----------------------------------------------------------------------

def bench_kdf() -> None:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    say("### Password KDF (cryptography)")
    say()
    salt = os.urandom(32)
    rows = []
    for log_n in (15, 16, 17, 18):
        n = 2 ** log_n
        t = timed(lambda: Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(b"correct horse"))
        rows.append(["scrypt", f"n=2^{log_n}, r=8, p=1", f"{128 * n * 8 / MiB:.0f} MiB", f"{t:.2f}"])
    for it, mem_mib, lanes in ((3, 64, 4), (3, 128, 4), (4, 128, 4), (5, 128, 4), (3, 192, 4), (1, 256, 4),
                               (2, 256, 4)):
        t = timed(lambda: Argon2id(salt=salt, length=32, iterations=it, lanes=lanes,
                                   memory_cost=mem_mib * 1024).derive(b"correct horse"))
        rows.append(["Argon2id", f"t={it}, m={mem_mib} MiB, p={lanes}", f"{mem_mib} MiB", f"{t:.2f}"])
    table(["KDF", "parameters", "memory", "seconds (median)"], rows)


# -- manifests ----------------------------------------------------------------

def manifest_table(n: int, seed: int = 3, binary_ids: bool = True):
    """A manifest-like table with ``n`` rows (MANIFEST_SCHEMA columns; ids hex or binary(32))."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from keepflow.tasks.core import manifest

    rng = np.random.default_rng(seed)
    i = np.arange(n)
    top, sub = i // 10_000, (i // 100) % 100
    exts = np.array(["py", "txt", "json", "log", "csv", "md", "so", "png"])
    paths = pc.binary_join_element_wise(
        pa.array(np.char.add("d", top.astype(str))), pa.array(np.char.add("s", sub.astype(str))),
        pa.array(np.char.add(np.char.add("file", i.astype(str)), np.char.add(".", exts[i % len(exts)]))), "/")
    is_dir = (i % 100) == 0
    types = np.where(is_dir, "dir", "file")
    size = np.where(is_dir, 0, rng.lognormal(8.5, 1.5, n).astype(np.int64))
    mtime = 1_700_000_000_000_000_000 + rng.integers(0, 10**16, n)
    raw = rng.bytes(32 * n)
    if binary_ids:
        ids = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(raw)])
        hash_type = pa.binary(32)
    else:
        ids = pa.array(np.frombuffer(raw.hex().encode(), dtype="S64")).cast(pa.string())
        hash_type = pa.string()
    ids = pc.if_else(pa.array(is_dir), pa.nulls(n, hash_type), ids)
    cols = {
        "path": paths, "type": pa.array(types), "size": pa.array(size, pa.int64()),
        "mtime_ns": pa.array(mtime, pa.int64()), "ctime_ns": pa.array(mtime + rng.integers(0, 10**9, n), pa.int64()),
        "inode": pa.array(10_000 + i, pa.int64()), "mode": pa.array(np.where(is_dir, 0o40755, 0o100644), pa.int32()),
        "uid": pa.array(np.full(n, 1000), pa.int64()), "gid": pa.array(np.full(n, 1000), pa.int64()),
        "hash": ids, "link_target": pa.nulls(n, pa.string()),
    }
    schema = pa.schema([f if f.name != "hash" else pa.field("hash", hash_type) for f in manifest.MANIFEST_SCHEMA])
    for f in schema:
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=schema)


FACTS = {"id": "0" * 64, "time": "2026-12-01T00:00:00+00:00", "source": "/home/user", "host": "bench",
         "tags": [], "files": 990_000, "dirs": 10_000, "bytes": 10**12, "keepflow_version": "0.2.0"}


class InProcessKms:
    """A ``pyarrow.parquet.encryption.KmsClient`` that wraps data keys with AES-256-GCM in process."""

    def __new__(cls, master: bytes):
        import pyarrow.parquet.encryption as pe
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        class _Kms(pe.KmsClient):
            def __init__(self, config):
                pe.KmsClient.__init__(self)
                self.aead = AESGCM(master)

            def wrap_key(self, key_bytes, master_key_identifier):
                nonce = os.urandom(12)
                return base64.b64encode(nonce + self.aead.encrypt(nonce, key_bytes, master_key_identifier.encode()))

            def unwrap_key(self, wrapped_key, master_key_identifier):
                raw = base64.b64decode(wrapped_key)
                return self.aead.decrypt(raw[:12], raw[12:], master_key_identifier.encode())

        return _Kms


class WholeFile:
    """Whole-file AEAD around Parquet bytes with a separately encrypted facts block at the end.

    salt(32) | AEAD(body) | AEAD(facts) | u32 facts ciphertext length | magic(8), one key per
    file from HKDF(master, salt), nonces 0 and 1 (the layout of the format 2 specification).
    """

    MAGIC = b"KFMANI02"

    def __init__(self, master: bytes):
        self.master = master

    def _aead(self, salt):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        return AESGCM(HKDF(hashes.SHA256(), 32, salt, b"keepflow bench manifest").derive(self.master))

    def encode(self, parquet_bytes: bytes, facts: bytes) -> bytes:
        salt = os.urandom(32)
        aead = self._aead(salt)
        body = aead.encrypt((0).to_bytes(12, "big"), parquet_bytes, salt)
        tail = aead.encrypt((1).to_bytes(12, "big"), facts, salt)
        return salt + body + tail + struct.pack("<I", len(tail)) + self.MAGIC

    def facts(self, path: str) -> bytes:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(0)
            salt = f.read(32)
            f.seek(max(0, size - 4096))
            tail = f.read()
        (n,) = struct.unpack("<I", tail[-12:-8])
        return self._aead(salt).decrypt((1).to_bytes(12, "big"), tail[-12 - n: -12], salt)

    def body(self, data: bytes) -> bytes:
        (n,) = struct.unpack("<I", data[-12:-8])
        salt = data[:32]
        return self._aead(salt).decrypt((0).to_bytes(12, "big"), data[32: len(data) - 12 - n], salt)


def bench_manifest(workdir: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyarrow.parquet.encryption as pe

    say("### Manifest encryption (pyarrow " + pa.__version__ + ")")
    say()
    master = os.urandom(32)
    facts = json.dumps(FACTS).encode()
    n = 1_000_000
    t_hex = manifest_table(n, binary_ids=False)
    t_bin = manifest_table(n, binary_ids=True)
    meta = {b"keepflow.snapshot": facts}
    t_hex = t_hex.replace_schema_metadata(meta)
    t_bin = t_bin.replace_schema_metadata(meta)

    def to_bytes(t):
        sink = io.BytesIO()
        pq.write_table(t, sink, compression="zstd")
        return sink.getvalue()

    wf = WholeFile(master)
    kms_class = InProcessKms(master)
    factory = pe.CryptoFactory(lambda config: kms_class(config))
    kms_config = pe.KmsConnectionConfig()
    enc_config = pe.EncryptionConfiguration(footer_key="footer", uniform_encryption=True, plaintext_footer=False,
                                            double_wrapping=False, data_key_length_bits=256,
                                            cache_lifetime=dt.timedelta(minutes=10))
    dec_config = pe.DecryptionConfiguration(cache_lifetime=dt.timedelta(minutes=10))
    rows = []
    for label, t in (("hex string ids (format 1)", t_hex), ("binary(32) ids", t_bin)):
        path = os.path.join(workdir, "plain.parquet")
        tw = timed(lambda: pq.write_table(t, path, compression="zstd"))
        tr = timed(lambda: pq.read_table(path))
        rows.append([f"plain Parquet, {label}", f"{os.path.getsize(path) / MiB:.1f}", f"{tw:.2f}", f"{tr:.2f}"])
    t = t_bin
    path = os.path.join(workdir, "whole.kf")

    def write_whole():
        with open(path, "wb") as f:
            f.write(wf.encode(to_bytes(t), facts))

    def read_whole():
        with open(path, "rb") as f:
            return pq.read_table(pa.BufferReader(wf.body(f.read())))

    tw, tr = timed(write_whole), timed(read_whole)
    assert read_whole().equals(t)
    rows.append(["whole-file AES-256-GCM around Parquet, binary(32) ids", f"{os.path.getsize(path) / MiB:.1f}",
                 f"{tw:.2f}", f"{tr:.2f}"])
    path_m = os.path.join(workdir, "modular.parquet")

    def write_modular():
        props = factory.file_encryption_properties(kms_config, enc_config)
        pq.write_table(t, path_m, compression="zstd", encryption_properties=props)

    def read_modular():
        props = factory.file_decryption_properties(kms_config, dec_config)
        return pq.read_table(path_m, decryption_properties=props)

    tw, tr = timed(write_modular), timed(read_modular)
    assert read_modular().equals(t)
    rows.append(["Parquet modular encryption (uniform, encrypted footer), binary(32) ids",
                 f"{os.path.getsize(path_m) / MiB:.1f}", f"{tw:.2f}", f"{tr:.2f}"])
    table([f"{n:,}-row manifest", "MiB", "write s", "read s (all columns)"], rows)

    # DuckDB on a modular-encrypted file, given the file's data key (captured here, as
    # analysis.duckdb(repo) could unwrap it): does it read pyarrow's files in place?
    duck = _duckdb_reads_modular(workdir, t.slice(0, 1000), master)
    say(f"DuckDB reading a pyarrow modular-encrypted file with its footer key: {duck}")
    say()

    # Listing 1,000 snapshots: facts only, no rows.
    small = t.slice(0, 1000)
    dirs = {k: os.path.join(workdir, k) for k in ("plain", "whole", "modular")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    props = factory.file_encryption_properties(kms_config, enc_config)
    small_bytes = to_bytes(small)
    for k in range(1000):
        name = f"{k:05d}"
        with open(os.path.join(dirs["plain"], name), "wb") as f:
            f.write(small_bytes)
        with open(os.path.join(dirs["whole"], name), "wb") as f:
            f.write(wf.encode(small_bytes, facts))
        pq.write_table(small, os.path.join(dirs["modular"], name), compression="zstd",
                       encryption_properties=factory.file_encryption_properties(kms_config, enc_config))
    del props

    def list_plain():
        return [pq.read_schema(os.path.join(dirs["plain"], x)).metadata[b"keepflow.snapshot"]
                for x in sorted(os.listdir(dirs["plain"]))]

    def list_whole():
        return [wf.facts(os.path.join(dirs["whole"], x)) for x in sorted(os.listdir(dirs["whole"]))]

    def list_modular():
        dec = factory.file_decryption_properties(kms_config, dec_config)
        return [pq.read_metadata(os.path.join(dirs["modular"], x), decryption_properties=dec)
                .metadata[b"keepflow.snapshot"] for x in sorted(os.listdir(dirs["modular"]))]

    def list_modular_fresh_keys():
        # What a new process pays: no cached key-encryption keys.
        f2 = pe.CryptoFactory(lambda config: kms_class(config))
        dec = f2.file_decryption_properties(kms_config, pe.DecryptionConfiguration(
            cache_lifetime=dt.timedelta(seconds=0.001)))
        return [pq.read_metadata(os.path.join(dirs["modular"], x), decryption_properties=dec)
                .metadata[b"keepflow.snapshot"] for x in sorted(os.listdir(dirs["modular"]))]

    assert list_plain() == list_whole() == list_modular()
    rows = [["plain Parquet footer (format 1)", f"{timed(list_plain):.3f}"],
            ["whole-file AEAD: 4 KiB tail read + HKDF + decrypt the facts block", f"{timed(list_whole):.3f}"],
            ["modular encryption: decrypt the footer", f"{timed(list_modular):.3f}"],
            ["modular encryption, key cache expiring", f"{timed(list_modular_fresh_keys):.3f}"]]
    # Facts of the 1M-row file: the same tail read, whatever the row count.
    big_facts = timed(lambda: [wf.facts(path) for _ in range(1000)])
    rows.append(["whole-file AEAD, the 1M-row manifest's facts read 1,000 times", f"{big_facts:.3f}"])
    table(["listing the facts of 1,000 local manifests", "seconds"], rows)
    sizes = {k: sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d)) / 1000 for k, d in dirs.items()}
    say("Mean size of a 1,000-row manifest: " + ", ".join(f"{k} {v / KiB:.1f} KiB" for k, v in sizes.items()) + ".")
    say()


def _duckdb_reads_modular(workdir: str, t, master: bytes) -> str:
    try:
        import duckdb
        import pyarrow.parquet as pq
        import pyarrow.parquet.encryption as pe
    except ImportError as exc:
        return f"not tried ({exc})"
    captured: list[bytes] = []
    base = InProcessKms(master)

    class Capturing(base):
        def wrap_key(self, key_bytes, master_key_identifier):
            captured.append(bytes(key_bytes))
            return base.wrap_key(self, key_bytes, master_key_identifier)

    factory = pe.CryptoFactory(lambda config: Capturing(config))
    path = os.path.join(workdir, "duck.parquet")
    pq.write_table(t, path, encryption_properties=factory.file_encryption_properties(
        pe.KmsConnectionConfig(), pe.EncryptionConfiguration(footer_key="footer", uniform_encryption=True,
                                                             double_wrapping=False, data_key_length_bits=256)))
    con = duckdb.connect()
    try:
        con.execute(f"PRAGMA add_parquet_key('k', '{base64.b64encode(captured[-1]).decode()}')")
        got = con.execute(f"SELECT count(*) FROM read_parquet('{path}', "
                          "encryption_config={footer_key: 'k'})").fetchone()
        return f"yes ({got[0]} rows, duckdb {duckdb.__version__}; needs the per-file data key)"
    except Exception as exc:
        return f"no (duckdb {duckdb.__version__}: {str(exc).splitlines()[0][:160]})"


# -- chunk lists --------------------------------------------------------------

def bench_chunklist(workdir: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    say("### Chunk lists: list column against a content table")
    say()
    n = 1_000_000
    t = manifest_table(n, binary_ids=True)
    rng = np.random.default_rng(11)
    files = np.flatnonzero(pc.equal(t["type"], "file").to_numpy(zero_copy_only=False))
    chunked = np.sort(rng.choice(files, size=n // 100, replace=False))
    counts = rng.integers(2, 101, size=len(chunked))
    total_chunks = int(counts.sum())
    chunk_ids = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), total_chunks,
                                                     [None, pa.py_buffer(rng.bytes(32 * total_chunks))])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), chunk_ids)
    content_ids = t["hash"].combine_chunks().take(pa.array(chunked))
    # A: the manifest carries a chunks column, null for unchunked files.
    pos = np.full(n, -1)
    pos[chunked] = np.arange(len(chunked))
    take_idx = pa.array(np.where(pos >= 0, pos, 0))
    col = lists.take(take_idx)
    col = pc.if_else(pa.array(pos >= 0), col, pa.nulls(n, col.type))
    with_list = t.append_column(pa.field("chunks", lists.type), col)
    # B: the manifest as it is (hash = content id) + a content table written once per new content.
    content = pa.table({"content": content_ids, "chunks": lists})
    pa_path = os.path.join(workdir, "manifest_list.parquet")
    pb_path = os.path.join(workdir, "manifest.parquet")
    pc_path = os.path.join(workdir, "contents.parquet")
    pq.write_table(with_list, pa_path, compression="zstd")
    pq.write_table(t, pb_path, compression="zstd")
    pq.write_table(content, pc_path, compression="zstd")
    exploded = pa.table({"content": content_ids.take(pa.array(np.repeat(np.arange(len(chunked)), counts))),
                         "seq": pa.array(np.concatenate([np.arange(c) for c in counts]), pa.int32()),
                         "chunk": chunk_ids})
    pe_path = os.path.join(workdir, "contents_exploded.parquet")
    pq.write_table(exploded, pe_path, compression="zstd")
    no_list = [c for c in with_list.column_names if c != "chunks"]

    def restore_join():
        m = pq.read_table(pb_path)
        c = pq.read_table(pc_path)
        idx = pc.index_in(m["hash"], value_set=c["content"])
        return c["chunks"].take(idx)

    a_full = timed(lambda: pq.read_table(pa_path))
    a_meta = timed(lambda: pq.read_table(pa_path, columns=no_list))
    b_meta = timed(lambda: pq.read_table(pb_path))
    b_join = timed(restore_join)
    size = os.path.getsize
    say(f"{n:,} files, {len(chunked):,} chunked (1%), {total_chunks:,} chunk ids (2-100 per chunked file, "
        f"mean {total_chunks / len(chunked):.1f}).")
    say()
    table(["layout", "stored per snapshot (no change)", "stored once per new content", "read: all but chunks s",
           "read: with chunk lists s"], [
        ["A: `chunks list<binary(32)>` column in the manifest", f"{size(pa_path) / MiB:.1f} MiB", "-",
         f"{a_meta:.2f}", f"{a_full:.2f}"],
        ["B: manifest + content table (content id -> list<binary(32)>)", f"{size(pb_path) / MiB:.1f} MiB",
         f"{size(pc_path) / MiB:.1f} MiB", f"{b_meta:.2f}", f"{b_join:.2f} (read both + join)"],
        ["B': content table exploded (content, seq, chunk rows)", "-", f"{size(pe_path) / MiB:.1f} MiB", "", ""],
    ])


# -- main ---------------------------------------------------------------------

def main(argv=None) -> int:
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated: " + ",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    REPEATS = args.repeats
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    started = time.perf_counter()
    say(f"`python -m bench.format2_choices --only {','.join(chosen)} --repeats {REPEATS}`, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, {mem:.1f} GiB, "
        f"python {platform.python_version()}; load average at start {loadavg()} (the machine is shared).")
    say("GIL probe (the main thread wakes every 0.5 ms while one long call runs in another thread; the longest "
        "it was kept out tells whether the call holds the GIL): " + gil_controls() + ".")
    say()
    workdir = tempfile.mkdtemp(prefix="kf-format2-")
    try:
        for section in chosen:
            t0 = time.perf_counter()
            if section in ("manifest", "chunklist"):
                globals()[f"bench_{section}"](workdir)
            else:
                globals()[f"bench_{section}"]()
            say(f"({section}: {time.perf_counter() - t0:.0f} s, load average now {loadavg()})")
            say()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"Total {time.perf_counter() - started:.0f} s; load average at end {loadavg()}.")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(OUT) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
