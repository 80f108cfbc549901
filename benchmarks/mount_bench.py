#!/usr/bin/env python3
"""Mount benchmark: cafs against the native directory, squashfuse and ratarmount.

One run, the same generated tree for everyone:

  native       the generated directory itself
  squashfuse   an image of it made by mksquashfs (defaults, -noappend -no-progress)
  ratarmount   a plain tar of it (its SQLite index built once beforehand)
  cafs         a repository made by `cafs init` + `cafs import`, mounted three ways:
               "cafs in place" (cache_mode=auto, which for a local repository reads the
               packs in place) on a fresh cache directory; "cafs empty" (cache_mode=full)
               on a fresh cache directory; "cafs filled", the same cache directory again
               after the empty pass has read everything through it, remounted

Each pass: mount (timed, kernel caches dropped first); os.walk + os.lstat of every file
cold, then warm; the daemon's VmHWM; `find -type f | wc -l` cold, then warm; sequential
read of the large files with 1 MiB reads, cold then warm; 8 threads reading the small
files in a shuffled order (fixed seed), cold then warm; a checksum of a sample against
the native files; unmount; then a second, warm mount is timed and unmounted. "Cold"
means `sync; echo 3 > /proc/sys/vm/drop_caches` just before; "warm" means again right
after, with no drop (the best of WARM_PASSES passes).

Prints a table, ratios (against native, and cafs against squashfuse and ratarmount) and
pass/fail against the issue's targets; writes everything as JSON to --out.

    .venv/bin/python benchmarks/mount_bench.py --quick     # a small run, to check it works
    .venv/bin/python benchmarks/mount_bench.py             # the full run

Needs root (to drop caches), squashfs-tools, squashfuse, fuse3 and ratarmount; run
benchmarks/setup first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import page_cache_folios
from common import compile_cafs, human, parse_size

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARKER = ".mount-bench-work"
RATARMOUNT_VENV = "ratarmount-venv"  # kept when the work directory is cleaned

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SMALL_SIZE = 100 * 1000  # bytes of each small file ("100 KB")
FILES_PER_DIR = 1000
TINY_MIN, TINY_MAX = 64, 1024
READ_BLOCK = MiB
THREADS = 8
WARM_PASSES = 2  # warm figures are the best of this many passes right after the cold one
SHUFFLE_SEED = 20240611
GEN_BLOCK = 64 * MiB
MOUNT_TIMEOUT = 120.0
UNMOUNT_TIMEOUT = 60.0
CAFS_CACHE_SIZE = "20G"
MB = 1e6  # MB/s are 10^6 bytes per second

# Targets from the issue.
TARGET_WARM_SEQ_VS_NATIVE = 0.9
FOLIO_SAMPLE = 256 * 1024 * 1024  # bytes of the first large file whose page cache folios are looked at
TARGET_COLD_SEQ_VS_SQUASHFUSE = 1.0
TARGET_SMALL_COLD_VS_RATARMOUNT = 1.0
TARGET_SMALL_WARM_VS_NATIVE = 0.5
TARGET_MOUNT_SECONDS = 1.0
TARGET_RSS_BYTES = 200 * 1000 * 1000
# What the issue measured for the peers (for comparison with this run's peers).
QUOTED = {
    "squashfuse large cold x native": 0.55,
    "squashfuse large warm x native": 0.39,
    "ratarmount large cold x native": 0.87,
    "ratarmount large warm x native": 0.09,
    "ratarmount small cold files/s": 2500,
    "squashfuse small cold files/s": 1750,
    "native small cold files/s": 6600,
    "squashfuse stat x native time": 6.0,
}

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the dataset --------------------------------------------------------------------------


@dataclass
class Dataset:
    small: list[str]  # relative paths, each SMALL_SIZE bytes
    large: list[tuple[str, int]]  # relative path, size
    tiny: list[tuple[str, int]]
    seed: int

    @property
    def files(self) -> int:
        return len(self.small) + len(self.large) + len(self.tiny)

    @property
    def bytes(self) -> int:
        return (len(self.small) * SMALL_SIZE + sum(s for _, s in self.large)
                + sum(s for _, s in self.tiny))

    def summary(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "small_files": len(self.small),
                "small_file_bytes": SMALL_SIZE, "large_files": [s for _, s in self.large],
                "tiny_files": len(self.tiny), "files_per_dir": FILES_PER_DIR, "seed": self.seed}


def plan_dataset(small_files: int, stat_files: int, large_size: int, seed: int) -> Dataset:
    rng = random.Random(f"{seed}:plan")
    small = [f"small/d{i // FILES_PER_DIR:03d}/f{i:06d}.bin" for i in range(small_files)]
    n_large = min(4, max(2, round(large_size / (512 * MiB)))) if large_size > 0 else 0
    large = []
    for i in range(n_large):
        size = large_size // n_large + (large_size % n_large if i == n_large - 1 else 0)
        large.append((f"large/large-{i}.bin", size))
    n_tiny = max(0, stat_files - small_files - n_large)
    tiny = [(f"tiny/d{i // FILES_PER_DIR:03d}/t{i:06d}", rng.randint(TINY_MIN, TINY_MAX))
            for i in range(n_tiny)]
    return Dataset(small, large, tiny, seed)


def _gen_task(task: tuple[Any, ...]) -> int:
    kind = task[0]
    if kind == "files":  # one directory of small or tiny files
        _, data, seed, items = task
        written = 0
        for rel, size in items:
            data_bytes = random.Random(f"{seed}:{rel}").randbytes(size)
            with open(os.path.join(data, rel), "wb") as f:
                f.write(data_bytes)
            written += size
        return written
    _, data, seed, rel, offset, length = task  # one block of a large file
    rng = random.Random(f"{seed}:{rel}:{offset}")
    with open(os.path.join(data, rel), "r+b") as f:
        f.seek(offset)
        left = length
        while left:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n
    return length


def _worker_signals() -> None:
    # the pool ends its workers with SIGTERM: not the parent's handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def generate(data: Path, ds: Dataset, jobs: int) -> None:
    tasks: list[tuple[Any, ...]] = []
    for rel, size in ds.large:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(data / rel, "wb") as f:
            f.truncate(size)
        for off in range(0, size, GEN_BLOCK):
            tasks.append(("block", str(data), ds.seed, rel, off, min(GEN_BLOCK, size - off)))
    by_dir: dict[str, list[tuple[str, int]]] = {}
    for rel in ds.small:
        by_dir.setdefault(os.path.dirname(rel), []).append((rel, SMALL_SIZE))
    for rel, size in ds.tiny:
        by_dir.setdefault(os.path.dirname(rel), []).append((rel, size))
    for d, items in by_dir.items():
        (data / d).mkdir(parents=True, exist_ok=True)
        tasks.append(("files", str(data), ds.seed, items))
    with multiprocessing.Pool(jobs, initializer=_worker_signals) as pool:
        for _ in pool.imap_unordered(_gen_task, tasks):
            pass


# -- commands, mounts and processes -------------------------------------------------------


def run(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
        timeout: float = 3600) -> float:
    """Run a command to completion, output to log_path; seconds; raises on failure."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            _kill_group(proc)
            raise
    secs = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited with status {rc} (see {log_path}): "
                           f"{tail(log_path, 600)}")
    return secs


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else 0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def is_mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        target = str(mnt)
        return any(line.split()[4] == target for line in f)


