#!/usr/bin/env python3
"""Random-access benchmark: training formats that do not read files front to back.

One run, side by side on the same bytes: the native files, a cafs mount of a local
repository (read in place) and a cafs mount of the same repository served by a loopback
nginx (``cache_mode=full``, a fresh cache). Each workload runs on a fresh mount, cold:

  records  a record file with its index at the end: the footer, the index, then random
           records by pread (TFRecord/WebDataset shards with an index, parquet's footer
           then column chunks)
  workers  the same, by 4 processes at once, each with its own open file (DataLoader workers)
  rows     random rows of an .npy array through mmap (``np.load(mmap_mode='r')``)
  zip      random members of a zip archive (its central directory is at the end)
  lmdb     random gets from an LMDB database (LMDB reads through mmap)

and prints per workload: microseconds per read and its ratio to native, what the daemon
did (``user.cafs.stats``: FUSE reads, bytes read, bytes fetched, fetched per byte read)
and, remote, what nginx served (GETs, bytes). Native files are made cold with
``POSIX_FADV_DONTNEED`` (this machine may not drop caches), and so are the local
repository's packs before each local run.

    .venv/bin/python benchmarks/random_bench.py               # ~400 MiB of data, about 1 min
    .venv/bin/python benchmarks/random_bench.py --ops 500     # quicker

Results: a table, and JSON in --out (default benchmarks/results/random.json). Every mount
is unmounted and nginx stopped by PID, also on errors; the work directory (default
benchmarks/work-random) is deleted unless --keep, and only if empty or marked as ours.
The exit status is 1 when a workload failed or read bytes other than the native run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import multiprocessing
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import mount_bench as mb
import remote_bench as rb
from common import compile_cafs, parse_size
from mount_bench import MiB, log

HERE = Path(__file__).resolve().parent
MARKER = ".random-bench-work"
REF = "ds"
WORKERS = 4
LMDB_KEYS = 2000
ZIP_MEMBERS = 1500
ROW = 4096  # bytes per row of the array (1024 float32)


# -- the dataset ----------------------------------------------------------------------------


def generate(data: Path, size: int, seed: int) -> None:
    """records.bin (~40% of size), arr.npy (~25%), shards.zip and db/ (~17% each)."""
    import lmdb

    data.mkdir(parents=True)
    rng = random.Random(seed)
    with open(data / "records.bin", "wb") as f:
        index, pos = [], 0
        while pos < size * 2 // 5:
            n = rng.randint(4 << 10, 64 << 10)
            f.write(rng.randbytes(n))
            index.append(struct.pack("<QI", pos, n))
            pos += n
        f.write(b"".join(index) + struct.pack("<QQ", pos, len(index)))
    rows = size // 4 // ROW
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, ROW // 4)}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"  # .npy 1.0: data aligned to 64
    with open(data / "arr.npy", "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
        for _ in range(rows // 256):
            f.write(rng.randbytes(256 * ROW))
        f.write(rng.randbytes(rows % 256 * ROW))
    member = size // 6 // ZIP_MEMBERS
    with zipfile.ZipFile(data / "shards.zip", "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(ZIP_MEMBERS):
            z.writestr(f"m{i:05d}.bin", rng.randbytes(rng.randint(member // 4, member * 7 // 4)))
    value = size // 6 // LMDB_KEYS
    env = lmdb.open(str(data / "db"), map_size=4 * size + (64 << 20), subdir=True)
    with env.begin(write=True) as txn:
        for i in range(LMDB_KEYS):
            txn.put(b"%08d" % i, rng.randbytes(rng.randint(value // 4, value * 7 // 4)))
    env.close()


# -- the workloads (run in a child process: its own page cache view, no state kept) ---------


def _records(root: str, ops: int, seed: int) -> tuple[int, int, str]:
    rng, h = random.Random(seed), hashlib.blake2b(digest_size=16)
    with open(f"{root}/records.bin", "rb", buffering=0) as f:
        fd = f.fileno()
        at, count = struct.unpack("<QQ", os.pread(fd, 16, os.fstat(fd).st_size - 16))
        index = os.pread(fd, count * 12, at)
        got = 0
        for _ in range(ops):
            off, n = struct.unpack_from("<QI", index, rng.randrange(count) * 12)
            b = os.pread(fd, n, off)
            got += len(b)
            h.update(b)
    return ops, got, h.hexdigest()


def _workers(root: str, ops: int, seed: int) -> tuple[int, int, str]:
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        res = pool.starmap(_records, [(root, ops // WORKERS, seed + i) for i in range(WORKERS)])
    return sum(r[0] for r in res), sum(r[1] for r in res), hashlib.blake2b("".join(r[2] for r in res).encode(),
                                                                         digest_size=16).hexdigest()


def _rows(root: str, ops: int, seed: int) -> tuple[int, int, str]:
    rng, h = random.Random(seed), hashlib.blake2b(digest_size=16)
    with open(f"{root}/arr.npy", "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            start = 10 + struct.unpack_from("<H", m, 8)[0]
            rows = (len(m) - start) // ROW
            for _ in range(ops):
                at = start + rng.randrange(rows) * ROW
                h.update(m[at:at + ROW])
        finally:
            m.close()
    return ops, ops * ROW, h.hexdigest()


def _zip(root: str, ops: int, seed: int) -> tuple[int, int, str]:
    rng, h, got = random.Random(seed), hashlib.blake2b(digest_size=16), 0
    with zipfile.ZipFile(f"{root}/shards.zip") as z:
        names = z.namelist()
        for _ in range(ops):
            b = z.read(rng.choice(names))
            got += len(b)
            h.update(b)
    return ops, got, h.hexdigest()


def _lmdb(root: str, ops: int, seed: int) -> tuple[int, int, str]:
    import lmdb

    rng, h, got = random.Random(seed), hashlib.blake2b(digest_size=16), 0
    env = lmdb.open(f"{root}/db", readonly=True, lock=False, subdir=True)
    try:
        with env.begin(buffers=True) as txn:
            for _ in range(ops):
                b = txn.get(b"%08d" % rng.randrange(LMDB_KEYS))
                got += len(b)
                h.update(b)
    finally:
        env.close()
    return ops, got, h.hexdigest()


WORKLOADS: dict[str, Callable[[str, int, int], tuple[int, int, str]]] = {
    "records": _records, "workers": _workers, "rows": _rows, "zip": _zip, "lmdb": _lmdb}
FILES = {"records": ["records.bin"], "workers": ["records.bin"], "rows": ["arr.npy"],
         "zip": ["shards.zip"], "lmdb": ["db/data.mdb"]}


def run_workload(name: str, root: Path, ops: int, seed: int) -> dict[str, Any]:
    """The workload in a fresh child process, timed there."""
    code = ("import json, sys, time; sys.path.insert(0, sys.argv[1]); import random_bench as r; "
            "t = time.perf_counter(); n, b, h = r.WORKLOADS[sys.argv[2]](sys.argv[3], int(sys.argv[4]), 7); "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'ops': n, 'bytes': b, 'digest': h}))")
    out = subprocess.run([sys.executable, "-c", code, str(HERE), name, str(root), str(ops)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{name} on {root} failed: {out.stderr.strip()[-800:]}")
    res: dict[str, Any] = json.loads(out.stdout)
    return res


def evict(paths: list[Path]) -> None:
    """Drop the clean page-cache pages of paths (files, or every file under directories)."""
    for p in paths:
        for f in ([p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# -- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.data, self.repo, self.mnt, self.logs = work / "data", work / "www/repo", work / "mnt", work / "logs"
        self.python = sys.executable
        self.nginx = rb.Nginx(work / "www", work / "nginx")

    def cafs(self, *argv: str) -> list[str]:
        return [self.python, "-m", "cafs.cli", *argv]

    def mount(self, source: str, cache: Path, opts: str) -> mb.Mounted:
        self.mnt.mkdir(exist_ok=True)
        parent_dev = os.stat(self.mnt.parent).st_dev
        lp = self.logs / "mount.log"
        cmd = [self.python, "-m", "cafs.mount_helper", source, str(self.mnt), "-o",
               ",".join(o for o in (f"cache={cache}", opts, self.args.cafs_opts) if o)]
        t0 = time.perf_counter()
        with open(lp, "ab") as out:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"mount failed ({r.returncode}): {mb.tail(lp, 600)}")
        try:
            mb.wait_mounted(self.mnt, parent_dev, None, t0, lp)
            pid = int(os.getxattr(self.mnt, "user.cafs.pid"))
        except BaseException:
            mb.fusermount_u(self.mnt)
            raise
        return mb.Mounted("cafs", self.mnt, pid, None, "cafs.mountd")

    def measure(self, name: str, where: str) -> dict[str, Any]:
        ops = self.args.ops
        if where == "native":
            evict([self.data / f for f in FILES[name]])
            res = run_workload(name, self.data, ops, self.args.seed)
            res["where"] = where
            return res
        cache = self.work / f"cache-{where}-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        if where == "local":
            evict([self.repo / "packs"])
            source = f"{self.repo}#{REF}"
        else:
            source = f"{self.nginx.url}/repo#{REF}"
        m = self.mount(source, cache, "")
        try:
            log0 = self.nginx.log_offset()
            before = mb.cafs_stats(self.mnt) or {}
            res = run_workload(name, self.mnt, ops, self.args.seed)
            after = mb.cafs_stats(self.mnt) or {}
            res["daemon"] = {k: after[k] - before.get(k, 0) for k in
                             ("reads", "bytes_read", "bytes_fetched", "cache_hits", "memory_hits", "cache_misses")
                             if k in after}
            res["daemon_hwm"] = mb.vm_hwm(m.pid)
            if where == "remote":
                res["served"] = self.nginx.served_since(log0)
        finally:
            m.unmount()
            shutil.rmtree(cache, ignore_errors=True)
        res["where"] = where
        return res


def print_report(rows: list[dict[str, Any]]) -> None:
    native = {r["workload"]: r for r in rows if r["where"] == "native"}
    print(f"\n{'workload':9} {'where':7} {'us/read':>9} {'x native':>9} {'FUSE reads':>10} {'read MB':>8} "
          f"{'fetched MB':>10} {'fetched/read':>12} {'GETs':>6} {'sent MB':>8}")
    for r in rows:
        nat = native.get(r["workload"])
        us = r["seconds"] / r["ops"] * 1e6
        x = f"{us / (nat['seconds'] / nat['ops'] * 1e6):.1f}" if nat and r is not nat else ""
        d, s = r.get("daemon", {}), r.get("served", {})
        ratio = f"{d['bytes_fetched'] / d['bytes_read']:.2f}" if d.get("bytes_read") else ""
        print(f"{r['workload']:9} {r['where']:7} {us:9.0f} {x:>9} {d.get('reads', ''):>10} "
              f"{d['bytes_read'] / 1e6 if d else 0:8.0f} {d['bytes_fetched'] / 1e6 if d else 0:10.0f} {ratio:>12} "
              f"{s.get('methods', {}).get('GET', ''):>6} {s['bytes_sent'] / 1e6 if s else 0:8.0f}")
    print("\nfetched/read: bytes_fetched over bytes_read of user.cafs.stats; a random read fetches "
          "the whole chunk it falls in (about 1 MiB on average), so small random reads of a "
          "file larger than the mount's memory and cache are bound to be well above 1.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("400M"), help="dataset size (default 400M)")
    ap.add_argument("--ops", type=int, default=2000, help="random reads per workload (default 2000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--where", default="native,local,remote")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--cafs-opts", default="", help="extra mount options for every cafs mount")
    ap.add_argument("--work", type=Path, default=HERE / "work-random")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "random.json")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        print(f"{work} is not empty and not this benchmark's work directory", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).touch()
    bench = Bench(args, work)
    bench.logs.mkdir()
    compile_cafs()
    rows: list[dict[str, Any]] = []
    failed = False
    try:
        log(f"generating {args.size / MiB:.0f} MiB in {bench.data}")
        generate(bench.data, args.size, args.seed)
        env = dict(os.environ, CAFS_CACHE_DIR=str(work / "import-cache"))
        for cmd in (bench.cafs("init", str(bench.repo)),
                    bench.cafs("import", str(bench.data), str(bench.repo), "--name", REF, "--no-progress")):
            subprocess.run(cmd, check=True, env=env, capture_output=True)
        bench.nginx.start()
        for name in args.workloads.split(","):
            digest = None
            for where in args.where.split(","):
                log(f"{name} {where}")
                try:
                    r = bench.measure(name, where)
                except Exception as exc:
                    log(f"  failed: {exc}")
                    failed = True
                    continue
                r["workload"] = name
                if digest is not None and r["digest"] != digest:
                    log(f"  WRONG BYTES: {name} {where} read other bytes than native")
                    failed = r["wrong_bytes"] = True
                digest = digest or r["digest"]
                rows.append(r)
    finally:
        mb.unmount_all()
        bench.nginx.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "ops": args.ops, "seed": args.seed, "rows": rows,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")
    log(f"results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
