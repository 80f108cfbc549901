"""``cafs prefetch`` and ``cafs cache status``: warming a host's chunk cache, and saying
how much of a snapshot it holds.

The oracle: after a prefetch, a mount using the same cache reads the whole tree (equal to
the source) with nothing fetched from the store; ``cafs fsck --cache`` finds the cache
clean even after a prefetch met a damaged pack. Commands run in-process (fast); mounts
are real (``mountfix.mounted``), and one repository is served by a real nginx.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mountfix import import_tree, make_repo, mounted, run_cafs
from remote_fixtures import StartNginx
from treegen import assert_same_tree, make_tree

from cafs.cli import main as cafs_main
from cafs.format.pack import pack_key
from cafs.metacache import NodeReader
from cafs.naming import find_snapshot
from cafs.repository import Repository
from cafs.stores import open_store
from cafs.tree import file_spans, resolve


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        assert self.code == 0, self.err
        return dict(json.loads(self.out))


def cafs(*args: str | Path) -> Result:
    """``cafs ARGS`` in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cafs_main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


@dataclass
class Dataset:
    src: Path
    repo: Path
    source: str  # REPO#NAME


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    base = tmp_path_factory.mktemp("prefetch-data")
    src = make_tree(base / "src", seed=5)
    repo = make_repo(base / "repo", base / "import-cache")
    return Dataset(src, repo, import_tree(src, repo, "snap", base / "import-cache"))


@dataclass
class Warm:
    cache: Path
    first: dict[str, Any]  # the first prefetch's --json report


