#!/usr/bin/env python3
"""fsck benchmark: `cafs fsck` against `restic check` on the same data, in one run.

Generates a dataset (default about 2 GB: many small files and a few large ones, random
bytes), imports it into a cafs repository and backs it up with restic, then times, for
each, the metadata-only check and the full data check (`cafs fsck --read-data`,
`restic check --read-data`). Kernel caches are dropped before every timed run (`sync;
echo 3 > drop_caches`) so both read their repository from disk. Prints throughput and
ratios, and writes JSON to --out.

Run benchmarks/setup first (restic from Debian's packages, the project's .venv).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import compile_cafs, parse_size

HERE = Path(__file__).resolve().parent
CAFS = [str(HERE.parent / ".venv" / "bin" / "cafs")]


def generate(root: Path, total: int, seed: int) -> int:
    rng = random.Random(seed)
    written = 0
    large = total * 15 // 100
    for i in range(3):
        with open(root / f"large{i}.bin", "wb") as f:
            left = large // 3
            while left:
                n = min(left, 8 << 20)
                f.write(rng.randbytes(n))
                left -= n
        written += large // 3
    i = 0
    while written < total:
        d = root / f"d{i // 500:04d}"
        d.mkdir(exist_ok=True)
        n = rng.randint(16 << 10, 512 << 10)
        (d / f"f{i:07d}").write_bytes(rng.randbytes(n))
        written += n
        i += 1
    return written


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"cannot drop caches ({exc}); results are warm", file=sys.stderr)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    drop_caches()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, (proc.stdout + proc.stderr)[-500:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("2G"))
    p.add_argument("--work", type=Path, default=HERE / "work-fsck")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fsck.json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    compile_cafs()
    if args.work.exists():
        shutil.rmtree(args.work)
    data, cafs_repo, restic_repo = args.work / "data", args.work / "cafs-repo", args.work / "restic-repo"
    data.mkdir(parents=True)
    env = dict(os.environ, CAFS_CACHE_DIR=str(args.work / "cafs-cache"), RESTIC_PASSWORD="bench",
               RESTIC_CACHE_DIR=str(args.work / "restic-cache"))
    try:
        size = generate(data, args.size, seed=1)
        print(f"dataset: {size / 1e9:.2f} GB in {data}")
        for cmd in ([*CAFS, "init", str(cafs_repo)], [*CAFS, "import", str(data), str(cafs_repo), "--name", "b", "--no-progress"],
                    ["restic", "-q", "-r", str(restic_repo), "init"], ["restic", "-q", "-r", str(restic_repo), "backup", str(data)]):
            subprocess.run(cmd, env=env, check=True, capture_output=True)
        runs = {
            "cafs fsck": [*CAFS, "fsck", str(cafs_repo)],
            "restic check": ["restic", "-q", "-r", str(restic_repo), "check"],
            "cafs fsck --read-data": [*CAFS, "fsck", str(cafs_repo), "--read-data"],
            "restic check --read-data": ["restic", "-q", "-r", str(restic_repo), "check", "--read-data"],
        }
        results = {}
        for name, cmd in runs.items():
            seconds, code, tail = timed(cmd, env)
            results[name] = {"seconds": round(seconds, 3), "exit": code, "mb_per_s": round(size / seconds / 1e6, 1)}
            if code != 0:
                print(f"{name} exited {code}: {tail}", file=sys.stderr)
        meta_ratio = results["restic check"]["seconds"] / results["cafs fsck"]["seconds"]
        data_ratio = results["cafs fsck --read-data"]["mb_per_s"] / results["restic check --read-data"]["mb_per_s"]
        print(f"{'run':<28} {'seconds':>8} {'MB/s':>8}")
        for name, r in results.items():
            print(f"{name:<28} {r['seconds']:>8.2f} {r['mb_per_s']:>8.0f}")
        print(f"metadata check: cafs is {meta_ratio:.2f}x as fast as restic")
        print(f"--read-data throughput: cafs/restic = {data_ratio:.2f}x (target >= 2x: "
              f"{'PASS' if data_ratio >= 2 else 'FAIL'})")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dataset_bytes": size, "caches": "dropped before each run",
                                        "results": results, "metadata_speedup": round(meta_ratio, 2),
                                        "read_data_ratio": round(data_ratio, 2)}, indent=2))
        print(f"written {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
