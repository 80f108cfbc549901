"""Repository locks between processes that a host name does not tell apart, and a holder
whose lock was taken from it.

An import is stopped (SIGSTOP) while it holds its shared lock and has written packs,
a gc runs, and the import is let go on: the oracle is ``cafs fsck --read-data``, which
must find nothing whatever the order. Processes are stopped by pid in ``finally``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
from treegen import assert_same_tree

DEADLINE = 60.0


def lock_files(repo: Path) -> list[Path]:
    d = repo / "locks"
    return [p for p in d.iterdir() if not p.name.startswith(".tmp-")] if d.exists() else []


def has_packs(repo: Path) -> bool:
    return any(not p.name.startswith(".tmp-") for p in (repo / "packs").glob("*/*")) if (repo / "packs").exists() else False


def poll(condition: Callable[[], object], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: the test proves nothing"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough data (48 MiB in many packs) that an import is still running when it is stopped."""
    src = tmp_path_factory.mktemp("locks") / "src"
    rnd = random.Random(7)
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(24):
            (src / f"d{d}" / f"f{f}").write_bytes(rnd.randbytes(512 << 10))
    return src


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=DEADLINE)


def free_pid_pair() -> int:
    """A pid P such that neither P nor P+1 is a process of this (the host's) namespace."""
    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    for p in range(min(top, 1 << 22) - 10, 300, -1):
        if not os.path.exists(f"/proc/{p}") and not os.path.exists(f"/proc/{p + 1}"):
            return p
    pytest.skip("no free pid")


NS_INIT = """
import subprocess, sys
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(sys.argv[1])
sys.exit(subprocess.run(sys.argv[2:]).returncode)
"""


def test_gc_refuses_beside_an_import_in_another_pid_namespace(cafs, repo: Path, big_tree: Path,
                                                               tmp_path: Path) -> None:
    """A container with the host's network (same host name, own pids) imports while gc
    runs on the host: the import's pid means nothing here, so its lock is live, and gc
    must refuse rather than delete the packs the import has written."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a pid namespace")
    pid = free_pid_pair()
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c", NS_INIT,
            str(pid), sys.executable, "-m", "cafs.cli", "import", str(big_tree), str(repo), "--name", "ns",
            "--no-progress"]
    with running(argv) as proc:
        poll(lambda: lock_files(repo), "the import's lock", proc)
        # unshare -> the namespace's init (python) -> the import
        inits = children(proc.pid)
        importers = [c for i in inits for c in children(i)]
        assert len(importers) == 1, (inits, importers)
        os.kill(importers[0], signal.SIGSTOP)
        try:
            held = msgpack.unpackb(lock_files(repo)[0].read_bytes())
            assert held["pid"] == pid + 1, held  # a pid no process of the host has
            r = cafs("gc", repo)
        finally:
            os.kill(importers[0], signal.SIGCONT)
        _out, err = proc.communicate(timeout=DEADLINE)
    assert r.code == 1 and "in use" in r.err and "shared lock" in r.err, r.out + r.err
    assert proc.returncode == 0, err.decode()
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err
    assert cafs("get", f"{repo}#ns", tmp_path / "out").code == 0
    assert_same_tree(big_tree, tmp_path / "out")


def test_an_import_whose_lock_was_taken_for_stale_commits_nothing(cafs, repo: Path, big_tree: Path,
                                                                  tmp_path: Path) -> None:
    """An import suspended (Ctrl-Z, a paused VM) longer than a lock lives: a gc takes its
    lock for stale and removes its packs. Let go on, the import must not commit a
    snapshot of packs that are gone; run again, it imports everything."""
    argv = [sys.executable, "-m", "cafs.cli", "import", str(big_tree), str(repo), "--name", "late", "--no-progress"]
    with running(argv) as proc:
        poll(lambda: lock_files(repo) and has_packs(repo), "the import's lock and a pack", proc)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            (lock,) = lock_files(repo)
            held = msgpack.unpackb(lock.read_bytes())
            held["time_ns"] -= 31 * 60 * 10**9  # as if not refreshed for 31 minutes
            lock.write_bytes(msgpack.packb(held))
            r = cafs("gc", repo)
            assert r.code == 0, r.err
            assert "deleted 0 unreferenced" not in r.out, r.out
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        _out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err.decode()
    assert "lost this process's shared lock" in err.decode() and "Traceback" not in err.decode(), err.decode()
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err
    assert not (repo / "refs" / "late").exists()
    assert cafs("import", big_tree, repo, "--name", "late", "--no-progress").code == 0
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err
    assert cafs("get", f"{repo}#late", tmp_path / "out").code == 0
    assert_same_tree(big_tree, tmp_path / "out")


def test_the_refresher_never_puts_back_a_lock_another_process_removed(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs import locks
    from cafs.stores import LocalStore

    monkeypatch.setattr(locks, "REFRESH", 0.01)
    store = LocalStore(tmp_path)
    with locks.locked(store, "shared") as held:
        held.check()
        (lock,) = lock_files(tmp_path)
        lock.unlink()  # an exclusive locker took it for stale
        deadline = time.monotonic() + DEADLINE
        while held._lost is None:
            assert time.monotonic() < deadline, "the refresher never noticed"
            time.sleep(0.01)
        assert lock_files(tmp_path) == []
        with pytest.raises(locks.LockLost, match="removed by another process"):
            held.check()
