#!/usr/bin/env python3
"""Walk benchmark: a tree of many directories behind a store with first-byte latency.

Object stores answer each request after 10-200 ms, so what a walk or a download of a
tree costs there is mostly its number of requests in a row. One run, on loopback: one
nginx (as in remote_bench.py) serving the tree as plain files (HTML autoindex, for
rclone) and a cafs repository of it, behind a proxy that holds every request for
--latency-ms before passing it on (tests/faultproxy.py, mode stall). Every measurement
cold (kernel caches dropped, client caches empty):

  walk  `find MNT -type f -printf '%s'` (every file looked up and stat'ed) through
        `mount.cafs URL/repo#bench` and through `rclone mount :http:` (--vfs-cache-mode
        full); the same `find` of the plain directory is the native row
  get   `cafs get URL/repo#bench OUT` against `rclone copy :http: OUT --transfers 8`;
        `cp -a` of the plain directory is the native row

Prints seconds, requests the proxy saw and ratios (cafs x rclone, cafs x native);
writes everything as JSON to --out (default benchmarks/results/walk.json).

    .venv/bin/python benchmarks/walk_bench.py                 # 500 dirs x 10 files, 20 ms
    .venv/bin/python benchmarks/walk_bench.py --dirs 2000 --latency-ms 50

Needs root (to drop caches), nginx, rclone and fuse3: run benchmarks/setup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mount_bench as mb
from mount_bench import log
from remote_bench import REF, Bench, Dataset, Nginx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from faultproxy import FaultProxy  # noqa: E402  (a test helper: the latency is its stall mode)

FILE_BYTES = 4096


class Proxied:
    """An nginx seen through the latency proxy: what Bench reads of a server."""

    def __init__(self, nginx: Nginx, proxy: FaultProxy) -> None:
        self.nginx, self.proxy = nginx, proxy

    @property
    def url(self) -> str:
        return self.proxy.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self.nginx, name)


def generate(data: Path, dirs: int, files: int) -> int:
    for d in range(dirs):
        sub = data / f"g{d // 100:03d}" / f"d{d:05d}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"f{f:03d}").write_bytes(os.urandom(FILE_BYTES))
    return dirs * files


def timed(cmd: list[str], log_path: Path, **kw: Any) -> tuple[float, str]:
    with open(log_path, "ab") as err:
        err.write(f"$ {' '.join(cmd)}\n".encode())
        err.flush()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, check=False, **kw)
        secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed ({r.returncode}): {mb.tail(log_path, 600)}")
    return secs, r.stdout.decode(errors="replace")


def walk_rows(bench: Bench, proxy: FaultProxy, files: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    find = ["find", "-type", "f", "-printf", "%s\n"]
    bench.drop()
    secs, out = timed([find[0], str(bench.data), *find[1:]], bench.logs / "find.log")
    rows["native"] = {"seconds": secs, "files": len(out.splitlines()), "requests": 0}
    for peer in ("cafs", "rclone"):
        cache = bench.fresh_dir(f"walk-{peer}")
        bench.drop()
        mounted, _ = bench.mount(peer, cache)
        try:
            proxy.reset_seen()
            secs, out = timed([find[0], str(bench.mnt), *find[1:]], bench.logs / "find.log")
            rows[peer] = {"seconds": secs, "files": len(out.splitlines()), "requests": len(proxy.seen())}
        finally:
            mounted.unmount()
        if rows[peer]["files"] != files:
            raise RuntimeError(f"{peer}: find saw {rows[peer]['files']} files of {files}")
    return rows


def get_rows(bench: Bench, proxy: FaultProxy, url: str, files: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    lp = bench.logs / "get.log"
    out = bench.work / "out"
    commands = {
        "native": ["cp", "-a", str(bench.data), str(out)],
        "cafs": bench.cafs("get", f"{url}/repo#{REF}", str(out), "--cache", str(bench.caches / "get")),
        "rclone": ["rclone", "copy", ":http:", str(out), "--http-url", f"{url}/data/", "--transfers", "8",
                   "--config", str(bench.rclone_conf)],
    }
    for peer, cmd in commands.items():
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(bench.caches / "get", ignore_errors=True)
        bench.drop()
        proxy.reset_seen()
        secs, _ = timed(cmd, lp)
        got = sum(len(names) for _, _, names in os.walk(out))
        if got != files:
            raise RuntimeError(f"{peer}: {got} files written of {files}")
        rows[peer] = {"seconds": secs, "files": got, "requests": 0 if peer == "native" else len(proxy.seen())}
    shutil.rmtree(out, ignore_errors=True)
    return rows


def report(results: dict[str, Any]) -> None:
    for test in ("walk", "get"):
        rows = results[test]
        print(f"\n{test} ({results['files']} files in {results['dirs']} directories, "
              f"{results['latency_ms']:g} ms per request)")
        for peer, row in rows.items():
            print(f"  {peer:<7} {row['seconds']:8.2f} s  {row['requests']:6d} requests")
        print(f"  cafs x rclone: {rows['rclone']['seconds'] / rows['cafs']['seconds']:.1f}x faster; "
              f"cafs x native: {rows['native']['seconds'] / rows['cafs']['seconds']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dirs", type=int, default=500)
    ap.add_argument("--files-per-dir", type=int, default=10)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/cafs-walk-bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "walk.json")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    args.cafs_opts = ""
    if args.dirs < 1 or args.files_per_dir < 1 or args.latency_ms < 0:
        ap.error("--dirs and --files-per-dir must be at least 1, --latency-ms not negative")
    shutil.rmtree(args.work, ignore_errors=True)
    www = args.work / "www"
    for d in (www, args.work / "logs", args.work / "caches"):
        d.mkdir(parents=True)
    files = generate(www / "data", args.dirs, args.files_per_dir)
    import_cache = args.work / "caches" / "import"
    for cmd in (["init", str(www / "repo")],
                ["import", str(www / "data"), str(www / "repo"), "--name", REF, "--no-progress"]):
        subprocess.run([sys.executable, "-m", "cafs.cli", *cmd, "--cache", str(import_cache)], check=True,
                       stdout=subprocess.DEVNULL)
    nginx = Nginx(www, args.work / "nginx")
    nginx.start()
    try:
        with FaultProxy(nginx.url) as proxy:
            proxy.set_mode("stall", seconds=args.latency_ms / 1000)
            bench = Bench(args, args.work, Dataset([], [], 0), Proxied(nginx, proxy))  # type: ignore[arg-type]
            results: dict[str, Any] = {"dirs": args.dirs, "files": files, "latency_ms": args.latency_ms}
            log("walk ...")
            results["walk"] = walk_rows(bench, proxy, files)
            log("get ...")
            results["get"] = get_rows(bench, proxy, proxy.url, files)
    finally:
        nginx.stop()
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
