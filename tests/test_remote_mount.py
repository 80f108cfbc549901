"""Mounts of a repository behind a real nginx, with a fault-injecting proxy in between.

The oracle is the source tree: through every fault, a read returns the source's bytes
or fails with EIO, never wrong bytes; stat, listings and cached reads keep answering
while the store misbehaves; once the store is back, reads succeed without a remount.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from mountfix import env, import_tree, is_mounted, make_repo, mountd_pids, mounted, poll, run_cafs, unmount, wait_exit
from treegen import assert_same_tree, make_tree

BIG = 3 << 20


@pytest.fixture
def served(tmp_path: Path, nginx_server, fault_proxy):
    """A repository under an nginx root, a proxy in front, and the source tree."""
    www = tmp_path / "www"
    www.mkdir()
    src = make_tree(tmp_path / "src", big_file_size=BIG)
    cache = tmp_path / "import-cache"
    make_repo(www / "repo", cache)
    import_tree(src, www / "repo", "ds", cache)
    server = nginx_server(www)
    proxy = fault_proxy(server)
    return src, server, proxy, www


def _hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read()).hexdigest()


def _hash_or_none(path: Path) -> str | None:
    try:
        return _hash(path)
    except OSError:
        return None


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_remote_tree_equals_source(served, tmp_path: Path) -> None:
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'}") as m:
        assert_same_tree(src, mnt)
        stats = m.stats()
        assert stats["bytes_fetched"] > 0 and stats["errors"] == 0
        assert stats["inline_loads"] > 0  # small files were fetched on the trio loop (trio_gets)


def test_eight_readers_of_one_file_fetch_it_once(served, tmp_path: Path) -> None:
    src, _server, _proxy, www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    big = max(_files(src), key=lambda p: p.stat().st_size)
    rel = big.relative_to(src)
    with mounted(f"{_proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'}") as m:
        barrier = threading.Barrier(8)

        def read() -> str:
            barrier.wait()
            return _hash(mnt / rel)
        with ThreadPoolExecutor(8) as pool:
            hashes = set(pool.map(lambda _: read(), range(8)))
        assert hashes == {_hash(big)}
        stats = m.stats()
        # every chunk came from the store exactly once: no more bytes than the file holds
        # (random bytes are stored raw), however many readers asked at once
        assert big.stat().st_size <= stats["bytes_fetched"] <= big.stat().st_size + (64 << 10)


@pytest.mark.parametrize("mode", ["reset_mid_body", "short_body", "flip_bytes", "status"])
def test_passing_faults_heal_unseen(served, tmp_path: Path, mode: str) -> None:
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout=20",
                 expect_warnings=True):
        proxy.set_mode(mode, match=r"/packs/", ranged=True, times=3, status=500)
        for path in _files(src):
            assert _hash(mnt / path.relative_to(src)) == _hash(path), path
        assert proxy.faults_fired == 3


@pytest.mark.parametrize("mode", ["status", "status404", "flip_bytes", "refuse", "stall", "server_down"])
def test_lasting_fault_is_eio_then_heals(served, tmp_path: Path, mode: str) -> None:
    """The read fails with EIO within the deadline; other requests keep answering; when
    the store is back, the same read succeeds without a remount."""
    src, server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    files = _files(src)
    big = max(files, key=lambda p: p.stat().st_size)
    small = [p for p in files if p != big and p.stat().st_size > 0][0]
    deadline = 3.0
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout={deadline}",
                 expect_warnings=True):
        listing = sorted(os.listdir(mnt))
        for p in src.rglob("*"):
            os.lstat(mnt / p.relative_to(src))  # every node is fetched and kept
        assert _hash(mnt / small.relative_to(src)) == _hash(small)
        if mode == "refuse":
            proxy.set_mode("refuse")
        elif mode == "server_down":
            server.stop()
        elif mode == "status404":
            proxy.set_mode("status", match=r"/packs/", status=404)
        else:
            proxy.set_mode(mode, match=r"/packs/", status=500)
        failure: list[BaseException] = []

        def read_big() -> None:
            try:
                _hash(mnt / big.relative_to(src))
            except OSError as exc:
                failure.append(exc)
        t0 = time.monotonic()
        reader = threading.Thread(target=read_big)
        reader.start()
        # meanwhile the mount answers everything that needs no store
        for _ in range(20):
            assert sorted(os.listdir(mnt)) == listing
            assert _hash(mnt / small.relative_to(src)) == _hash(small)
        assert reader.is_alive() or failure, "the big read did not wait for the store"
        reader.join(timeout=60)
        took = time.monotonic() - t0
        assert not reader.is_alive()
        assert failure and isinstance(failure[0], OSError) and failure[0].errno == errno.EIO, failure
        assert took < deadline * 4, f"EIO after {took:.1f} s with a deadline of {deadline} s"
        if mode == "server_down":
            server.restart()
        proxy.set_mode("pass")
        # within seconds: a pack whose read failed is not asked again for FAILED_SECONDS
        poll(lambda: _hash_or_none(mnt / big.relative_to(src)) == _hash(big), 10, "the big read to heal")


def test_import_to_a_failing_store_stops_clearly_and_resumes(served, tmp_path: Path) -> None:
    src, _server, proxy, _www = served
    url = f"{proxy.url}/repo2"
    cache = tmp_path / "cache"
    r = run_cafs("init", url, "--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K",
                 "--pack-size", "512K", cache=cache)
    assert r.returncode == 0, r.stderr
    proxy.set_mode("status", method="PUT", match=r"/packs/", status=507)
    r = run_cafs("import", src, url, "--name", "ds", "--no-progress", cache=cache)
    assert r.returncode != 0 and "no space" in r.stderr and "/repo2/packs/" in r.stderr, r.stderr
    proxy.set_mode("status", method="PUT", match=r"/packs/", status=503)
    r = subprocess.run([sys.executable, "-m", "cafs.cli", "import", str(src), url, "--name", "ds",
                        "--no-progress"], capture_output=True, text=True, timeout=120, check=False,
                       env=env(CAFS_CACHE_DIR=str(cache), CAFS_TIMEOUT="2"))
    assert r.returncode != 0 and "503" in r.stderr, r.stderr
    assert run_cafs("snapshots", url, cache=cache).stdout.count("ds") == 0
    proxy.set_mode("pass")
    r = run_cafs("import", src, url, "--name", "ds", "--no-progress", cache=cache)
    assert r.returncode == 0, r.stderr
    r = run_cafs("get", f"{url}#ds", tmp_path / "out", cache=cache)
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, tmp_path / "out")
    assert run_cafs("fsck", url, "--read-data", cache=cache).returncode == 0


def _mirror_and_mountpoint(www: Path, tmp_path: Path, nginx_server):  # type: ignore[no-untyped-def]
    """A second nginx serving a copy of ``www``, and an empty mountpoint."""
    www2 = tmp_path / "www2"
    shutil.copytree(www, www2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return nginx_server(www2), mnt


def test_mirror_takes_over_and_primary_comes_back(served, tmp_path: Path, nginx_server) -> None:
    src, _server, proxy, www = served
    mirror, mnt = _mirror_and_mountpoint(www, tmp_path, nginx_server)
    files = _files(src)
    half = len(files) // 2
    with mounted(f"{proxy.url}/repo#ds", mnt,
                 f"cache={tmp_path / 'cache'},timeout=10,readahead=4K,mirror={mirror.url}/repo",
                 expect_warnings=True) as m:
        done = 0

        def read(path: Path) -> None:
            assert _hash(mnt / path.relative_to(src)) == _hash(path), path
        with ThreadPoolExecutor(4) as pool:
            for i, _ in enumerate(pool.map(read, files[:half])):
                done += 1
                if i == half // 3:
                    proxy.set_mode("refuse")  # the primary dies in the middle of the pass
        assert m.stats()["errors"] == 0
        proxy.set_mode("pass")
        proxy.reset_seen()
        pending = list(files[half:])  # readahead=4K: barely loaded ahead by the first half
        next_read = 0.0

        def primary_used() -> bool:
            # one uncached file a second: the reads must outlast the primary's set-aside
            # (up to 30 s), which a file per poll, 33 files, did not when reads were fast
            nonlocal next_read
            if pending and time.monotonic() >= next_read:
                read(pending.pop())
                next_read = time.monotonic() + 1.0
            return any("/packs/" in s.path for s in proxy.seen())
        poll(primary_used, 45, "reads to return to the primary")
        for path in pending:
            read(path)


def test_prefetch_of_a_mountpoint_reads_its_mirrors(served, tmp_path: Path, nginx_server) -> None:
    """``cafs prefetch MOUNTPOINT`` uses the mirrors the mount names: with the primary
    refusing connections, the mount's cache is filled from the mirror."""
    src, _server, proxy, www = served
    mirror, mnt = _mirror_and_mountpoint(www, tmp_path, nginx_server)
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout=10,"
                 f"mirror={mirror.url}/repo", expect_warnings=True) as m:
        assert os.getxattr(mnt, "user.cafs.mirrors").decode() == f"{mirror.url}/repo"
        os.listdir(mnt)  # the root node, while the primary answers
        proxy.set_mode("refuse")
        r = run_cafs("prefetch", mnt, "--json", cache=tmp_path / "other-cache", timeout=120)
        assert r.returncode == 0, r.stderr
        assert '"cached_share": 1.0' in r.stdout, r.stdout
        assert_same_tree(src, mnt)  # every read is served from the cache the prefetch filled
        assert m.stats()["bytes_fetched"] == 0