@pytest.fixture(scope="module")
def warm(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Warm:
    """A cache filled by one prefetch of the whole snapshot."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    return Warm(cache, cafs("prefetch", dataset.source, "--cache", cache, "--json").json())


def stored_bytes(target: str, cache: Path) -> int:
    return int(cafs("stats", target, "--cache", cache, "--json").json()["stored_bytes"])


def status(cache: Path, *targets: str) -> dict[str, Any]:
    return cafs("cache", "status", *targets, "--cache", cache, "--json").json()


def new_dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path


# -- a local repository ------------------------------------------------------------------


def test_prefetch_fetches_every_chunk_of_the_snapshot_once(dataset: Dataset, warm: Warm) -> None:
    r = warm.first
    # the tree repeats files (dups/, copy-of-dups): shared chunks are fetched once
    assert r["stored_bytes"] == stored_bytes(dataset.source, warm.cache)
    assert r["fetched_bytes"] == r["stored_bytes"] and r["fetched_chunks"] == r["chunks"]
    assert r["skipped_chunks"] == r["failed_chunks"] == 0 and r["errors"] == []
    assert r["cached_share"] == 1.0 and r["cached_bytes"] == r["stored_bytes"]
    assert 0 < r["runs"] < r["chunks"], "chunks were not coalesced into runs"


def test_a_cache_whose_directories_an_older_cafs_made_group_writable_is_named_at_once(
        dataset: Dataset, warm: Warm, tmp_path: Path) -> None:
    # a cafs before private cache directories made them under umask 002 (common on
    # clusters): each command named one directory to chmod, and once those it named were
    # mended, prefetch exited 0 having cached nothing (each data/XX refused its writes)
    cache = tmp_path / "cache"
    shutil.copytree(warm.cache, cache)
    (root,) = [p for p in cache.iterdir() if (p / "meta.lmdb").is_dir()]
    subdirs = sorted((root / "data").iterdir())
    assert len(subdirs) >= 2
    assert cafs("cache", "gc", "--size", "0", "--cache", cache).code == 0
    for d in subdirs:
        d.chmod(0o775)
    r = cafs("prefetch", dataset.source, "--cache", cache, "--json")
    assert r.code == 1 and r.err.count("\n") == 1, r.out + r.err
    assert (f"cache directory {subdirs[0]} (mode 0775) and {len(subdirs) - 1} other "
            f"director{'y' if len(subdirs) == 2 else 'ies'} of it writable by other users") in r.err
    assert r.err.endswith(f"chmod -R go-w {root}\n")
    for d in subdirs:
        d.chmod(0o755)
    assert cafs("prefetch", dataset.source, "--cache", cache, "--json").json()["cached_share"] == 1.0


def test_cache_status_reports_the_snapshot_fully_cached(dataset: Dataset, warm: Warm) -> None:
    doc = status(warm.cache, dataset.source)
    (cache,) = doc["caches"]
    assert cache["size"] == warm.first["stored_bytes"] and cache["limit"] == 10 << 30
    (share,) = doc["snapshots"]
    assert share["snapshot"] == "snap@1" and share["share"] == 1.0
    assert share["cached_chunks"] == share["chunks"] == warm.first["chunks"]


def test_cache_status_without_names_shows_the_snapshots_used(dataset: Dataset, warm: Warm,
                                                            tmp_path: Path) -> None:
    doc = status(warm.cache)
    (share,) = doc["snapshots"]
    assert share["snapshot"] == "snap@1" and share["share"] == 1.0
    assert share["target"] == f"{dataset.repo.absolute()}#snap@1"
    text = cafs("cache", "status", "--cache", warm.cache)
    assert "snap@1: 100" in text.out, text.out
    # a recorded repository that has gone away is named, and the rest still shown
    gone = tmp_path / "gone"
    shutil.copytree(dataset.repo, gone)
    r = cafs("prefetch", f"{gone}#snap", "--cache", warm.cache, "--json").json()
    assert r["fetched_bytes"] == 0
    shutil.rmtree(gone)
    doc = status(warm.cache)
    by_target = {sh["target"]: sh for sh in doc["snapshots"]}
    assert by_target[f"{dataset.repo.absolute()}#snap@1"]["share"] == 1.0
    assert "error" in by_target[f"{gone}#snap@1"]


def test_cache_status_shows_every_cache_it_can_read_and_names_one_of_a_newer_layout(
        dataset: Dataset, warm: Warm, tmp_path: Path) -> None:
    # one cache a newer cafs made under the cache directory (a host where two versions
    # run) made `cafs cache status` show no cache at all: one error line, exit 1
    import lmdb

    cache = tmp_path / "cache"
    shutil.copytree(warm.cache, cache)
    (root,) = [p for p in cache.iterdir() if (p / "meta.lmdb").is_dir()]
    newer = cache / ("0" * 64)  # first in the listing
    shutil.copytree(root, newer)
    env = lmdb.open(str(newer / "meta.lmdb"), max_dbs=8)
    with env.begin(db=env.open_db(b"cachestat"), write=True) as txn:
        txn.put(b"layout", (2).to_bytes(8, "big"))  # as a cafs of cache layout 2 would
    env.close()
    data = (newer / "meta.lmdb" / "data.mdb").read_bytes()
    said = f"cafs: the cache in {newer} has layout version 2, which a newer cafs made; this cafs reads layout 1"
    r = cafs("cache", "status", "--cache", cache)
    assert r.code == 1 and r.err.startswith(said) and r.err.count("\n") == 1, r.out + r.err
    assert r.out.startswith(f"{root.name[:16]}: ") and "snap@1: 100.0% cached" in r.out, r.out
    r = cafs("cache", "status", "--cache", cache, "--json")
    assert r.code == 1 and r.err.startswith(said), r.err
    doc = json.loads(r.out)
    assert [c["repo_id"] for c in doc["caches"]] == [root.name]
    by_target = {sh["target"]: sh for sh in doc["snapshots"]}
    assert by_target[f"{dataset.repo.absolute()}#snap@1"]["share"] == 1.0
    (unread,) = doc["unreadable_caches"]
    assert unread["repo_id"] == newer.name and said[len("cafs: "):] in unread["error"]
    assert (newer / "meta.lmdb" / "data.mdb").read_bytes() == data  # left as the newer cafs made it


def test_second_prefetch_fetches_nothing(dataset: Dataset, warm: Warm) -> None:
    r = cafs("prefetch", dataset.source, "--cache", warm.cache, "--json").json()
    assert r["fetched_bytes"] == r["fetched_chunks"] == r["runs"] == 0
    assert r["skipped_chunks"] == r["chunks"] and r["cached_share"] == 1.0


def test_mount_reads_a_prefetched_cache_without_the_store(dataset: Dataset, warm: Warm,
                                                          tmp_path: Path) -> None:
    opts = f"cache={warm.cache},cache_mode=full"
    with mounted(dataset.source, new_dir(tmp_path, "mnt"), opts) as m:
        assert_same_tree(dataset.src, m.path, symlink_mtimes=True)
        s = m.stats()
        assert s["bytes_fetched"] == s["cache_misses"] == 0 and s["cache_hits"] > 0
    # the mount's counters were persisted in the cache: status shows its hit rate
    (cache,) = status(warm.cache)["caches"]
    assert cache["hits"] > 0 and cache["misses"] == 0 and cache["hit_rate"] == 1.0


def test_prefetch_of_paths_caches_their_share(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = cafs("prefetch", dataset.source, "data/sub", "dups", "--cache", cache, "--json").json()
    want = stored_bytes(f"{dataset.source}:data/sub", cache) + stored_bytes(f"{dataset.source}:dups", cache)
    assert r["paths"] == ["data/sub", "dups"]
    assert r["stored_bytes"] == r["fetched_bytes"] == r["cached_bytes"] == want
    whole = stored_bytes(dataset.source, cache)
    doc = status(cache, dataset.source, f"{dataset.source}:dups", f"{dataset.source}:data/big")
    snap, dups, big = doc["snapshots"]
    assert snap["cached_bytes"] == want and snap["stored_bytes"] == whole
    assert snap["share"] == pytest.approx(want / whole, abs=1e-6) and 0 < snap["share"] < 1
    assert dups["share"] == 1.0 and big["share"] == 0.0


def test_prefetch_into_a_cache_it_cannot_write_stops_naming_it(dataset: Dataset, tmp_path: Path) -> None:
    # a cache that refused writes for a reason other than space (a read-only disk here;
    # EACCES, EIO) made prefetch fetch the whole tree for nothing, say "cached now: 0 B"
    # and exit 0. Root writes whatever the modes say: a read-only bind mount of data/
    cache = tmp_path / "cache"
    assert cafs("prefetch", f"{dataset.source}:dups", "--cache", cache, "--json").json()["cached_bytes"] > 0
    (root,) = [p for p in cache.iterdir() if (p / "meta.lmdb").is_dir()]
    before = status(cache, dataset.source)["snapshots"][0]["cached_chunks"]
    data = root / "data"
    bind = subprocess.run(["mount", "--bind", data, data], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount: {bind.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", data], check=True)
        r = cafs("prefetch", dataset.source, "--cache", cache)
    finally:
        subprocess.run(["umount", data], check=True)
    assert r.code == 1 and r.err.count("\n") == 1, r.out + r.err
    assert r.err.startswith(f"cafs: cache {root} cannot be written: Read-only file system ({data}/"), r.err
    assert status(cache, dataset.source)["snapshots"][0]["cached_chunks"] == before  # nothing lost
    r = cafs("fsck", dataset.repo, "--cache", cache)
    assert r.code == 0, r.out + r.err


def test_prefetch_of_a_mountpoint_fills_the_mounts_cache(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "mount-cache"
    with mounted(dataset.source, new_dir(tmp_path, "mnt"), f"cache={cache},cache_size=64M,cache_mode=full") as m:
        part = cafs("prefetch", m.path / "dups", "--json").json()  # a directory inside the mount
        assert part["paths"] == ["dups"] and part["cache_limit"] == 64 << 20
        assert part["cache"].startswith(str(cache)) and part["fetched_bytes"] > 0
        whole = cafs("prefetch", m.path, "--json").json()
        assert whole["skipped_chunks"] == part["chunks"] and whole["cached_share"] == 1.0
        assert whole["fetched_bytes"] == whole["stored_bytes"] - part["stored_bytes"]
        assert_same_tree(dataset.src, m.path, symlink_mtimes=True)
        s = m.stats()
        assert s["bytes_fetched"] == 0 and s["cache_hits"] > 0
        again = cafs("prefetch", m.path, "--json").json()
        assert again["fetched_bytes"] == 0 and again["cached_share"] == 1.0


def test_prefetch_refuses_a_mount_without_a_chunk_cache(dataset: Dataset, tmp_path: Path) -> None:
    with mounted(dataset.source, new_dir(tmp_path, "mnt"), f"cache={tmp_path / 'cache'}") as m:
        r = cafs("prefetch", m.path)
    assert r.code == 2 and "cache_mode=meta" in r.err and r.out == ""


def test_prefetch_meets_a_damaged_pack(dataset: Dataset, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(dataset.repo, repo)
    r = Repository.open(open_store(str(repo)))
    reader = NodeReader(r, None)
    span = file_spans(reader, resolve(reader, find_snapshot(r, "snap").root, b"data/big"))[1]
    pack = repo / pack_key(span.pack)
    data = bytearray(pack.read_bytes())
    data[span.offset + span.stored_length // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    result = cafs("prefetch", f"{repo}#snap", "--cache", cache, "--json")
    assert result.code == 1
    assert span.id.hex()[:12] in result.err and "does not match" in result.err
    report = json.loads(result.out)
    assert report["failed_chunks"] == 1 and report["cached_chunks"] == report["chunks"] - 1
    check = run_cafs("fsck", repo, "--cache", cache, "--json", cache=cache)
    assert json.loads(check.stdout)["cache_problems"] == [], check.stdout


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs 0"),
    (["--jobs", "65"], "--jobs 65"),
    (["no/such/path"], "no such file"),
    (["../up"], "'..'"),
    (["/abs"], "needs a MOUNTPOINT"),
    (["--cache-size", "1K"], "--cache-size"),
    (["--cache-size", "2000000T"], "--cache-size"),  # past 64 bits: was a struct.error traceback
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2(dataset: Dataset, tmp_path: Path, args: list[str], message: str) -> None:
    r = cafs("prefetch", dataset.source, *args, "--cache", tmp_path / "cache")
    assert r.code == 2 and message in r.err and r.out == ""


@pytest.mark.parametrize("target, message", [
    ("no-such-thing", "neither a cafs mount nor a snapshot"),
    (".", "not in a cafs mount"),
])
def test_bad_targets_exit_2(target: str, message: str, tmp_path: Path) -> None:
    r = cafs("prefetch", target, "--cache", tmp_path / "cache")
    assert r.code == 2 and message in r.err


# -- a repository over HTTP ----------------------------------------------------------------


def test_prefetch_over_http_then_mount_reads_only_the_cache(dataset: Dataset, nginx_server: StartNginx,
                                                            tmp_path: Path) -> None:
    server = nginx_server()
    url = server.url + "/repo"
    cache = tmp_path / "cache"
    make_repo(url, cache)
    source = import_tree(dataset.src, url, "snap", cache)
    prefetch_cache = tmp_path / "host-cache"
    r = cafs("prefetch", source, "--cache", prefetch_cache, "--json").json()
    assert r["fetched_bytes"] == r["stored_bytes"] > 0 and r["cached_share"] == 1.0
    assert status(prefetch_cache, source)["snapshots"][0]["share"] == 1.0
    with mounted(source, new_dir(tmp_path, "mnt"), f"cache={prefetch_cache}") as m:
        assert_same_tree(dataset.src, m.path, symlink_mtimes=True)
        s = m.stats()
        assert s["bytes_fetched"] == 0 and s["cache_hits"] > 0
