#!/usr/bin/env python3
"""Hand-off benchmark: what it costs the mount daemon to run a blocking call in a thread.

The mount's trio loop hands every cold chunk read (a pread and a BLAKE3 hash) to a worker
thread. This runs the same job -- a 100 KB pread from a page-cached file and its hash --
from 8 concurrent trio tasks, three ways, side by side in one run:

  inline          on the trio thread itself (the floor: no hand-off at all)
  trio.to_thread  trio.to_thread.run_sync with a CapacityLimiter of 8 (the peer)
  WorkerPool      cafs.workers.WorkerPool of 1, 2 and 8 threads

and prints, per job: throughput, CPU seconds (the process's user + system) and context
switches (summed over its threads), with ratios against trio.to_thread; JSON to --out.

    .venv/bin/python benchmarks/handoff_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cafs.ids import digest
from cafs.workers import WorkerPool

HERE = Path(__file__).resolve().parent
JOB_BYTES = 100_000
FILE_BYTES = 200 << 20
TASKS = 8


def context_switches() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(way: str, jobs: int, job: Callable[[int], bytes],
            run: Callable[[Callable[[int], bytes], int], Any]) -> dict[str, Any]:
    async def main() -> None:
        todo = iter(range(jobs))

        async def task() -> None:
            for i in todo:
                await run(job, i)

        async with trio.open_nursery() as nursery:
            for _ in range(TASKS):
                nursery.start_soon(task)

    c0, s0, t0 = cpu_seconds(), context_switches(), time.perf_counter()
    trio.run(main)
    wall, cpu, switches = time.perf_counter() - t0, cpu_seconds() - c0, context_switches() - s0
    row = {"way": way, "jobs_per_s": jobs / wall, "cpu_us_per_job": cpu / jobs * 1e6,
           "switches_per_job": switches / jobs}
    print(f"{way:16} {row['jobs_per_s']:8.0f} jobs/s  {row['cpu_us_per_job']:6.1f} us cpu/job"
          f"  {row['switches_per_job']:5.1f} switches/job", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--out", type=Path, default=HERE / "results" / "handoff.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data"
        path.write_bytes(os.urandom(FILE_BYTES))
        fd = os.open(path, os.O_RDONLY)
        slots = FILE_BYTES // JOB_BYTES - 1

        def job(i: int) -> bytes:
            return digest(os.pread(fd, JOB_BYTES, (i * 7919 % slots) * JOB_BYTES))

        async def inline(fn: Callable[[int], bytes], i: int) -> bytes:
            return fn(i)

        limiter = trio.CapacityLimiter(TASKS)

        async def to_thread(fn: Callable[[int], bytes], i: int) -> bytes:
            return await trio.to_thread.run_sync(fn, i, limiter=limiter)

        rows = [measure("inline", args.jobs, job, inline),
                measure("trio.to_thread", args.jobs, job, to_thread)]
        for threads in (1, 2, 8):
            pool = WorkerPool(threads, "bench")
            rows.append(measure(f"WorkerPool({threads})", args.jobs, job, pool.run))
        os.close(fd)
    peer = rows[1]
    print("\nagainst trio.to_thread (cpu per job, lower is better):")
    for row in rows:
        row["cpu_x_to_thread"] = row["cpu_us_per_job"] / peer["cpu_us_per_job"]
        print(f"  {row['way']:16} {row['cpu_x_to_thread']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "handoff", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "cpus": os.cpu_count(), "job_bytes": JOB_BYTES, "tasks": TASKS,
                                    "rows": rows}, indent=1) + "\n")
    print(f"JSON in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
