#!/usr/bin/env python3
"""Remote benchmark: cafs over HTTP against curl, rclone mount and casync mount.

One run, on loopback, one nginx serving everything from one directory (its "www"):

  www/data/         the generated tree as plain files (HTML autoindex, for rclone)
  www/repo/         a cafs repository made over HTTP (`cafs init URL` + `cafs import DIR
                    URL`: WebDAV writes; JSON autoindex)
  www/store.castr/  casync's chunk store, and www/idx.caidx its index of the tree

and these peers reading the same bytes through it, every one cold (kernel caches dropped
with `sync; echo 3 > /proc/sys/vm/drop_caches` just before, client caches empty):

  curl (files)  the plain files, one connection for the large files; the small ones with
                `curl -Z --parallel-max 8` (the limit)
  curl (packs)  every pack file of the cafs repository, one connection (large row only)
  rclone        `rclone mount :http: MNT --http-url URL/data/ --vfs-cache-mode full
                --cache-dir FRESH_DIR` (foreground, stopped by PID after fusermount3 -u)
  casync        `casync mount --store=URL/store.castr URL/idx.caidx MNT` (no local cache)
  cafs          `mount.cafs URL/repo#bench MNT -o cache=FRESH_DIR` (cache_mode auto, which
                is full for an http repository)

Each mount is made afresh on a fresh cache directory for each measurement: the large
files read one after the other with 1 MiB reads (MB/s); 8 threads reading the small
files from one list shuffled with a fixed seed (files/s); the same in name order. Then
`cafs prefetch URL#bench LARGE...` into an empty cache (when that command exists), and
the import itself: `cafs import` into the http repository and into a local one (MB/s).
Around every measurement: the mount daemon's and nginx's CPU seconds, what nginx served
(from its access log) and the daemon's VmHWM.

Prints a table, ratios and pass/fail against the issue's targets; writes everything as
JSON to --out (default benchmarks/results/remote.json).

    .venv/bin/python benchmarks/remote_bench.py --quick   # 200 MiB large, 2,000 small files
    .venv/bin/python benchmarks/remote_bench.py           # 1 GiB large, 20,000 small files

Needs root (to drop caches), nginx, curl, rclone, casync and fuse3: run benchmarks/setup.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

# Generic helpers shared with the mount benchmark (same directory, which is sys.path[0]
# when this file is run as a script): commands, mounts, dropping caches, readers.
import mount_bench as mb
from common import compile_cafs, human, parse_size
from mount_bench import MB, GiB, KiB, MiB, log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARKER = ".remote-bench-work"

SMALL_MIN, SMALL_MAX = 16 * KiB, 256 * KiB  # log-uniform sizes of the small files
FILES_PER_DIR = 500
LARGE_FILES_MAX = 4
THREADS = 8
SHUFFLE_SEED = 20240611
NGINX = "/usr/sbin/nginx"
HOST = "127.0.0.1"
NGINX_START_DEADLINE = 10.0
NGINX_STOP_DEADLINE = 5.0
REF = "bench"

# Targets from the issue.
TARGET_LARGE_VS_CURL = 0.8  # cafs sequential read, cold, x curl of the plain files
TARGET_SMALL_VS_RCLONE = 2.0  # cafs small files, cold, x rclone (shuffled and name order)
TARGET_PREFETCH_VS_CURL = 0.9  # cafs prefetch of the large files x curl of the plain files
DISK_WRITERS = 4  # threads writing the cache disk's ceiling (one writer left it idle part of the time)
DISK_BLOCK = 8 * MiB

TESTS = ("large", "small_shuffled", "small_name")
PEERS = ("curl", "rclone", "casync", "cafs")


# -- the dataset --------------------------------------------------------------------------


@dataclass
class Dataset:
    small: list[tuple[str, int]]  # relative path (under data/), size
    large: list[tuple[str, int]]
    seed: int

    @property
    def small_bytes(self) -> int:
        return sum(s for _, s in self.small)

    @property
    def large_bytes(self) -> int:
        return sum(s for _, s in self.large)

    @property
    def bytes(self) -> int:
        return self.small_bytes + self.large_bytes

    def summary(self) -> dict[str, Any]:
        return {"files": len(self.small) + len(self.large), "bytes": self.bytes,
                "small_files": len(self.small), "small_bytes": self.small_bytes,
                "small_min": SMALL_MIN, "small_max": SMALL_MAX, "files_per_dir": FILES_PER_DIR,
                "large_files": [s for _, s in self.large], "large_bytes": self.large_bytes,
                "seed": self.seed}


def plan_dataset(small_files: int, large_size: int, seed: int) -> Dataset:
    rng = random.Random(f"{seed}:plan")
    lo, hi = math.log(SMALL_MIN), math.log(SMALL_MAX)
    small = [(f"small/d{i // FILES_PER_DIR:03d}/f{i:06d}.bin", int(math.exp(rng.uniform(lo, hi))))
             for i in range(small_files)]
    n_large = min(LARGE_FILES_MAX, max(1, round(large_size / (256 * MiB)))) if large_size > 0 else 0
    large = []
    for i in range(n_large):
        size = large_size // n_large + (large_size % n_large if i == n_large - 1 else 0)
        large.append((f"large/large-{i}.bin", size))
    return Dataset(small, large, seed)


def generate(data: Path, ds: Dataset, jobs: int) -> None:
    """Random bytes, deterministic for the seed (the mount benchmark's writer tasks)."""
    tasks: list[tuple[Any, ...]] = []
    for rel, size in ds.large:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(data / rel, "wb") as f:
            f.truncate(size)
        for off in range(0, size, mb.GEN_BLOCK):
            tasks.append(("block", str(data), ds.seed, rel, off, min(mb.GEN_BLOCK, size - off)))
    by_dir: dict[str, list[tuple[str, int]]] = {}
    for rel, size in ds.small:
        by_dir.setdefault(os.path.dirname(rel), []).append((rel, size))
    for d, items in by_dir.items():
        (data / d).mkdir(parents=True, exist_ok=True)
        tasks.append(("files", str(data), ds.seed, items))
    with multiprocessing.Pool(jobs, initializer=mb._worker_signals) as pool:
        for _ in pool.imap_unordered(mb._gen_task, tasks):
            pass


# -- processes, CPU time, the machine -----------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_cpu(pid: int | None) -> float | None:
    """CPU seconds of a process, its reaped children and its live descendants."""
    if pid is None:
        return None
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st is None:
            continue
        stats[int(name)] = st
        children.setdefault(int(st[1]), []).append(int(name))
    if pid not in stats:
        return None
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        st = stats.get(p)
        if st is None:
            continue
        total += sum(int(x) for x in st[11:15])  # utime stime cutime cstime
        todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process (every thread) and its reaped children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@dataclass
class Timed:
    seconds: float
    rc: int
    cpu_s: float  # user + system of the command and its children
    max_rss: int  # bytes
    timed_out: bool


def run_timed(cmd: list[str], log_path: Path, timeout: float, stdout: Path | None = None,
              env: dict[str, str] | None = None) -> Timed:
    """Run cmd in its own process group, waited for by PID (wait4 gives its CPU and RSS);
    its process group is killed after timeout seconds, or on any exception here."""
    with open(log_path, "ab") as out, open(stdout or os.devnull, "wb") as so:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=so if stdout else out,
                                stderr=out, env=env, start_new_session=True)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:
        mb._kill_group(proc)
        raise
    finally:
        timer.cancel()
    secs = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Timed(secs, proc.returncode, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024,
                 expired.is_set())


