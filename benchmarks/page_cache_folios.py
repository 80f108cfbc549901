#!/usr/bin/env python3
"""How a file's cached pages are held by the kernel: in large folios or in single pages.

Why it matters: a warm read is the kernel copying from its page cache, and the cost of a
read beyond the copy is per folio (``filemap_get_read_batch``, reference counts, access
marks). ext4 caches a file read ahead in large folios; the FUSE page cache of the kernels
measured here holds single 4 KiB pages, for every FUSE filesystem (cafs and squashfuse
alike), so a warm read through any FUSE mount does several times the per-page work of a
native one. This script shows which case a file is in.

For each FILE: reads its first ``--bytes`` (so they are cached), maps them, finds each
page's frame in ``/proc/self/pagemap`` and its flags in ``/proc/kpageflags`` (root only),
and prints how many pages are heads or tails of compound (large) folios, then times
warm reads of the same range with 1 MiB ``readv`` calls (best of ``--passes``).

    .venv/bin/python benchmarks/page_cache_folios.py NATIVE_FILE MOUNTED_FILE ...

Writes nothing; prints one line per file.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import sys
import time

PAGE = mmap.PAGESIZE
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 15, 16
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63


def large_folio_pages(path: str, nbytes: int) -> tuple[int, int]:
    """(pages in large folios, pages looked at) of the first ``nbytes`` of ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        n = min(os.fstat(fd).st_size, nbytes) // PAGE * PAGE
        if n == 0:
            return 0, 0
        base = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = n // PAGE
            for off in range(0, n, PAGE):
                ctypes.c_char.from_address(base + off).value  # map it: only mapped pages have a frame
            with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                pagemap.seek(base // PAGE * 8)
                entries = struct.unpack(f"<{pages}Q", pagemap.read(pages * 8))
            large = seen = 0
            with open("/proc/kpageflags", "rb", buffering=0) as flags:
                for entry in entries:
                    if not entry & PRESENT:
                        continue
                    flags.seek((entry & PFN_MASK) * 8)
                    (bits,) = struct.unpack("<Q", flags.read(8))
                    seen += 1
                    large += bool(bits >> KPF_COMPOUND_HEAD & 1 or bits >> KPF_COMPOUND_TAIL & 1)
            return large, seen
        finally:
            libc.munmap(base, n)
    finally:
        os.close(fd)


def warm_read_mbps(path: str, nbytes: int, passes: int) -> float:
    buf = bytearray(1 << 20)
    best = 0.0
    for _ in range(passes):
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            t0 = time.perf_counter()
            while done < nbytes and (n := os.readv(fd, [buf])):
                done += n
            best = max(best, done / (time.perf_counter() - t0) / 1e6)
        finally:
            os.close(fd)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--bytes", type=int, default=256 << 20, help="bytes of each file to look at (default 256 MiB)")
    p.add_argument("--passes", type=int, default=5, help="warm read passes, best taken (default 5)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root: /proc/kpageflags and page frame numbers are root-only", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        try:
            warm_read_mbps(path, args.bytes, 1)  # cache it
            large, seen = large_folio_pages(path, args.bytes)
            speed = warm_read_mbps(path, args.bytes, args.passes)
        except OSError as exc:
            print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
            continue
        share = large / seen if seen else 0.0
        print(f"{path}: {seen} pages cached, {share:.0%} in large folios; warm read {speed:.0f} MB/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
