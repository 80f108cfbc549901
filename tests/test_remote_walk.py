"""Walks and extractions of a repository behind a real nginx (and a fault proxy): what
they cost in requests, and that reading ahead never costs a right answer.

A remote store charges its first-byte latency (10-200 ms) per request, so a walk must
not cost one request per directory, nor a get one per file or chunk: the metadata packs
a walk meets are read whole (``cafs.metacache``), and get reads neighbouring chunks
together, several at once (``cafs.readahead``). Counts come from the proxy's log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mountfix import env, import_tree, make_repo, mounted, run_cafs
from treegen import assert_same_tree, make_tree

from cafs.format.pack import KIND_DATA, KIND_META, trailer_of

WALKED_DIRS = 120


def _packs(repo: Path, kind: int) -> list[Path]:
    return [p for p in (repo / "packs").rglob("*")
            if p.is_file() and trailer_of(p.read_bytes(), bytes.fromhex(p.name), p.name).kind == kind]


@pytest.fixture
def many_dirs(tmp_path: Path, nginx_server, fault_proxy):
    """A repository of WALKED_DIRS small directories (a small file each) behind a proxy,
    the source, and the number of its metadata packs."""
    src = tmp_path / "src"
    for d in range(WALKED_DIRS):
        sub = src / f"d{d % 4}" / f"s{d:03d}"
        sub.mkdir(parents=True)
        (sub / "f").write_bytes(b"%d" % d)
    www = tmp_path / "www"
    cache = tmp_path / "import-cache"
    make_repo(www / "repo", cache)
    import_tree(src, www / "repo", "ds", cache)
    return src, fault_proxy(nginx_server(www)), len(_packs(www / "repo", KIND_META))


@pytest.fixture
def every_kind(tmp_path: Path, nginx_server, fault_proxy):
    """treegen's tree (big files across packs, sparse files, hard links, odd names) in a
    repository behind a proxy; the source, the proxy and the nginx root."""
    src = make_tree(tmp_path / "src", big_file_size=3 << 20)
    www = tmp_path / "www"
    cache = tmp_path / "import-cache"
    make_repo(www / "repo", cache)
    import_tree(src, www / "repo", "ds", cache)
    return src, fault_proxy(nginx_server(www)), www


def _pack_reads(proxy) -> int:  # type: ignore[no-untyped-def]
    return sum("/packs/" in seen.path for seen in proxy.seen())


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@contextmanager
def _mounted_through(proxy, tmp_path: Path) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """The repository mounted through ``proxy``, with a fresh cache."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(f"{proxy.url}/repo#ds", mnt, f"cache={tmp_path / 'cache'}"):
        yield mnt


def test_a_walk_of_a_remote_mount_reads_metadata_packs_whole(many_dirs, tmp_path: Path) -> None:
    """A walk (find, ls -R) of a remote tree costs about two requests per metadata pack,
    not one per directory."""
    src, proxy, meta_packs = many_dirs
    with _mounted_through(proxy, tmp_path) as mnt:
        proxy.reset_seen()
        assert _listing(mnt) == _listing(src)
        assert _pack_reads(proxy) <= 2 * meta_packs < WALKED_DIRS // 4