def test_stalled_node_fetch_does_not_stall_the_mount(served, tmp_path: Path) -> None:
    """A listing that needs a node from a stalled store waits alone: requests that need
    no store (stat of a visited path, a cached read) answer meanwhile."""
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    small = [p for p in _files(src) if p.parent == src and p.stat().st_size > 0][0]
    unvisited = next(p for p in sorted(src.iterdir()) if p.is_dir() and not p.is_symlink())
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout=8",
                 expect_warnings=True):
        assert _hash(mnt / small.name) == _hash(small)
        proxy.set_mode("stall", match=r"/packs/")
        result: list[object] = []
        lister = threading.Thread(target=lambda: result.append(_try(os.listdir, mnt / unvisited.name)))
        lister.start()
        poll(lambda: any("/packs/" in s.path for s in proxy.seen()) or not lister.is_alive(), 10,
             "the listing to reach the store")
        t0 = time.monotonic()
        for _ in range(10):
            os.stat(mnt / small.name)
            assert _hash(mnt / small.name) == _hash(small)
        assert time.monotonic() - t0 < 4, "requests without store reads waited for the stalled one"
        assert lister.is_alive(), "the listing did not wait for the stalled store"
        proxy.set_mode("pass")
        lister.join(timeout=30)
        assert sorted(os.listdir(mnt / unvisited.name)) == sorted(os.listdir(unvisited))