def wait_mounted(mnt: Path, parent_dev: int, proc: subprocess.Popen[bytes] | None,
                 t0: float, log_path: Path) -> float:
    """Seconds from t0 until mnt shows a new st_dev and can be listed."""
    deadline = t0 + MOUNT_TIMEOUT
    while True:
        try:
            if os.stat(mnt).st_dev != parent_dev:
                os.listdir(mnt)
                return time.perf_counter() - t0
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the mount process exited with status {proc.returncode} before "
                               f"the mount answered: {tail(log_path, 600)}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{mnt}: not mounted after {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.001)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pid_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def vm_hwm(pid: int | None) -> int | None:
    """Peak resident set size of a process (VmHWM), bytes."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far, seconds."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def fusermount_u(mnt: Path) -> bool:
    for attempt in range(20):
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        if r.returncode == 0 or not is_mounted(mnt):
            return True
        time.sleep(0.25 * (attempt + 1))
    log(f"warning: fusermount3 -u {mnt} keeps failing: {r.stderr.strip()}; unmounting lazily")
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    return False


class Mounted:
    """A mount this benchmark made; unmount() is idempotent and stops the daemon."""

    active: list[Mounted] = []

    def __init__(self, name: str, mnt: Path, pid: int | None,
                 proc: subprocess.Popen[bytes] | None, marker: str) -> None:
        self.name, self.mnt, self.pid, self.proc, self.marker = name, mnt, pid, proc, marker
        self.done = False
        Mounted.active.append(self)

    def unmount(self) -> None:
        if self.done:
            return
        self.done = True
        if is_mounted(self.mnt):
            fusermount_u(self.mnt)
        deadline = time.monotonic() + UNMOUNT_TIMEOUT
        if self.proc is not None:
            try:
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"warning: {self.name} (pid {self.proc.pid}) still running after unmount; killing it")
                self.proc.kill()
                self.proc.wait()
        elif self.pid is not None:
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(self.pid) and self.marker in pid_cmdline(self.pid):
                log(f"warning: {self.name} daemon (pid {self.pid}) still running after unmount; killing it")
                os.kill(self.pid, signal.SIGKILL)
        Mounted.active.remove(self)


def unmount_all() -> None:
    for m in list(Mounted.active):
        try:
            m.unmount()
        except Exception as exc:  # keep going: every mount must go
            log(f"warning: unmounting {m.mnt}: {exc}")


# -- systems ------------------------------------------------------------------------------


@dataclass
class System:
    name: str  # row label
    kind: str  # native, squashfuse, ratarmount, cafs
    cafs_opts: str = ""
    cache_dir: Path | None = None
    notes: str = ""


class Env:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.data = work / "data"
        self.repo = work / "repo"
        self.image = work / "data.squashfs"
        self.tar = work / "data.tar"
        self.index = work / "data.tar.index.sqlite"
        self.mnt = work / "mnt"
        self.logs = work / "logs"
        self.python = sys.executable
        self.ratarmount = find_ratarmount(work)

    def cafs(self, *argv: str) -> list[str]:
        return [self.python, "-m", "cafs.cli", *argv]

    def mount(self, s: System) -> tuple[Mounted | None, float]:
        """Mount system s on self.mnt; (the mount, seconds). Native: (None, 0)."""
        if s.kind == "native":
            return None, 0.0
        self.mnt.mkdir(exist_ok=True)
        if is_mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is mounted already")
        parent_dev = os.stat(self.mnt.parent).st_dev
        log_path = self.logs / f"mount-{s.kind}.log"
        with open(log_path, "ab") as out:
            if s.kind == "cafs":
                assert s.cache_dir is not None
                cmd = [self.python, "-m", "cafs.mount_helper", f"{self.repo}#bench", str(self.mnt),
                       "-o", f"cache={s.cache_dir},cache_size={CAFS_CACHE_SIZE}{s.cafs_opts}"]
                out.write(f"$ {' '.join(cmd)}\n".encode())
                out.flush()
                t0 = time.perf_counter()
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                if r.returncode != 0:
                    raise RuntimeError(f"cafs mount failed with status {r.returncode}: "
                                       f"{tail(log_path, 600)}")
                try:
                    secs = wait_mounted(self.mnt, parent_dev, None, t0, log_path)
                    pid: int | None = int(os.getxattr(self.mnt, "user.cafs.pid"))
                except (OSError, ValueError) as exc:
                    log(f"warning: no daemon pid from the user.cafs.pid xattr: {exc}")
                    pid = None
                except BaseException:
                    if is_mounted(self.mnt):
                        fusermount_u(self.mnt)
                    raise
                return Mounted(s.name, self.mnt, pid, None, "cafs.mountd"), secs
            if s.kind == "squashfuse":
                cmd = ["squashfuse", "-f", str(self.image), str(self.mnt)]
            elif s.kind == "ratarmount":
                cmd = [*self.ratarmount, "-f", "--index-file", str(self.index), str(self.tar),
                       str(self.mnt)]
            else:
                raise ValueError(s.kind)
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        try:
            secs = wait_mounted(self.mnt, parent_dev, proc, t0, log_path)
        except BaseException:
            if is_mounted(self.mnt):
                fusermount_u(self.mnt)
            _kill_group(proc)
            raise
        return Mounted(s.name, self.mnt, proc.pid, proc, ""), secs

    def root(self, s: System) -> Path:
        return self.data if s.kind == "native" else self.mnt


def find_ratarmount(work: Path) -> list[str] | None:
    for cand in (work / RATARMOUNT_VENV / "bin" / "ratarmount",):
        if cand.exists():
            return [str(cand)]
    found = shutil.which("ratarmount")
    return [found] if found else None


# -- measurements -------------------------------------------------------------------------


def time_find(root: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run(f"find '{root}' -type f | wc -l", shell=True, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"find failed: {r.stderr.strip()}")
    return secs, int(r.stdout.strip())


def time_walk(root: Path) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    for d, _dirs, files in os.walk(root):
        for name in files:
            os.lstat(os.path.join(d, name))
            n += 1
    return time.perf_counter() - t0, n


def seq_read(paths: list[Path]) -> tuple[float, int]:
    buf = bytearray(READ_BLOCK)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def small_read(paths: list[Path], threads: int) -> tuple[float, int, int, list[str]]:
    """threads readers take the next path from the shuffled list; (seconds, files, bytes, errors)."""
    it = iter(paths)
    lock = threading.Lock()
    counts = [0] * threads
    nbytes = [0] * threads
    errors: list[str] = []

    def worker(i: int) -> None:
        buf = bytearray(128 * KiB)
        while True:
            with lock:
                p = next(it, None)
            if p is None:
                return
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    while n := os.readv(fd, [buf]):
                        nbytes[i] += n
                finally:
                    os.close(fd)
                counts[i] += 1
            except OSError as exc:
                with lock:
                    errors.append(f"{p}: {exc}")

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, sum(counts), sum(nbytes), errors


def sample_digest(root: Path, ds: Dataset) -> str:
    """sha256 over 16 small files, 16 tiny ones and the first MiB of each large file."""
    h = hashlib.sha256()
    rng = random.Random(f"{ds.seed}:sample")
    rels = rng.sample(ds.small, min(16, len(ds.small)))
    rels += [r for r, _ in rng.sample(ds.tiny, min(16, len(ds.tiny)))]
    for rel in rels:
        h.update((root / rel).read_bytes())
    for rel, _ in ds.large:
        with open(root / rel, "rb") as f:
            h.update(f.read(MiB))
    return h.hexdigest()


def cafs_stats(mnt: Path) -> dict[str, Any] | None:
    try:
        return json.loads(os.getxattr(mnt, "user.cafs.stats"))
    except (OSError, ValueError):
        return None


def folio_share(path: Path) -> float | None:
    """Which share of ``path``'s cached pages the kernel holds in large folios (root only;
    None if it cannot be read). A warm read is the kernel's copy out of these pages, and
    its cost beyond the copy is per folio: see page_cache_folios.py."""
    try:
        large, seen = page_cache_folios.large_folio_pages(str(path), FOLIO_SAMPLE)
    except OSError:
        return None
    return large / seen if seen else None


def measure(env: Env, s: System, ds: Dataset, can_drop: bool) -> dict[str, Any]:
    """One pass over system s: mount, measure everything, unmount, time a warm mount."""
    res: dict[str, Any] = {"system": s.name, "kind": s.kind, "notes": s.notes}
    root_rel_small = [Path(p) for p in ds.small]
    shuffled = list(root_rel_small)
    random.Random(SHUFFLE_SEED).shuffle(shuffled)
    cold = "cold" if can_drop else "cold (caches NOT dropped)"

    def drop() -> None:
        if can_drop:
            drop_caches()

    drop()
    m, res["mount_s"] = env.mount(s)
    try:
        root = env.root(s)
        pid = m.pid if m else None
        res["pid"] = pid
        if m is not None:
            log(f"  {s.name}: mounted in {res['mount_s']:.3f} s (pid {pid})")

        cpu: dict[str, float | None] = {}
        res["daemon_cpu_s"] = cpu

        def cpu_since(name: str, c0: float | None) -> None:
            c1 = cpu_seconds(pid)
            cpu[name] = None if c0 is None or c1 is None else c1 - c0

        drop()
        c0 = cpu_seconds(pid)
        res["stat_cold_s"], res["stat_count"] = time_walk(root)
        cpu_since("stat_cold", c0)
        res["stat_warm_s"], _ = time_walk(root)
        res["rss_after_walk"] = vm_hwm(pid)
        log(f"  walk+lstat {cold}: {res['stat_cold_s']:.2f} s, warm {res['stat_warm_s']:.2f} s"
            + (f"; VmHWM {res['rss_after_walk'] / MB:.0f} MB" if res["rss_after_walk"] else ""))

        drop()
        c0 = cpu_seconds(pid)
        res["find_cold_s"], res["find_count"] = time_find(root)
        cpu_since("find_cold", c0)
        res["find_warm_s"], _ = time_find(root)
        log(f"  find {cold}: {res['find_cold_s']:.2f} s, warm {res['find_warm_s']:.2f} s")
        if res["find_count"] != ds.files or res["stat_count"] != ds.files:
            res.setdefault("errors", []).append(
                f"expected {ds.files} files, find saw {res['find_count']}, walk {res['stat_count']}")

        large = [root / rel for rel, _ in ds.large]
        large_bytes = sum(sz for _, sz in ds.large)
        if large:
            drop()
            c0 = cpu_seconds(pid)
            passes = [seq_read(large)]
            cpu_since("large_cold", c0)
            c0 = cpu_seconds(pid)
            before = cafs_stats(root)
            passes += [seq_read(large) for _ in range(WARM_PASSES)]
            cpu_since("large_warm", c0)
            after = cafs_stats(root)
            if before and after:  # 0: the kernel alone served the warm passes
                res["large_warm_daemon_reads"] = after["reads"] - before["reads"]
            res["large_folio_share"] = folio_share(large[0])
            speeds = [n / MB / secs for secs, n in passes]
            res["large_cold_mbps"] = speeds[0]
            res["large_warm_mbps"] = max(speeds[1:])
            res["large_passes_mbps"] = speeds
            if any(n != large_bytes for _, n in passes):
                res.setdefault("errors", []).append(
                    f"large files: read {[n for _, n in passes]} bytes, expected {large_bytes}")
            log(f"  large {cold}: {speeds[0]:.0f} MB/s, warm {', '.join(f'{v:.0f}' for v in speeds[1:])} MB/s")

        paths = [root / p for p in shuffled]
        if paths:
            drop()
            c0 = cpu_seconds(pid)
            runs = [small_read(paths, THREADS)]
            cpu_since("small_cold", c0)
            c0 = cpu_seconds(pid)
            runs += [small_read(paths, THREADS) for _ in range(WARM_PASSES)]
            cpu_since("small_warm", c0)
            speeds = [files / secs for secs, files, _, _ in runs]
            res["small_cold_fps"] = speeds[0]
            res["small_warm_fps"] = max(speeds[1:])
            res["small_passes_fps"] = speeds
            expect = len(paths) * SMALL_SIZE
            errs = [e for _, _, _, es in runs for e in es]
            if errs or any(nb != expect for _, _, nb, _ in runs):
                res.setdefault("errors", []).append(
                    f"small files: {len(errs)} errors (first: {errs[:1]}), "
                    f"read {[nb for _, _, nb, _ in runs]} bytes, expected {expect} each pass")
            log(f"  small {cold}: {speeds[0]:.0f} files/s, warm {', '.join(f'{v:.0f}' for v in speeds[1:])} files/s")

        res["digest"] = sample_digest(root, ds)
        res["rss_end"] = vm_hwm(pid)
        if s.kind == "cafs":
            res["cafs_stats"] = cafs_stats(root)
    finally:
        if m is not None:
            m.unmount()
    if m is not None:
        # a second mount with warm caches (for cafs: the cache directory this pass left)
        m2, res["mount_warm_s"] = env.mount(s)
        m2.unmount()
    else:
        res["mount_warm_s"] = 0.0
    return res


# -- the report ---------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


SPEED = ("large_cold_mbps", "large_warm_mbps", "small_cold_fps", "small_warm_fps")
TIMES = ("mount_s", "mount_warm_s", "find_cold_s", "stat_cold_s", "stat_warm_s")
COLUMNS = [  # key, header, format, scale
    ("mount_s", "mount s", ".3f", 1),
    ("mount_warm_s", "(warm)", ".3f", 1),
    ("stat_cold_s", "stat cold s", ".2f", 1),
    ("stat_warm_s", "stat warm s", ".2f", 1),
    ("find_cold_s", "find cold s", ".2f", 1),
    ("large_cold_mbps", "large cold MB/s", ".0f", 1),
    ("large_warm_mbps", "large warm MB/s", ".0f", 1),
    ("small_cold_fps", "small cold f/s", ".0f", 1),
    ("small_warm_fps", "small warm f/s", ".0f", 1),
    ("rss_after_walk", "RSS walk MB", ".0f", 1 / MB),
    ("rss_end", "RSS end MB", ".0f", 1 / MB),
]
RATIO_COLUMNS = [  # key, header; speeds: x / ref (higher is better); times: x / ref (lower is better)
    ("stat_cold_s", "stat cold (time)"),
    ("stat_warm_s", "stat warm (time)"),
    ("find_cold_s", "find cold (time)"),
    ("large_cold_mbps", "large cold"),
    ("large_warm_mbps", "large warm"),
    ("small_cold_fps", "small cold"),
    ("small_warm_fps", "small warm"),
]


def build_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["system"]: r for r in rows}
    native = by.get("native")
    peers = {k: by.get(k) for k in ("squashfuse", "ratarmount")}
    cafs_rows = [r for r in rows if r["kind"] == "cafs"]
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for ref_name, ref in [("native", native), *peers.items()]:
        if ref is None:
            continue
        targets = rows if ref_name == "native" else cafs_rows
        ratios[ref_name] = {
            r["system"]: {k: ratio(r.get(k), ref.get(k)) for k, _ in RATIO_COLUMNS}
            for r in targets if r is not ref
        }
    for name, r in by.items():
        if name in ratios.get("native", {}):
            ratios["native"][name]["rss_after_walk"] = None
    targets = []

    def add(key: str, text: str, value_of: Any, ok_of: Any, own: str) -> None:
        cells = {}
        for r in cafs_rows:
            v = value_of(r)
            cells[r["system"]] = {"value": v, "pass": None if v is None else bool(ok_of(v))}
        targets.append({"key": key, "target": text, "judged_on": own, "cells": cells})

    nat = native or {}
    sq = peers["squashfuse"] or {}
    ra = peers["ratarmount"] or {}
    add("warm_seq", f"warm sequential read >= {TARGET_WARM_SEQ_VS_NATIVE}x native",
        lambda r: ratio(r.get("large_warm_mbps"), nat.get("large_warm_mbps")),
        lambda v: v >= TARGET_WARM_SEQ_VS_NATIVE, "every cafs row")
    add("cold_seq", f"cold sequential read (from the cafs cache) >= {TARGET_COLD_SEQ_VS_SQUASHFUSE}x squashfuse",
        lambda r: ratio(r.get("large_cold_mbps"), sq.get("large_cold_mbps")),
        lambda v: v >= TARGET_COLD_SEQ_VS_SQUASHFUSE, "cafs filled")
    add("small_cold", f"small files cold >= {TARGET_SMALL_COLD_VS_RATARMOUNT}x ratarmount",
        lambda r: ratio(r.get("small_cold_fps"), ra.get("small_cold_fps")),
        lambda v: v >= TARGET_SMALL_COLD_VS_RATARMOUNT, "every cafs row")
    add("small_warm", f"small files warm >= {TARGET_SMALL_WARM_VS_NATIVE}x native",
        lambda r: ratio(r.get("small_warm_fps"), nat.get("small_warm_fps")),
        lambda v: v >= TARGET_SMALL_WARM_VS_NATIVE, "every cafs row")
    add("stat", "stat of every file (cold) faster than squashfuse (time ratio < 1)",
        lambda r: ratio(r.get("stat_cold_s"), sq.get("stat_cold_s")),
        lambda v: v < 1, "every cafs row")
    add("mount", f"mount (caches dropped) in under {TARGET_MOUNT_SECONDS:g} s",
        lambda r: r.get("mount_s"), lambda v: v < TARGET_MOUNT_SECONDS, "every cafs row")
    add("rss", f"daemon peak RSS < {TARGET_RSS_BYTES / MB:.0f} MB after walking every file",
        lambda r: r.get("rss_after_walk"), lambda v: v < TARGET_RSS_BYTES, "every cafs row")
    return {"ratios": ratios, "targets": targets}


def print_report(rows: list[dict[str, Any]], rep: dict[str, Any], ds: Dataset,
                 build: dict[str, Any], can_drop: bool) -> None:
    print()
    print(f"dataset: {ds.files} files, {human(ds.bytes)}: {len(ds.small)} small files of "
          f"{SMALL_SIZE // 1000} KB, {len(ds.large)} large ({', '.join(human(s) for _, s in ds.large)}), "
          f"{len(ds.tiny)} tiny ({TINY_MIN}-{TINY_MAX} B); {os.cpu_count()} CPUs")
    print("build: " + ", ".join(f"{k} {v:.1f} s" for k, v in build["seconds"].items())
          + "; sizes: " + ", ".join(f"{k} {human(v)}" for k, v in build["bytes"].items()))
    if not can_drop:
        print("WARNING: not root: kernel caches were NOT dropped, 'cold' figures are warm")
    w = max(len(r["system"]) for r in rows) + 2
    print()
    print("system".ljust(w) + "".join(h.rjust(max(len(h), 7) + 2) for _, h, _, _ in COLUMNS))
    for r in rows:
        cells = []
        for key, h, spec, scale in COLUMNS:
            v = r.get(key)
            cells.append(fmt(None if v is None else v * scale, spec).rjust(max(len(h), 7) + 2))
        print(r["system"].ljust(w) + "".join(cells))
    for r in rows:
        for e in r.get("errors", []):
            print(f"ERROR {r['system']}: {e}")
    ref_digest = next((r.get("digest") for r in rows if r["kind"] == "native"), None)
    for r in rows:
        if ref_digest and r.get("digest") not in (None, ref_digest):
            print(f"ERROR {r['system']}: sample checksum differs from the native files")

    for ref_name, table in rep["ratios"].items():
        if not table:
            continue
        print()
        print(f"ratios vs {ref_name} (speeds: x {ref_name}'s, higher is better; "
              f"(time): x {ref_name}'s time, lower is better)")
        print("system".ljust(w) + "".join(h.rjust(len(h) + 2) for _, h in RATIO_COLUMNS))
        for name, vals in table.items():
            print(name.ljust(w) + "".join(fmt(vals.get(k), ".2f", "x").rjust(len(h) + 2)
                                          for k, h in RATIO_COLUMNS))

    cafs_names = [r["system"] for r in rows if r["kind"] == "cafs"]
    if rep["targets"] and cafs_names:
        print()
        tw = max(len(t["target"]) for t in rep["targets"]) + 2
        cw = max(16, *(len(n) + 2 for n in cafs_names))
        print("target".ljust(tw) + "".join(n.rjust(cw) for n in cafs_names))
        for t in rep["targets"]:
            cells = []
            for n in cafs_names:
                c = t["cells"].get(n, {})
                v = c.get("value")
                if v is None:
                    txt = "-"
                elif t["key"] == "mount":
                    txt = f"{v:.3f} s"
                elif t["key"] == "rss":
                    txt = f"{v / MB:.0f} MB"
                else:
                    txt = f"{v:.2f}x"
                if c.get("pass") is not None:
                    txt += " PASS" if c["pass"] else " FAIL"
                if t["judged_on"] != "every cafs row" and n != t["judged_on"]:
                    txt = f"({txt})"
                cells.append(txt.rjust(cw))
            print(t["target"].ljust(tw) + "".join(cells))
        print("(a cell in parentheses is shown for information: that target is judged on "
              "another row)")
    shares = [(r["system"], r["large_folio_share"]) for r in rows if r.get("large_folio_share") is not None]
    if shares:
        print()
        print("warm large reads are the kernel copying out of its page cache; pages held in large "
              "folios: " + ", ".join(f"{n} {v:.0%}" for n, v in shares))
    reads = [(r["system"], r["large_warm_daemon_reads"]) for r in rows if "large_warm_daemon_reads" in r]
    if reads:
        print("cafs daemon read requests during the warm passes: "
              + ", ".join(f"{n} {v}" for n, v in reads)
              + " (0: the daemon took no part, the warm figure is the kernel's own copy)")


# -- main ---------------------------------------------------------------------------------


def prepare_work(work: Path) -> None:
    if work.exists():
        others = [p.name for p in work.iterdir() if p.name not in (MARKER, RATARMOUNT_VENV)]
        if others and not (work / MARKER).exists():
            raise SystemExit(f"{work}: not empty and not a mount benchmark work directory "
                             f"(no {MARKER}); choose another --work")
        for name in others:
            p = work / name
            if is_mounted(p):
                raise SystemExit(f"{p} is a mountpoint: unmount it first (fusermount3 -u {p})")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("work directory of benchmarks/mount_bench.py; deleted after a run\n")


def clean_work(work: Path) -> None:
    """Delete the work directory, except the ratarmount venv that benchmarks/setup made."""
    for p in work.iterdir():
        if p.name == RATARMOUNT_VENV:
            continue
        if is_mounted(p):
            log(f"warning: {p} still mounted; not deleting the work directory")
            return
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if not (work / RATARMOUNT_VENV).exists():
        work.rmdir()


def versions(env: Env) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("squashfuse", "squashfs-tools", "fuse3"):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        out[pkg] = r.stdout.strip() or None
    if env.ratarmount:
        r = subprocess.run([*env.ratarmount, "--version"], capture_output=True, text=True)
        out["ratarmount"] = (r.stdout.strip().splitlines() or [None])[0]
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    out["cafs"] = r.stdout.strip() or None
    out["python"] = platform.python_version()
    out["kernel"] = platform.release()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=HERE / "work-mount", help="work directory (default %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "mount.json", help="JSON results (default %(default)s)")
    p.add_argument("--small-files", type=int, default=20000, help="small files of 100 KB (default %(default)s)")
    p.add_argument("--stat-files", type=int, default=100000,
                   help="files in the tree in all, for find/stat; tiny files make up the rest (default %(default)s)")
    p.add_argument("--large-size", type=parse_size, default=2 * GiB, help="bytes in 2-4 large files (default 2G)")
    p.add_argument("--quick", action="store_true", help="a small run: 2000 small files, 10000 in all, 256M large")
    p.add_argument("--systems", default="native,squashfuse,ratarmount,cafs",
                   help="comma-separated subset of native,squashfuse,ratarmount,cafs (default: all)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes generating data")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    compile_cafs()
    if args.quick:
        args.small_files, args.stat_files, args.large_size = 2000, 10000, 256 * MiB
    systems_wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems_wanted) - {"native", "squashfuse", "ratarmount", "cafs"}
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")

    work = args.work.absolute()
    can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    if not can_drop:
        log("warning: cannot write /proc/sys/vm/drop_caches (not root?): cold figures will be warm")
    missing = [t for t, need in (("mksquashfs", "squashfuse"), ("squashfuse", "squashfuse"),
                                 ("fusermount3", None), ("tar", "ratarmount"))
               if (need is None or need in systems_wanted) and not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; run benchmarks/setup")
    if subprocess.run([sys.executable, "-c", "import cafs, pyfuse3"], capture_output=True).returncode:
        raise SystemExit(f"{sys.executable} cannot import cafs and pyfuse3: run with .venv/bin/python")

    prepare_work(work)
    env = Env(args, work)
    if "ratarmount" in systems_wanted and not env.ratarmount:
        raise SystemExit(f"ratarmount not found in {work / RATARMOUNT_VENV} or on PATH; run benchmarks/setup")
    env.logs.mkdir()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    build: dict[str, Any] = {"seconds": {}, "bytes": {}}
    ds = plan_dataset(args.small_files, args.stat_files, args.large_size, args.seed)
    failures: dict[str, str] = {}
    try:
        log(f"generating {ds.files} files, {human(ds.bytes)} in {env.data}")
        t0 = time.perf_counter()
        env.data.mkdir()
        generate(env.data, ds, args.jobs)
        os.sync()
        build["seconds"]["generate"] = time.perf_counter() - t0
        build["bytes"]["data"] = du_bytes(env.data)

        systems: list[System] = []
        if "native" in systems_wanted:
            systems.append(System("native", "native"))
        if "squashfuse" in systems_wanted:
            log("mksquashfs")
            build["seconds"]["mksquashfs"] = run(
                ["mksquashfs", str(env.data), str(env.image), "-noappend", "-no-progress"],
                env.logs / "mksquashfs.log")
            build["bytes"]["squashfs"] = env.image.stat().st_size
            systems.append(System("squashfuse", "squashfuse"))
        if "ratarmount" in systems_wanted:
            log("tar, then ratarmount's index (a first mount)")
            top = sorted(os.listdir(env.data))
            build["seconds"]["tar"] = run(["tar", "cf", str(env.tar), "-C", str(env.data), *top],
                                          env.logs / "tar.log")
            build["bytes"]["tar"] = env.tar.stat().st_size
            s = System("ratarmount", "ratarmount")
            m, secs = env.mount(s)
            m.unmount()  # type: ignore[union-attr]
            build["seconds"]["ratarmount_index"] = secs
            build["bytes"]["ratarmount_index"] = env.index.stat().st_size if env.index.exists() else 0
            systems.append(s)
        if "cafs" in systems_wanted:
            log("cafs init + import")
            cenv = dict(os.environ, CAFS_CACHE_DIR=str(work / "cafs-import-cache"))
            run(env.cafs("init", str(env.repo)), env.logs / "cafs.log", cenv)
            build["seconds"]["cafs_import"] = run(
                env.cafs("import", str(env.data), str(env.repo), "--name", "bench", "--no-progress"),
                env.logs / "cafs.log", cenv)
            build["bytes"]["cafs_repo"] = du_bytes(env.repo)
            systems.append(System("cafs in place", "cafs", "", work / "cache-inplace",
                                  "cache_mode=auto (reads the local repository in place), fresh cache dir"))
            systems.append(System("cafs empty", "cafs", ",cache_mode=full", work / "cache-full",
                                  "cache_mode=full, fresh cache dir"))
            systems.append(System("cafs filled", "cafs", ",cache_mode=full", work / "cache-full",
                                  "cache_mode=full, the cache dir 'cafs empty' filled, remounted"))
        log("build: " + ", ".join(f"{k} {v:.1f} s" for k, v in build["seconds"].items()))

        for s in systems:
            if s.name in failures:
                continue
            log(f"{s.name}:")
            try:
                rows.append(measure(env, s, ds, can_drop))
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failures[s.name] = f"{type(exc).__name__}: {exc}"
                log(f"  FAILED: {failures[s.name]}")
                unmount_all()
                if s.name == "cafs empty":
                    failures["cafs filled"] = "skipped: the empty pass failed"
    finally:
        unmount_all()

    rep = build_report(rows)
    print_report(rows, rep, ds, build, can_drop)
    for name, why in failures.items():
        print(f"FAILED {name}: {why}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s; JSON in {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "mount", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "caches_dropped": can_drop, "threads": THREADS, "read_block": READ_BLOCK,
        "cpus": os.cpu_count(), "dataset": ds.summary(), "build": build, "rows": rows,
        "failures": failures, **rep, "quoted_in_issue": QUOTED, "versions": versions(env),
        "total_seconds": total,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.keep:
        print(f"work directory kept: {work}")
    else:
        clean_work(work)
    return 1 if failures or any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