def test_a_walk_of_a_remote_repository_by_command_reads_metadata_packs_whole(many_dirs, tmp_path: Path) -> None:
    src, proxy, meta_packs = many_dirs
    proxy.reset_seen()
    r = run_cafs("ls", "-R", f"{proxy.url}/repo#ds", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == len(_listing(src))
    assert _pack_reads(proxy) <= 2 * meta_packs < WALKED_DIRS // 4


def test_a_damaged_read_of_a_whole_metadata_pack_costs_no_answer(many_dirs, tmp_path: Path) -> None:
    """The node a flipped byte lands on is read alone, and verified; every other one of
    the pack is used."""
    src, proxy, _meta_packs = many_dirs
    with _mounted_through(proxy, tmp_path) as mnt:
        proxy.set_mode("flip_bytes", match=r"/packs/", ranged=False, times=1)
        assert _listing(mnt) == _listing(src)
        assert proxy.faults_fired == 1


def test_a_remote_get_reads_the_chunks_of_many_files_together(many_dirs, tmp_path: Path) -> None:
    src, proxy, meta_packs = many_dirs
    proxy.reset_seen()
    r = run_cafs("get", f"{proxy.url}/repo#ds", tmp_path / "out", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, tmp_path / "out")
    assert _pack_reads(proxy) < WALKED_DIRS // 4  # one per file before


def test_a_remote_get_is_byte_exact_and_resumes(every_kind, tmp_path: Path) -> None:
    """Read ahead or not, get writes the snapshot; a re-run mends DEST, reading ahead for
    what it lacks and comparing what has the right size."""
    src, proxy, _www = every_kind
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = run_cafs("get", f"{proxy.url}/repo#ds", out, cache=cache)
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, out)
    (out / "data" / "big").unlink()
    os.truncate(out / "data" / "sparse", 5000)
    with open(out / "data" / "text.txt", "r+b") as f:  # the same size, other bytes
        f.write(b"XXXX")
    for p in (out / "data" / "sub").iterdir():
        p.unlink()
    r = run_cafs("get", f"{proxy.url}/repo#ds", out, cache=cache)
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, out)


def test_a_remote_get_reads_a_chunk_alone_after_a_bad_run(every_kind, tmp_path: Path) -> None:
    """A run that comes back damaged is read again chunk by chunk: the get succeeds."""
    src, proxy, _www = every_kind
    proxy.set_mode("flip_bytes", match=r"/packs/", ranged=True, times=2)
    r = run_cafs("get", f"{proxy.url}/repo#ds", tmp_path / "out", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert proxy.faults_fired == 2
    assert_same_tree(src, tmp_path / "out")


def test_a_remote_get_names_a_damaged_chunk(every_kind, tmp_path: Path) -> None:
    """A chunk damaged in the store fails the get with its own id in the message, though
    it was read ahead with neighbours that are sound."""
    _src, proxy, www = every_kind
    data_packs = _packs(www / "repo", KIND_DATA)
    pack = max(data_packs, key=lambda p: p.stat().st_size)
    entries = trailer_of(pack.read_bytes(), bytes.fromhex(pack.name), pack.name).entries
    victim = entries[len(entries) // 2]
    with open(pack, "r+b") as f:
        f.seek(victim.offset + victim.stored_length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run_cafs("get", f"{proxy.url}/repo#ds", tmp_path / "out", cache=tmp_path / "cache")
    assert r.returncode != 0
    assert victim.id.hex()[:12] in r.stderr, r.stderr


def test_a_remote_get_from_a_stalled_store_fails_within_its_deadline(every_kind, tmp_path: Path) -> None:
    """The read ahead meets the stall: the get fails once, not once per chunk read ahead."""
    _src, proxy, _www = every_kind
    run_cafs("ls", f"{proxy.url}/repo#ds", cache=tmp_path / "cache")  # nodes cached: only chunks stall
    proxy.set_mode("stall", match=r"/packs/", ranged=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cafs.cli", "get", f"{proxy.url}/repo#ds", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, check=False,
                       env=env(CAFS_CACHE_DIR=str(tmp_path / "cache"), CAFS_TIMEOUT="2"))
    took = time.monotonic() - t0
    assert r.returncode != 0 and "timed out" in r.stderr, r.stderr
    assert took < 10, f"failed after {took:.1f} s with a deadline of 2 s"


def test_a_remote_cat_reads_a_file_s_chunks_together(every_kind, tmp_path: Path) -> None:
    src, proxy, _www = every_kind
    big = (src / "data" / "big").read_bytes()
    run_cafs("ls", f"{proxy.url}/repo#ds:data", cache=tmp_path / "cache")  # nodes cached
    proxy.reset_seen()
    r = subprocess.run([sys.executable, "-m", "cafs.cli", "cat", f"{proxy.url}/repo#ds:data/big"],
                       capture_output=True, timeout=120, check=False, env=env(CAFS_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr
    assert r.stdout == big
    assert _pack_reads(proxy) <= len(big) // (512 << 10) + 2  # a read per pack (512 KiB); per chunk before
