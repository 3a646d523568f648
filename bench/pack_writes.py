"""What writing packs into a local repository costs, three ways.

    python -m bench.pack_writes DIR [--mib 2000] [--pack-mib 16] [--repeats 2]

Writes ``--mib`` MiB of random bytes as ``--pack-mib`` MiB files into DIR (on
the file system under test), one way after the other, ``--repeats`` times:

* ``buffered``: ``os.writev`` and close, the page cache keeps every page
  (keepflow before session 13);
* ``synced+dropped``: ``os.writev``, ``fdatasync``, ``posix_fadvise(DONTNEED)``
  (``storage.make_durable``, what keepflow does now);
* ``O_DIRECT``: the same bytes from an aligned buffer, past the page cache.

For each: wall time, this process's system and user CPU, the whole machine's
CPU meanwhile (``/proc/stat``: kernel writeback threads included), and the
``sync`` after the last file (what the buffered writes still owe the disk).
Files are deleted, synced and given 5 s between ways.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import time


def machine_cpu() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def write_all(folder: str, way: str, buf: mmap.mmap, count: int) -> dict[str, float]:
    r0, m0, t0 = resource.getrusage(resource.RUSAGE_SELF), machine_cpu(), time.perf_counter()
    for i in range(count):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if way == "O_DIRECT" else 0)
        fd = os.open(os.path.join(folder, f"{way}-{i}"), flags, 0o666)
        try:
            os.writev(fd, [buf])
            if way == "synced+dropped":
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    s0 = time.perf_counter()
    os.sync()
    return {"wall": wall, "sys": r1.ru_stime - r0.ru_stime, "user": r1.ru_utime - r0.ru_utime,
            "machine": machine_cpu() - m0, "sync": time.perf_counter() - s0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--mib", type=int, default=2000)
    ap.add_argument("--pack-mib", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    folder = os.path.join(args.dir, "pack-writes")
    os.makedirs(folder, exist_ok=True)
    buf = mmap.mmap(-1, args.pack_mib << 20)        # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(args.pack_mib << 20))
    count = args.mib // args.pack_mib
    print(f"{count} files of {args.pack_mib} MiB into {folder}; load {os.getloadavg()}")
    print("| way | repeat | wall | sys (this process) | user | machine CPU | sync after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    try:
        for r in range(1, args.repeats + 1):
            for way in ("buffered", "synced+dropped", "O_DIRECT"):
                m = write_all(folder, way, buf, count)
                print(f"| {way} | {r} | {m['wall']:.2f} s | {m['sys']:.2f} s | {m['user']:.2f} s "
                      f"| {m['machine']:.2f} s | {m['sync']:.2f} s |", flush=True)
                for name in os.listdir(folder):
                    os.unlink(os.path.join(folder, name))
                os.sync()
                time.sleep(5)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