def check(t: Timed, what: str, log_path: Path) -> None:
    if t.timed_out:
        raise RuntimeError(f"{what}: killed after the timeout ({t.seconds:.0f} s)")
    if t.rc != 0:
        raise RuntimeError(f"{what} exited with status {t.rc} (see {log_path}): "
                           f"{mb.tail(log_path, 600)}")


class Watchdog:
    """Kills pid (a mount daemon) if a measurement outlives its timeout, so a read that
    hangs in FUSE fails (ENOTCONN) instead of hanging the benchmark."""

    def __init__(self, pid: int | None, timeout: float) -> None:
        self.pid, self.fired = pid, False
        self._timer = threading.Timer(timeout, self._fire)

    def _fire(self) -> None:
        self.fired = True
        if self.pid is not None and mb.pid_alive(self.pid):
            log(f"  timeout: killing the mount daemon (pid {self.pid})")
            os.kill(self.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


# -- nginx --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Nginx:
    """One nginx serving www on 127.0.0.1, its files in prefix; stopped by PID.

    Its own small configuration rather than tests/nginx.py: the benchmark must not change
    when a test helper does, and it wants what a test server does not: no access log
    buffering questions (one short line per request, read to count requests and bytes),
    keepalive_requests high enough that no client reconnects mid-run, HTML autoindex for
    rclone under /data/ and JSON autoindex plus WebDAV (as tests/nginx.py sets it up for
    cafs's http store) under /repo/. One worker, as in the tests: cafs's exclusive create
    (PUT, then MOVE with Overwrite: F) is atomic only within one worker.
    """

    def __init__(self, www: Path, prefix: Path) -> None:
        self.www, self.prefix = www, prefix
        self.conf = prefix / "nginx.conf"
        self.pid_file = prefix / "nginx.pid"
        self.error_log = prefix / "error.log"
        self.access_log = prefix / "access.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def config(self) -> str:
        p = self.prefix
        return "\n".join(line for line in [
            "user root root;" if os.geteuid() == 0 else "",
            "worker_processes 1;",
            f"pid {self.pid_file};",
            f"error_log {self.error_log} warn;",
            "events { worker_connections 1024; }",
            "http {",
            "  log_format bench '$request_method $status $body_bytes_sent $request_length';",
            f"  access_log {self.access_log} bench;",
            # temp files on the filesystem of www: a PUT body is renamed into place
            f"  client_body_temp_path {p / 'temp/body'};",
            f"  proxy_temp_path {p / 'temp/proxy'};",
            f"  fastcgi_temp_path {p / 'temp/fastcgi'};",
            f"  uwsgi_temp_path {p / 'temp/uwsgi'};",
            f"  scgi_temp_path {p / 'temp/scgi'};",
            "  default_type application/octet-stream;",
            "  sendfile on;",
            "  tcp_nopush on;",
            "  keepalive_requests 1000000;",
            "  keepalive_timeout 300s;",
            "  absolute_redirect off;",
            "  server_tokens off;",
            "  server {",
            f"    listen {HOST}:{self.port};",
            f"    root {self.www};",
            "    location / { autoindex on; }",
            "    location /repo/ {",
            "      autoindex on;",
            "      autoindex_format json;",
            "      client_max_body_size 0;",
            "      dav_methods PUT DELETE MKCOL COPY MOVE;",
            "      create_full_put_path on;",
            "      dav_access user:rw group:r all:r;",
            "      min_delete_depth 1;",
            "    }",
            "  }",
            "}",
            "",
        ] if line)

    def start(self) -> None:
        for sub in ("temp/body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi", "logs"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf.write_text(self.config())
        self.pid_file.unlink(missing_ok=True)
        with open(self.prefix / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log),
                 "-g", "daemon off; master_process on;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + NGINX_START_DEADLINE
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"nginx exited while starting: {mb.tail(self.error_log, 800)}")
            try:  # the pid file is written after the port is bound: not a stranger's port
                if int(self.pid_file.read_text().strip()) == self.proc.pid:
                    socket.create_connection((HOST, self.port), timeout=1.0).close()
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not answer on {HOST}:{self.port}: "
                                   f"{mb.tail(self.error_log, 800)}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(NGINX_STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            # the master leads its own session: its group is it and its workers
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(NGINX_STOP_DEADLINE)

    def log_offset(self) -> int:
        try:
            return self.access_log.stat().st_size
        except OSError:
            return 0

    def served_since(self, offset: int) -> dict[str, Any]:
        """Requests nginx logged since offset: counts by method, bytes sent and received."""
        out: dict[str, Any] = {"requests": 0, "methods": {}, "bytes_sent": 0,
                               "bytes_received": 0, "errors": 0}
        with open(self.access_log, "rb") as f:
            f.seek(offset)
            for line in f:
                parts = line.split()
                if len(parts) != 4:
                    continue
                method = parts[0].decode(errors="replace")
                out["requests"] += 1
                out["methods"][method] = out["methods"].get(method, 0) + 1
                out["bytes_sent"] += int(parts[2])
                out["bytes_received"] += int(parts[3])
                if int(parts[1]) >= 400:
                    out["errors"] += 1
        return out


# -- the benchmark ------------------------------------------------------------------------


class Probe:
    """CPU seconds (client, daemon, nginx, the rest of the machine) and nginx's log around
    one measurement."""

    def __init__(self, nginx: Nginx, daemon: int | None) -> None:
        self.nginx, self.daemon = nginx, daemon
        self.t0 = time.perf_counter()
        self.busy0 = busy_cpu_seconds()
        self.own0 = own_cpu_seconds()
        self.daemon0 = tree_cpu(daemon)
        self.nginx0 = tree_cpu(nginx.pid)
        self.log0 = nginx.log_offset()

    def done(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy = busy_cpu_seconds() - self.busy0
        own = own_cpu_seconds() - self.own0
        d1, n1 = tree_cpu(self.daemon), tree_cpu(self.nginx.pid)
        daemon = None if d1 is None or self.daemon0 is None else d1 - self.daemon0
        ngx = None if n1 is None or self.nginx0 is None else n1 - self.nginx0
        other = busy - own - (daemon or 0) - (ngx or 0)
        return {"wall_s": wall, "client_cpu_s": own, "daemon_cpu_s": daemon, "nginx_cpu_s": ngx,
                "other_cpu_s": max(0.0, other), "machine_busy_s": busy,
                "served": self.nginx.served_since(self.log0)}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, ds: Dataset, nginx: Nginx) -> None:
        self.args, self.work, self.ds, self.nginx = args, work, ds, nginx
        self.www = work / "www"
        self.data = self.www / "data"
        self.local_repo = work / "local-repo"
        self.mnt = work / "mnt"
        self.logs = work / "logs"
        self.caches = work / "caches"
        self.lists = work / "lists"
        self.python = sys.executable
        self.can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
        self.rclone_conf = work / "rclone.conf"  # empty: the remote is given on the command line
        self.prefetch_missing: str | None = None

    # -- helpers ---------------------------------------------------------------------

    def cafs(self, *argv: str) -> list[str]:
        return [self.python, "-m", "cafs.cli", *argv]

    @property
    def repo_url(self) -> str:
        return f"{self.nginx.url}/repo"

    def drop(self) -> None:
        if self.can_drop:
            mb.drop_caches()
        else:
            os.sync()

    def fresh_dir(self, name: str) -> Path:
        d = self.caches / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def paths(self, test: str) -> list[str]:
        if test == "large":
            return [rel for rel, _ in self.ds.large]
        rels = sorted(rel for rel, _ in self.ds.small)
        if test == "small_shuffled":
            random.Random(SHUFFLE_SEED).shuffle(rels)
        return rels

    def expected_bytes(self, test: str) -> int:
        return self.ds.large_bytes if test == "large" else self.ds.small_bytes

    # -- building ------------------------------------------------------------------------

    def import_both(self) -> dict[str, Any]:
        """cafs init + import into the http repository, then into a local one (timed)."""
        res: dict[str, Any] = {}
        lp = self.logs / "cafs-import.log"
        for where, repo in (("http", self.repo_url), ("local", str(self.local_repo))):
            cache = self.fresh_dir(f"import-{where}")
            t = run_timed(self.cafs("init", repo, "--cache", str(cache)), lp, self.args.timeout)
            check(t, f"cafs init {repo}", lp)
            init_seconds = t.seconds
            self.drop()
            probe = Probe(self.nginx, None)
            t = run_timed(self.cafs("import", str(self.data), repo, "--name", REF, "--cache",
                                    str(cache), "--no-progress"), lp, self.args.timeout)
            diag = probe.done()
            check(t, f"cafs import into {repo}", lp)
            stored = mb.du_bytes(self.www / "repo" if where == "http" else self.local_repo)
            res[where] = {"seconds": t.seconds, "mbps": self.ds.bytes / MB / t.seconds,
                          "cpu_s": t.cpu_s, "max_rss": t.max_rss, "stored_bytes": stored,
                          "init_seconds": init_seconds,
                          **{k: v for k, v in diag.items() if k != "wall_s"}}
            log(f"  import into {where}: {t.seconds:.1f} s, "
                f"{self.ds.bytes / MB / t.seconds:.0f} MB/s, "
                f"cpu {t.cpu_s:.1f} s, nginx cpu {diag['nginx_cpu_s'] or 0:.1f} s")
            shutil.rmtree(cache)
        shutil.rmtree(self.local_repo)  # not read again
        return res

    def casync_make(self) -> dict[str, Any]:
        lp = self.logs / "casync-make.log"
        t = run_timed(["casync", "make", f"--store={self.www / 'store.castr'}",
                       str(self.www / "idx.caidx"), str(self.data)], lp, self.args.timeout)
        check(t, "casync make", lp)
        return {"seconds": t.seconds, "cpu_s": t.cpu_s,
                "store_bytes": mb.du_bytes(self.www / "store.castr"),
                "index_bytes": (self.www / "idx.caidx").stat().st_size}

    # -- mounts --------------------------------------------------------------------------

    def mount(self, peer: str, cache: Path, extra_opts: str = "") -> tuple[mb.Mounted, float]:
        self.mnt.mkdir(exist_ok=True)
        if mb.is_mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is mounted already")
        parent_dev = os.stat(self.mnt.parent).st_dev
        lp = self.logs / f"mount-{peer}.log"
        url = self.nginx.url
        if peer == "cafs":
            opts = ",".join([f"cache={cache}"] + [o for o in (self.args.cafs_opts, extra_opts) if o])
            cmd = [self.python, "-m", "cafs.mount_helper", f"{self.repo_url}#{REF}", str(self.mnt),
                   "-o", opts]
            with open(lp, "ab") as out:
                out.write(f"$ {' '.join(cmd)}\n".encode())
                out.flush()
                t0 = time.perf_counter()
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   check=False)
            if r.returncode != 0:
                raise RuntimeError(f"cafs mount failed with status {r.returncode}: "
                                   f"{mb.tail(lp, 600)}")
            try:
                secs = mb.wait_mounted(self.mnt, parent_dev, None, t0, lp)
                pid: int | None = int(os.getxattr(self.mnt, "user.cafs.pid"))
            except (OSError, ValueError) as exc:
                log(f"warning: no daemon pid from the user.cafs.pid xattr: {exc}")
                pid = None
            except BaseException:
                if mb.is_mounted(self.mnt):
                    mb.fusermount_u(self.mnt)
                raise
            return mb.Mounted(peer, self.mnt, pid, None, "cafs.mountd"), secs
        if peer == "rclone":
            cmd = ["rclone", "mount", ":http:", str(self.mnt), "--http-url", f"{url}/data/",
                   "--vfs-cache-mode", "full", "--cache-dir", str(cache),
                   "--config", str(self.rclone_conf)]
        elif peer == "casync":
            cmd = ["casync", "mount", f"--store={url}/store.castr", f"{url}/idx.caidx",
                   str(self.mnt)]
        else:
            raise ValueError(peer)
        with open(lp, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        try:
            secs = mb.wait_mounted(self.mnt, parent_dev, proc, t0, lp)
        except BaseException:
            if mb.is_mounted(self.mnt):
                mb.fusermount_u(self.mnt)
            mb._kill_group(proc)
            raise
        return mb.Mounted(peer, self.mnt, proc.pid, proc, ""), secs

    # -- measurements --------------------------------------------------------------------

    def sample_ok(self, root: Path, test: str) -> bool:
        """sha256 of a sample read through root equals that of the plain files."""
        if test == "large":
            rels = [rel for rel, _ in self.ds.large]
            span = MiB
        else:
            rels = random.Random(f"{self.ds.seed}:sample").sample(
                [r for r, _ in self.ds.small], min(16, len(self.ds.small)))
            span = None

        def digest(base: Path) -> str:
            h = hashlib.sha256()
            for rel in rels:
                with open(base / rel, "rb") as f:
                    if span is None:
                        h.update(f.read())
                    else:  # the first and the last MiB
                        h.update(f.read(span))
                        f.seek(max(0, os.fstat(f.fileno()).st_size - span))
                        h.update(f.read(span))
            return h.hexdigest()

        return digest(root) == digest(self.data)

    def measure_mount(self, peer: str, test: str, extra_opts: str = "", label: str = "") -> dict[str, Any]:
        cache = self.fresh_dir(f"{peer}-{test}")
        res: dict[str, Any] = {"peer": label or peer, "test": test}
        m, res["mount_s"] = self.mount(peer, cache, extra_opts)
        try:
            res["pid"] = m.pid
            paths = [self.mnt / rel for rel in self.paths(test)]
            self.drop()
            probe = Probe(self.nginx, m.pid)
            with Watchdog(m.pid, self.args.timeout) as wd:
                if test == "large":
                    secs, nbytes = mb.seq_read(paths)
                    files, errors = len(paths), list[str]()
                else:
                    secs, files, nbytes, errors = mb.small_read(paths, THREADS)
            res.update(probe.done())
            res.update(seconds=secs, files=files, bytes=nbytes)
            self._rates(res, test)
            if wd.fired:
                errors.insert(0, f"killed after the timeout ({self.args.timeout:.0f} s)")
            if errors or nbytes != self.expected_bytes(test):
                res["errors"] = [(f"{len(errors)} errors (first: {errors[:1]}), read {nbytes} "
                                  f"bytes, expected {self.expected_bytes(test)}")]
            res["rss_peak"] = mb.vm_hwm(m.pid)
            if peer == "cafs":
                res["cafs_stats"] = mb.cafs_stats(self.mnt)
            if not res.get("errors") and not self.sample_ok(self.mnt, test):
                res["errors"] = ["sample checksum differs from the plain files"]
            res["cache_bytes"] = mb.du_bytes(cache)
        finally:
            m.unmount()
            shutil.rmtree(cache, ignore_errors=True)
        return res

    def _rates(self, res: dict[str, Any], test: str) -> None:
        secs = res["seconds"]
        res["mbps"] = res["bytes"] / MB / secs if secs else None
        res["fps"] = res["files"] / secs if secs and test != "large" else None

    def curl_list(self, name: str, urls: list[str]) -> Path:
        self.lists.mkdir(exist_ok=True)
        cfg = self.lists / f"{name}.curl"
        with open(cfg, "w") as f:
            f.writelines(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls)
        return cfg

    def measure_curl(self, test: str, packs: bool = False) -> dict[str, Any]:
        res: dict[str, Any] = {"peer": "curl (packs)" if packs else "curl", "test": test}
        if packs:
            keys = sorted(str(p.relative_to(self.www))
                          for p in (self.www / "repo" / "packs").rglob("*")
                          if p.is_file() and not p.name.startswith("."))
            expected = sum((self.www / k).stat().st_size for k in keys)
        else:
            keys = [f"data/{rel}" for rel in self.paths(test)]
            expected = self.expected_bytes(test)
        cfg = self.curl_list(f"{res['peer']}-{test}".replace(" ", "-"),
                             [f"{self.nginx.url}/{k}" for k in keys])
        cmd = ["curl", "-sS", "--no-progress-meter", "-K", str(cfg),
               "-w", "%{http_code} %{size_download}\\n"]
        if test != "large":  # like the mounts' 8 reader threads: 8 transfers at a time
            cmd[1:1] = ["-Z", "--parallel-max", str(THREADS), "--parallel-immediate"]
        lp = self.logs / "curl.log"
        outp = self.lists / "curl.out"
        self.drop()
        probe = Probe(self.nginx, None)
        t = run_timed(cmd, lp, self.args.timeout, stdout=outp)
        res.update(probe.done())
        check(t, "curl", lp)
        codes, nbytes = [], 0
        for line in outp.read_text().split("\n"):
            if line.strip():
                code, size = line.split()
                codes.append(code)
                nbytes += int(size)
        ok = sum(1 for c in codes if c == "200")
        res.update(seconds=t.seconds, files=ok, bytes=nbytes, client_cpu_s=t.cpu_s,
                   rss_peak=t.max_rss, mount_s=None)
        self._rates(res, test)
        if ok != len(keys) or nbytes != expected:
            res["errors"] = [f"{ok} of {len(keys)} answers were 200, {nbytes} bytes of {expected}"]
        return res

    def measure_disk_write(self) -> dict[str, Any]:
        """The cache disk's ceiling: the large files' bytes written with O_DIRECT by
        ``DISK_WRITERS`` threads into files next to the caches, fsynced. A cache that every
        fetched byte is written through to (``cafs prefetch``, a mount's
        ``cache_mode=full``) cannot finish sooner than this."""
        where = self.fresh_dir("disk-write")
        total = self.ds.large_bytes // DISK_WRITERS // DISK_BLOCK * DISK_BLOCK * DISK_WRITERS
        share = total // DISK_WRITERS
        block = mmap.mmap(-1, DISK_BLOCK)  # page-aligned, as O_DIRECT wants
        block.write(random.Random(0).randbytes(DISK_BLOCK))

        def write(i: int) -> None:
            fd = os.open(where / f"w{i}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
            try:
                for off in range(0, share, DISK_BLOCK):
                    os.pwrite(fd, block, off)
                os.fsync(fd)
            finally:
                os.close(fd)

        res: dict[str, Any] = {"peer": "cache disk write", "test": "large", "mount_s": None,
                               "files": DISK_WRITERS, "bytes": total}
        probe = Probe(self.nginx, None)
        try:
            with concurrent.futures.ThreadPoolExecutor(DISK_WRITERS) as pool:
                list(pool.map(write, range(DISK_WRITERS)))  # raises what a writer raised
            res.update(probe.done())
        finally:
            shutil.rmtree(where, ignore_errors=True)
        res["seconds"] = res["wall_s"]
        self._rates(res, "large")
        return res

    def prefetch_available(self) -> bool:
        r = subprocess.run(self.cafs("prefetch", "--help"), capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            self.prefetch_missing = ("`cafs prefetch` does not exist in this cafs yet "
                                     f"({(r.stderr.strip().splitlines() or [''])[-1][:160]})")
            return False
        return True

    def measure_prefetch(self) -> list[dict[str, Any]]:
        """`cafs prefetch` of the large files into an empty cache, then (not a target) a
        mount on that cache reading them, to see what was left to fetch."""
        cache = self.fresh_dir("prefetch")
        rels = [rel for rel, _ in self.ds.large]
        res: dict[str, Any] = {"peer": "cafs prefetch", "test": "large", "mount_s": None}
        lp = self.logs / "cafs-prefetch.log"
        self.drop()
        probe = Probe(self.nginx, None)
        outp = self.lists / "prefetch.json"
        t = run_timed(self.cafs("prefetch", f"{self.repo_url}#{REF}", *rels, "--cache", str(cache),
                                "--no-progress", "--json"), lp, self.args.timeout, stdout=outp)
        res.update(probe.done())
        try:  # its own account (fetch time, chunks, runs): kept in the JSON as it is
            res["prefetch_json"] = json.loads(outp.read_text())
        except (OSError, ValueError):
            res["prefetch_json"] = None
        res.update(seconds=t.seconds, files=len(rels), bytes=self.ds.large_bytes,
                   client_cpu_s=t.cpu_s, rss_peak=t.max_rss, cache_bytes=mb.du_bytes(cache))
        self._rates(res, "large")
        try:
            check(t, "cafs prefetch", lp)
        except RuntimeError as exc:
            res["errors"] = [str(exc)]
            shutil.rmtree(cache, ignore_errors=True)
            return [res]
        after: dict[str, Any] = {"peer": "cafs after prefetch", "test": "large"}
        m, after["mount_s"] = self.mount("cafs", cache)
        try:
            after["pid"] = m.pid
            self.drop()
            probe = Probe(self.nginx, m.pid)
            with Watchdog(m.pid, self.args.timeout):
                secs, nbytes = mb.seq_read([self.mnt / rel for rel in rels])
            after.update(probe.done())
            after.update(seconds=secs, files=len(rels), bytes=nbytes, rss_peak=mb.vm_hwm(m.pid),
                         cafs_stats=mb.cafs_stats(self.mnt))
            self._rates(after, "large")
            if nbytes != self.ds.large_bytes or not self.sample_ok(self.mnt, "large"):
                after["errors"] = [f"read {nbytes} bytes of {self.ds.large_bytes}, or wrong bytes"]
        finally:
            m.unmount()
            shutil.rmtree(cache, ignore_errors=True)
        return [res, after]


# -- the report ---------------------------------------------------------------------------


ratio = mb.ratio
fmt = mb.fmt
NO_CACHE = "cafs, cache_mode=meta"
ROW_ORDER = ["curl", "curl (packs)", "cache disk write", "rclone", "casync", "cafs", NO_CACHE,
             "cafs prefetch", "cafs after prefetch"]
COLUMNS = [  # test, key, header, format, scale
    ("large", "mbps", "large MB/s", ".0f", 1),
    ("small_shuffled", "fps", "small shuffled f/s", ".0f", 1),
    ("small_name", "fps", "small name-order f/s", ".0f", 1),
    (None, "mount_s", "mount s", ".2f", 1),
    (None, "rss_peak", "peak RSS MB", ".0f", 1 / MB),
]


def by_peer(passes: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for p in passes:
        out.setdefault(p["peer"], {})[p["test"]] = p
    return out


def value(table: dict[str, dict[str, dict[str, Any]]], peer: str, test: str,
          key: str) -> float | None:
    p = table.get(peer, {}).get(test)
    if p is None or p.get("errors"):
        return None
    v = p.get(key)
    return None if v is None else float(v)


def build_report(passes: list[dict[str, Any]], imports: dict[str, Any],
                 notes: list[str]) -> dict[str, Any]:
    t = by_peer(passes)
    ratios: dict[str, dict[str, float | None]] = {}
    for peer in t:
        ratios[peer] = {
            "large x curl": ratio(value(t, peer, "large", "mbps"),
                                  value(t, "curl", "large", "mbps")),
            "small shuffled x curl": ratio(value(t, peer, "small_shuffled", "fps"),
                                           value(t, "curl", "small_shuffled", "fps")),
            "small name x curl": ratio(value(t, peer, "small_name", "fps"),
                                       value(t, "curl", "small_name", "fps")),
            "small shuffled x rclone": ratio(value(t, peer, "small_shuffled", "fps"),
                                             value(t, "rclone", "small_shuffled", "fps")),
            "small name x rclone": ratio(value(t, peer, "small_name", "fps"),
                                         value(t, "rclone", "small_name", "fps")),
        }
    targets: list[dict[str, Any]] = []

    def add(key: str, text: str, v: float | None, target: float, why_missing: str = "") -> None:
        targets.append({"key": key, "target": text, "value": v, "threshold": target,
                        "pass": None if v is None else v >= target, "note": why_missing})

    add("large", f"cafs sequential read, cold, >= {TARGET_LARGE_VS_CURL}x curl of the plain files",
        ratios.get("cafs", {}).get("large x curl"), TARGET_LARGE_VS_CURL)
    add("small_shuffled", f"cafs small files shuffled, cold, >= {TARGET_SMALL_VS_RCLONE:g}x rclone",
        ratios.get("cafs", {}).get("small shuffled x rclone"), TARGET_SMALL_VS_RCLONE)
    add("small_name", f"cafs small files name order, cold, >= {TARGET_SMALL_VS_RCLONE:g}x rclone",
        ratios.get("cafs", {}).get("small name x rclone"), TARGET_SMALL_VS_RCLONE)
    pre_note = next((n for n in notes if "prefetch" in n), "")
    add("prefetch", f"cafs prefetch of the large files >= {TARGET_PREFETCH_VS_CURL}x curl",
        ratios.get("cafs prefetch", {}).get("large x curl"), TARGET_PREFETCH_VS_CURL, pre_note)
    cafs_rss = [int(p["rss_peak"]) for p in passes if p["peer"] == "cafs" and p.get("rss_peak")]
    imp = {"http_mbps": imports.get("http", {}).get("mbps"),
           "local_mbps": imports.get("local", {}).get("mbps")}
    imp["http_over_local"] = ratio(imp["http_mbps"], imp["local_mbps"])
    return {"ratios": ratios, "targets": targets, "import": imp,
            "cafs_daemon_rss_peak": max(cafs_rss) if cafs_rss else None}


def print_report(passes: list[dict[str, Any]], rep: dict[str, Any], imports: dict[str, Any],
                 ds: Dataset, build: dict[str, Any], can_drop: bool, notes: list[str]) -> None:
    t = by_peer(passes)
    print()
    print(f"dataset: {len(ds.small) + len(ds.large)} files, {human(ds.bytes)}: "
          f"{len(ds.small)} small ({human(SMALL_MIN)}-{human(SMALL_MAX)}, "
          f"{human(ds.small_bytes)}), {len(ds.large)} large "
          f"({', '.join(human(s) for _, s in ds.large)}); {os.cpu_count()} CPUs; loopback nginx")
    if build:
        print("build: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in build.items()))
    if not can_drop:
        print("WARNING: not root: kernel caches were NOT dropped, 'cold' figures are warm")
    peers = [p for p in ROW_ORDER if p in t] + [p for p in t if p not in ROW_ORDER]
    w = max(len(p) for p in peers) + 2 if peers else 10
    print()
    print("cold, empty caches".ljust(w) + "".join(h.rjust(len(h) + 2) for *_, h, _, _ in COLUMNS))
    for peer in peers:
        cells = []
        for test, key, h, spec, scale in COLUMNS:
            if test is None:  # the largest over the peer's passes
                vs = [float(p[key]) for p in t[peer].values() if p.get(key) is not None]
                v = max(vs) if vs else None
            else:
                p = t[peer].get(test)
                v = None if p is None else p.get(key)
                if p is not None and p.get("errors"):
                    cells.append("ERROR".rjust(len(h) + 2))
                    continue
            cells.append(fmt(None if v is None else v * scale, spec).rjust(len(h) + 2))
        print(peer.ljust(w) + "".join(cells))
    print("(mount s and peak RSS: the largest over the peer's passes; curl: its own peak RSS)")
    for p in passes:
        for e in p.get("errors", []):
            print(f"ERROR {p['peer']} {p['test']}: {e}")

    heads = ["large x curl", "small shuffled x curl", "small name x curl",
             "small shuffled x rclone", "small name x rclone"]
    print()
    print("ratios (higher is better)".ljust(w) + "".join(h.rjust(len(h) + 2) for h in heads))
    for peer in peers:
        if peer in ("curl",):
            continue
        print(peer.ljust(w) + "".join(fmt(rep["ratios"][peer].get(h), ".2f", "x").rjust(len(h) + 2)
                                      for h in heads))

    imp = rep["import"]
    print()
    for where in ("http", "local"):
        r = imports.get(where)
        if r:
            print(f"import into {where:5}: {r['seconds']:.1f} s, {r['mbps']:.0f} MB/s, "
                  f"cpu {r['cpu_s']:.1f} s"
                  + (f", nginx cpu {r['nginx_cpu_s']:.1f} s" if r.get("nginx_cpu_s") else "")
                  + f", stored {human(r['stored_bytes'])}")
    if imp["http_over_local"] is not None:
        print(f"import throughput http / local: {imp['http_over_local']:.2f}x")
    if rep["cafs_daemon_rss_peak"]:
        print(f"cafs mount daemon peak RSS (VmHWM, largest over its passes): "
              f"{rep['cafs_daemon_rss_peak'] / MB:.0f} MB")

    print()
    print("where the time goes (cpu seconds during each measurement; daemon % = daemon cpu / wall; "
          "other = the rest of the machine)")
    hdr = ["wall s", "client", "daemon", "daemon %", "nginx", "other", "requests", "MB served",
           "fetched/read"]
    pw = max(len(f"{p['peer']} {p['test']}") for p in passes) + 2 if passes else 10
    print("".ljust(pw) + "".join(h.rjust(max(len(h), 7) + 2) for h in hdr))
    for p in passes:
        served = p.get("served", {})
        st = p.get("cafs_stats") or {}
        amp = ratio(st.get("bytes_fetched"), p.get("bytes")) if st else None
        vals = [fmt(p.get("wall_s"), ".1f"), fmt(p.get("client_cpu_s"), ".1f"),
                fmt(p.get("daemon_cpu_s"), ".1f"),
                fmt(ratio(p.get("daemon_cpu_s"), p.get("wall_s")), ".0%"),
                fmt(p.get("nginx_cpu_s"), ".1f"),
                fmt(p.get("other_cpu_s"), ".1f"), str(served.get("requests", "-")),
                fmt(served["bytes_sent"] / MB if served else None, ".0f"), fmt(amp, ".2f")]
        print(f"{p['peer']} {p['test']}".ljust(pw)
              + "".join(v.rjust(max(len(h), 7) + 2) for v, h in zip(vals, hdr)))
    for p in passes:
        pj = p.get("prefetch_json")
        if isinstance(pj, dict) and isinstance(pj.get("seconds"), (int, float)) and pj["seconds"]:
            print(f"cafs prefetch: the command took {p['wall_s']:.2f} s; its own account: "
                  f"{pj['seconds']:.2f} s fetching {pj.get('fetched_chunks')} chunks in "
                  f"{pj.get('runs')} runs ({p['bytes'] / MB / pj['seconds']:.0f} MB/s); "
                  "the rest is outside it (start-up, opening the repository and cache)")
    busy = [f"{p['peer']} {p['test']}" for p in passes
            if p.get("wall_s") and p.get("other_cpu_s", 0) / p["wall_s"] > 0.25]
    if busy:
        print(f"NOTE: other processes used more than a quarter of a core during: {', '.join(busy)}")

    print()
    tw = max(len(x["target"]) for x in rep["targets"]) + 2
    print("target".ljust(tw) + "cafs")
    for x in rep["targets"]:
        if x["value"] is None:
            txt = "-" + (f"  ({x['note']})" if x["note"] else "")
        else:
            txt = f"{x['value']:.2f}x " + ("PASS" if x["pass"] else "FAIL")
        print(x["target"].ljust(tw) + txt)
    disk = rep["ratios"].get("cache disk write", {}).get("large x curl")
    if disk is not None:
        print(f"ceiling: the cache disk takes every large byte at {disk:.2f}x curl's speed "
              f"({DISK_WRITERS} O_DIRECT writers): no reader that writes each fetched byte through "
              "to this cache (cafs prefetch, a cafs mount's default cache_mode=full) can go faster")
    meta = rep["ratios"].get(NO_CACHE, {}).get("large x curl")
    if meta is not None:
        print(f"the read path alone ({NO_CACHE}, nothing written to the cache): {meta:.2f}x curl")
    for n in notes:
        print(f"note: {n}")


# -- main ---------------------------------------------------------------------------------


def prepare_work(work: Path) -> None:
    if work.exists():
        others = [p for p in work.iterdir() if p.name != MARKER]
        if others and not (work / MARKER).exists():
            raise SystemExit(f"{work}: not empty and not a remote benchmark work directory "
                             f"(no {MARKER}); choose another --work")
        for p in others:
            if mb.is_mounted(p):
                raise SystemExit(f"{p} is a mountpoint: unmount it first (fusermount3 -u {p})")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text(
        "work directory of benchmarks/remote_bench.py; deleted after a run\n")


def mounts_under(work: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f
                if line.split()[1].replace("\\040", " ").startswith(str(work) + "/")]


def versions() -> dict[str, str | None]:
    def first_line(cmd: list[str]) -> str | None:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = (r.stdout or r.stderr).strip().splitlines()
        return lines[0] if lines else None

    return {"nginx": first_line([NGINX, "-v"]), "curl": first_line(["curl", "--version"]),
            "rclone": first_line(["rclone", "version"]),
            "casync": first_line(["casync", "--version"]),
            "cafs": first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
            "python": platform.python_version(), "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=HERE / "work-remote",
                   help="work directory (default %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "remote.json",
                   help="JSON results (default %(default)s)")
    p.add_argument("--large-size", "--size", type=parse_size, default=GiB,
                   help="bytes in 1-4 large files (default 1G)")
    p.add_argument("--small-files", type=int, default=20000,
                   help=f"small files of {SMALL_MIN // KiB}-{SMALL_MAX // KiB} KiB "
                   "(default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a small run: 200M of large files, 2000 small files")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated subset of curl,rclone,casync,cafs (default: all)")
    p.add_argument("--cafs-opts", default="",
                   help="more -o options for the cafs mounts (e.g. readahead=32M)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one measurement may take before its process is killed "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--large-passes", type=int, default=3,
                   help="cold passes over the large files per peer, the best kept (default 3)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                   help="processes generating data")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    compile_cafs()
    if args.quick:
        args.large_size, args.small_files = 200 * MiB, 2000
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    if args.large_passes < 1:
        p.error("--large-passes must be at least 1")

    tools = {"nginx": NGINX, "fusermount3": "fusermount3", "curl": "curl", "rclone": "rclone",
             "casync": "casync"}
    missing = [name for name, exe in tools.items()
               if (name in ("nginx", "fusermount3") or name in peers) and not shutil.which(exe)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; run benchmarks/setup")
    if subprocess.run([sys.executable, "-c", "import cafs, pyfuse3"], capture_output=True,
                      check=False).returncode:
        raise SystemExit(f"{sys.executable} cannot import cafs and pyfuse3: "
                         "run with .venv/bin/python")
    work = args.work.absolute()
    ds = plan_dataset(args.small_files, args.large_size, args.seed)
    prepare_work(work)
    nginx = Nginx(work / "www", work / "nginx")
    b = Bench(args, work, ds, nginx)
    if not b.can_drop:
        log("warning: cannot write /proc/sys/vm/drop_caches (not root?): cold figures will be warm")
    b.logs.mkdir()
    b.lists.mkdir()
    b.rclone_conf.write_text("")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    t_start = time.perf_counter()
    tool_versions = versions()  # before the run: cafs's working tree may change during it
    passes: list[dict[str, Any]] = []
    build: dict[str, Any] = {}
    imports: dict[str, Any] = {}
    failures: dict[str, str] = {}
    notes: list[str] = []

    def best(name: str, fn: Callable[[], Any]) -> Any:
        """``fn``'s best result over ``--large-passes`` passes of the large files (each its own
        cold measurement): loopback speeds here swing by 2-6x between runs, for curl too,
        so every row of the large column is the best of as many tries; all are kept."""
        runs = [r for r in (attempt(name, fn) for _ in range(args.large_passes)) if r is not None]
        firsts = [r[0] if isinstance(r, list) else r for r in runs]
        ok = [i for i, r in enumerate(firsts) if not r.get("errors")] or list(range(len(runs)))
        if not ok:
            return None
        top = max(ok, key=lambda i: firsts[i].get("mbps") or 0.0)
        firsts[top]["pass_mbps"] = [r.get("mbps") for r in firsts]
        return runs[top]

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed peer is reported, the others go on
            failures[name] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED {name}: {failures[name]}")
            mb.unmount_all()
            return None

    try:
        log(f"generating {len(ds.small) + len(ds.large)} files, {human(ds.bytes)} in {b.data}")
        t0 = time.perf_counter()
        b.data.mkdir(parents=True)
        generate(b.data, ds, args.jobs)
        os.sync()
        build["generate"] = {"seconds": time.perf_counter() - t0}
        nginx.start()
        log(f"nginx on {nginx.url} (pid {nginx.pid}), serving {b.www}")

        if "cafs" in peers:
            log("cafs import into the http repository, then into a local one")
            imports = attempt("import", b.import_both) or {}
        if "casync" in peers:
            log("casync make")
            made = attempt("casync make", b.casync_make)
            if made:
                build["casync_make"] = made
        for peer in peers:
            if peer == "cafs" and "import" in failures:
                continue
            if peer == "casync" and "casync make" in failures:
                continue
            for test in TESTS:
                log(f"{peer} {test}:")
                run = attempt if test != "large" else best
                if peer == "curl":
                    r = run(f"curl {test}", functools.partial(b.measure_curl, test))
                else:
                    r = run(f"{peer} {test}", functools.partial(b.measure_mount, peer, test))
                if r is None:
                    continue
                passes.append(r)
                log("  " + ", ".join(
                    [f"{r['mbps']:.0f} MB/s" if test == "large" else f"{r['fps']:.0f} files/s"]
                    + ([f"mount {r['mount_s']:.2f} s"] if r.get("mount_s") is not None else [])
                    + [f"daemon cpu {r['daemon_cpu_s']:.1f} s" if r.get("daemon_cpu_s") is not None
                       else f"client cpu {r['client_cpu_s']:.1f} s",
                       f"{r['served']['requests']} requests"]
                    + ([f"ERRORS {r['errors']}"] if r.get("errors") else [])))
            if peer == "curl" and imports.get("http"):  # needs the repository
                log("curl (packs) large:")
                r = attempt("curl packs", functools.partial(b.measure_curl, "large", packs=True))
                if r is not None:
                    passes.append(r)
                    log(f"  {r['mbps']:.0f} MB/s ({human(r['bytes'])})")
            if peer == "cafs" and "cafs large" not in failures:
                log(f"{NO_CACHE} large (no cache writes: the read path alone):")
                r = best(NO_CACHE, functools.partial(b.measure_mount, "cafs", "large",
                                                        "cache_mode=meta", NO_CACHE))
                if r is not None:
                    passes.append(r)
                    log(f"  {r['mbps']:.0f} MB/s, daemon cpu {r.get('daemon_cpu_s') or 0:.1f} s")
                log("cache disk write (the ceiling of a cache written through):")
                r = best("cache disk write", b.measure_disk_write)
                if r is not None:
                    passes.append(r)
                    log(f"  {r['mbps']:.0f} MB/s ({human(r['bytes'])}, {DISK_WRITERS} writers, O_DIRECT)")
            if peer == "cafs":
                if b.prefetch_available():
                    log("cafs prefetch:")
                    rs = best("cafs prefetch", b.measure_prefetch) or []
                    passes.extend(rs)
                    for r in rs:
                        log(f"  {r['peer']}: {r.get('mbps') or 0:.0f} MB/s")
                else:
                    notes.append(f"prefetch row skipped: {b.prefetch_missing}")
                    log(f"  skipped: {b.prefetch_missing}")
    finally:
        mb.unmount_all()
        nginx.stop()

    if "casync" in peers:
        notes.append("casync mounts over http: "
                     "`casync mount --store=URL/store.castr URL/idx.caidx` "
                     "(index and chunks fetched by its casync-http helper); it has no local cache")
    rep = build_report(passes, imports, notes)
    print_report(passes, rep, imports, ds, build, b.can_drop, notes)
    for name, why in failures.items():
        print(f"FAILED {name}: {why}")
    left = mounts_under(work)
    if left:
        print(f"ERROR: still mounted: {', '.join(left)}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s; JSON in {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "remote", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "caches_dropped": b.can_drop, "threads": THREADS, "read_block": mb.READ_BLOCK,
        "cpus": os.cpu_count(), "dataset": ds.summary(), "build": build, "import": imports,
        "passes": passes, "failures": failures, "notes": notes, **rep,
        "targets_from_issue": {"large_vs_curl": TARGET_LARGE_VS_CURL,
                               "small_vs_rclone": TARGET_SMALL_VS_RCLONE,
                               "prefetch_vs_curl": TARGET_PREFETCH_VS_CURL},
        "versions": tool_versions, "total_seconds": total, "left_mounted": left,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.keep:
        print(f"work directory kept: {work}")
    elif not left:
        shutil.rmtree(work)
    return 1 if failures or left or any(r.get("errors") for r in passes) else 0


if __name__ == "__main__":
    sys.exit(main())