def _try(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except OSError as exc:
        return exc


@pytest.mark.slow
def test_a_mount_slower_than_a_minute_within_its_timeout_is_waited_for(served, tmp_path: Path) -> None:
    """The daemon's first store read meets a store that does not answer for longer than
    a minute (7 stalled requests, each given up by the client after 10 s, then retried),
    all within ``timeout=150``: the helper waits, and the mount comes up."""
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proxy.set_mode("stall", match=r"/config$", skip=1, times=7)  # skip: the helper's own check
    started = time.monotonic()
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout=150"):
        assert time.monotonic() - started > 60
        assert proxy.faults_fired == 7
        assert_same_tree(src, mnt)


@contextmanager
def _helper_on_a_stalled_store(proxy, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:  # type: ignore[no-untyped-def]
    """``mount.cafs`` whose daemon's first store read stalls until the proxy passes again
    (the helper's own check reads ``config`` first): yields the helper, its daemon's PID
    and the mountpoint once the daemon waits; afterwards unmounts, and stops the helper."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proxy.set_mode("stall", match=r"/config$", skip=1)
    helper = subprocess.Popen([sys.executable, "-m", "cafs.mount_helper", f"{proxy.url}/repo#ds", str(mnt),
                               "-o", f"cache={tmp_path / 'cache'},log={mnt}.log"], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        poll(lambda: proxy.faults_fired == 1, 30, "the daemon's first read to reach the store")
        [pid] = mountd_pids(mnt)
        yield helper, pid, mnt
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.communicate()
        unmount(mnt, mountd_pids(mnt))


def test_a_daemon_whose_helper_was_killed_unmounts_once_up(served, tmp_path: Path) -> None:
    """mount.cafs killed while its daemon starts (a timeout, kill -9): the daemon came up
    and served on, a mount nobody was told of and that no one would unmount."""
    _src, _server, proxy, _www = served
    with _helper_on_a_stalled_store(proxy, tmp_path) as (helper, pid, mnt):
        helper.kill()
        helper.communicate()
        proxy.set_mode("pass")
        wait_exit(pid)
        assert not is_mounted(mnt)
        assert "the mount helper is gone" in (tmp_path / "mnt.log").read_text()


def test_an_interrupted_mount_helper_leaves_nothing_mounted(served, tmp_path: Path) -> None:
    """Ctrl-C on mount.cafs while its daemon starts: the helper died with a traceback,
    and the daemon mounted anyway once the store answered."""
    _src, _server, proxy, _www = served
    with _helper_on_a_stalled_store(proxy, tmp_path) as (helper, pid, mnt):
        helper.send_signal(signal.SIGINT)
        _out, err = helper.communicate(timeout=30)
        assert helper.returncode == 32 and err.decode() == "mount.cafs: interrupted; nothing was mounted\n", err
        wait_exit(pid, 5)
        proxy.set_mode("pass")
        assert not is_mounted(mnt)


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _eio_after(fn, *args) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``fn(*args)`` failed with EIO (anything else fails the test)."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as failed:
        fn(*args)
    assert failed.value.errno == errno.EIO, failed.value
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["stall", "status"])
def test_a_read_fails_once_within_the_timeout(served, tmp_path: Path, mode: str) -> None:
    """One deadline per user read: the kernel's readahead and its page-by-page retries,
    and a reader whose chunk was in a failed background load, do not each wait out a
    deadline of their own; reading the same range again fails at once."""
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    big = max(_files(src), key=lambda p: p.stat().st_size).relative_to(src)
    timeout = 2.0
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout={timeout}",
                 expect_warnings=True):
        os.close(os.open(mnt / big, os.O_RDONLY))  # its nodes are loaded
        proxy.set_mode(mode, match=r"/packs/", status=500)
        took = _eio_after(_pread, mnt / big, 0, 1 << 20)
        took += _eio_after(_pread, mnt / big, 0, 1 << 20)
        assert took < timeout + 2, f"two reads failed after {took:.1f} s with timeout={timeout}"
        proxy.set_mode("pass")
        # a failure is remembered for a moment (FAILED_SECONDS), then the store is asked again
        poll(lambda: not isinstance(_try(_pread, mnt / big, 0, 1 << 20), OSError), 10,
             "the read to succeed once the store is back")
        assert _pread(mnt / big, 0, 1 << 20) == _pread(src / big, 0, 1 << 20)


def test_stalled_background_loads_leave_the_store_to_other_reads(tmp_path: Path, nginx_server,
                                                                 fault_proxy) -> None:
    """Background loads (readahead) of a file whose packs stall never hold the threads
    that other reads need: a listing that needs a node from a healthy pack answers
    at once, not after the stalled loads' deadline."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(6 << 20))  # 12 packs of 512K: more runs than MAX_PREFETCH
    for i in range(3):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(1000))
    www = tmp_path / "www"
    www.mkdir()
    make_repo(www / "repo", tmp_path / "import-cache")
    import_tree(src, www / "repo", "ds", tmp_path / "import-cache")
    proxy = fault_proxy(nginx_server(www))
    source, mnt = f"{proxy.url}/repo#ds", tmp_path / "mnt"
    mnt.mkdir()
    with mounted(source, mnt, f"cache={tmp_path / 'cache1'}"):
        os.close(os.open(mnt / "big", os.O_RDONLY))
        proxy.reset_seen()
        assert _hash(mnt / "big") == _hash(src / "big")
        big_packs = {s.path for s in proxy.seen() if "/packs/" in s.path}
    timeout = 10.0
    with mounted(source, mnt, f"cache={tmp_path / 'cache2'},timeout={timeout}", expect_warnings=True):
        os.close(os.open(mnt / "big", os.O_RDONLY))
        proxy.reset_seen()
        proxy.set_mode("stall", match="|".join(re.escape(p) + "$" for p in big_packs))
        reader = threading.Thread(target=_try, args=(_pread, mnt / "big", 0, 1 << 20))
        reader.start()
        try:
            # runs of several chunks (a small one goes on the trio loop, not a thread)
            poll(lambda: sum(_range_length(s.range) > (256 << 10) for s in proxy.seen()) >= 8, 10,
                 "the readahead's runs to stall on the store")
            t0 = time.monotonic()
            assert sorted(os.listdir(mnt / "sub")) == ["f0", "f1", "f2"]
            took = time.monotonic() - t0
            assert took < timeout / 2, f"the listing waited {took:.1f} s for the stalled loads"
        finally:
            proxy.set_mode("pass")
            reader.join(timeout=60)


def _range_length(header: str | None) -> int:
    """The length a ``Range: bytes=A-B`` header asks for; 0 without one."""
    if not header:
        return 0
    first, _, last = header.removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1


def test_sigterm_unmounts_while_a_store_read_stalls(served, tmp_path: Path) -> None:
    """SIGTERM ends a mount promptly though a read waits on a stalled store (with a
    deadline far away): the read fails with EIO, the daemon exits 0, nothing stays
    mounted."""
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    big = max(_files(src), key=lambda p: p.stat().st_size).relative_to(src)
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout=60",
                 expect_warnings=True) as m:
        os.close(os.open(mnt / big, os.O_RDONLY))
        proxy.set_mode("stall", match=r"/packs/")
        result: list[object] = []
        reader = threading.Thread(target=lambda: result.append(_try(_pread, mnt / big, 0, 1 << 20)))
        reader.start()
        try:
            poll(lambda: any("/packs/" in s.path for s in proxy.seen()), 10, "the read to reach the store")
            os.kill(m.pid, signal.SIGTERM)
            poll(lambda: not is_mounted(mnt), 5, "the mount to go away after SIGTERM")
            wait_exit(m.pid, 5)  # not after its stalled GETs time out (10 s)
            log = m.log.read_bytes()[m.log_start:].decode(errors="replace")
            assert "INFO cafs.mount: unmounted" in log and "the mount loop failed" not in log, log
            reader.join(timeout=5)
            assert not reader.is_alive(), "the stalled read did not end with the mount"
            assert isinstance(result[0], OSError) and result[0].errno == errno.EIO, result
        finally:
            proxy.set_mode("pass")
            reader.join(timeout=60)


def test_the_reads_a_sigterm_ends_are_not_each_logged_as_errors(served, tmp_path: Path) -> None:
    """Each read that a SIGTERM ended (EIO, as asked) logged an ERROR line of its own:
    a hundred or more for a busy mount, hiding the one line saying it was unmounting."""
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    files = [p.relative_to(src) for p in _files(src) if p.stat().st_size > 0][:8]
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'},timeout=60") as m:
        for path in files:
            os.close(os.open(mnt / path, os.O_RDONLY))
        proxy.set_mode("stall", match=r"/packs/")
        with ThreadPoolExecutor(len(files)) as pool:
            try:
                results = [pool.submit(_try, _pread, mnt / path, 0, 1 << 20) for path in files]
                poll(lambda: any("/packs/" in s.path for s in proxy.seen()), 10, "the reads to reach the store")
                os.kill(m.pid, signal.SIGTERM)
                wait_exit(m.pid, 5)
            finally:
                proxy.set_mode("pass")
        got = [r.result() for r in results]
        assert all(isinstance(g, OSError) or g == _pread(src / path, 0, 1 << 20) for g, path in zip(got, files)), got
        assert any(isinstance(g, OSError) and g.errno == errno.EIO for g in got), got
    # mounted() finds no WARNING or ERROR line in the mount's log


def test_sigterm_exits_though_a_file_stays_open(served, tmp_path: Path) -> None:
    """A file held open keeps a detached mount's connection alive: the daemon still
    exits after its short grace (EXIT_GRACE), not when the file is closed."""
    src, _server, proxy, _www = served
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    small = next(p for p in _files(src) if p.stat().st_size > 0).relative_to(src)
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'}") as m:
        fd = os.open(mnt / small, os.O_RDONLY)
        try:
            assert os.pread(fd, 10, 0) == _pread(src / small, 0, 10)
            os.kill(m.pid, signal.SIGTERM)
            poll(lambda: not is_mounted(mnt), 5, "the mount to go away after SIGTERM")
            wait_exit(m.pid, 10)
            log = m.log.read_bytes()[m.log_start:].decode(errors="replace")
            assert "INFO cafs.mount: unmounted" in log, log
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # the flush of a file whose filesystem is gone
                assert exc.errno == errno.ENOTCONN, exc
