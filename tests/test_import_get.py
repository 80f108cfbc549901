"""Import a tree, then read it back with ``cafs get``, ``cat``, ``ls``, ``stats``, ``diff``.

The oracle is the source tree itself: what comes back must equal it in names, types,
sizes, modes, mtimes (directories too), symlink targets and every byte. Space is checked
against the bytes on disk under ``packs/``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cafs.cli import show_path
from cafs.importer import ImportResult, run_import
from cafs.check import Checker
from cafs.metacache import MetaCache, NodeReader
from cafs.repository import Repository
from cafs.snapinfo import diff_trees, snapshot_space
from cafs.stores import open_store
from cafs.tree import walk
from treegen import assert_same_tree, make_tree, manifest, mutate_tree

PACK_SIZE = 512 << 10
CHUNK_MAX = 256 << 10
META_SLACK = 64 << 10
BIG_FILE = 3 << 20  # several packs' worth in one file
INT64_MAX = (1 << 63) - 1
SRC_ROOT = str(Path(__file__).resolve().parents[1])
T = TypeVar("T")


def packs_bytes(repo: Path) -> int:
    """Bytes of complete packs (temporary files of interrupted writes excluded)."""
    return sum(p.stat().st_size for p in (repo / "packs").rglob("*")
               if p.is_file() and not p.name.startswith(".tmp-"))


def file_bytes(tree: Path) -> int:
    return sum(item.size for item in manifest(tree).values() if item.kind == "f")


def parse_human(text: str) -> float:
    """Bytes from cafs's human form (``12 B``, ``3.5 MiB``)."""
    number, unit = text.split()
    return float(number) * 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(unit)


def get_counts(stderr: str) -> tuple[float, float]:
    """(bytes written, bytes already correct) from the summary of ``cafs get``."""
    m = re.search(r"([\d.]+ \w+) written, ([\d.]+ \w+) already correct", stderr)
    assert m, stderr
    return parse_human(m.group(1)), parse_human(m.group(2))


_LS_LINE = re.compile(r"\S{10} +\d+ +\d+ +\d+ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  (.*)")


def ls_name(line: str) -> str:
    """The name column of a ``cafs ls`` line (with `` -> target`` for a symlink)."""
    m = _LS_LINE.fullmatch(line)
    assert m, line
    return m.group(1)


def cafs_bytes(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """``cafs ARGS`` as a subprocess with binary stdout (for ``cat``)."""
    env = dict(os.environ, PYTHONPATH=SRC_ROOT)
    return subprocess.run([sys.executable, "-m", "cafs.cli", *map(os.fspath, args)],
                          capture_output=True, env=env, timeout=120)


def snapshot_doc(cafs, repo: Path, name: str) -> list[dict]:
    r = cafs("snapshots", repo, name, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a fresh tmpfs when we may mount one (a hundred thousand small files
    on a journaling disk cost more in writeback than in cafs), else a plain directory."""
    path = tmp_path / "fast"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", path],
                             capture_output=True).returncode == 0
    try:
        yield path
    finally:
        if mounted and subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", path], check=True)  # busy: detach it anyway


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src", seed=7, big_file_size=BIG_FILE)


@pytest.fixture
def ds(cafs, repo: Path, src: Path) -> str:
    """``src`` imported as ref ``ds``; returns ``REPO#ds``."""
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    return f"{repo}#ds"


def test_get_tree_equals_source(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    r = cafs("get", ds, tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "out")


def test_import_passes_fsck(cafs, ds: str, repo: Path) -> None:
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err


def test_get_single_file(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    r = cafs("get", f"{ds}:data/big", tmp_path / "big.copy")
    assert r.code == 0, r.err
    assert_same_tree(src / "data" / "big", tmp_path / "big.copy")


def test_get_single_file_into_existing_directory(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    (tmp_path / "into").mkdir()
    r = cafs("get", f"{ds}:data/script.sh", tmp_path / "into")
    assert r.code == 0, r.err
    assert os.listdir(tmp_path / "into") == ["script.sh"]
    assert_same_tree(src / "data" / "script.sh", tmp_path / "into" / "script.sh")


def test_get_single_file_into_a_new_directory_named_with_a_slash(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    # 'DEST/' made a file named DEST, and wrote over a file DEST
    r = cafs("get", f"{ds}:data/script.sh", f"{tmp_path / 'new' / 'into'}/")
    assert r.code == 0, r.err
    assert os.listdir(tmp_path / "new" / "into") == ["script.sh"]
    assert_same_tree(src / "data" / "script.sh", tmp_path / "new" / "into" / "script.sh")
    (tmp_path / "file").write_bytes(b"keep\n")
    r = cafs("get", f"{ds}:data/script.sh", f"{tmp_path / 'file'}/")
    assert r.code == 1 and "is not a directory" in r.err, r.err
    assert (tmp_path / "file").read_bytes() == b"keep\n"


def test_get_to_an_empty_dest_is_a_usage_error(cafs, ds: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # '' was the current directory
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r = cafs("get", ds, "")
    assert r.code == 2 and "empty DEST" in r.err, r.err
    assert os.listdir(tmp_path / "cwd") == []


def test_get_subdirectory(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    r = cafs("get", f"{ds}:data", tmp_path / "data.copy")
    assert r.code == 0, r.err
    assert_same_tree(src / "data", tmp_path / "data.copy")


def test_cat_writes_exact_bytes(ds: str, src: Path) -> None:
    for rel in ("data/big", "data/f0000000", "dups/copy2", "odd/\udcff\udcfenot-utf8"):
        r = cafs_bytes("cat", f"{ds}:{rel}")
        assert r.returncode == 0, r.stderr
        assert r.stdout == (src / rel).read_bytes(), rel


@pytest.mark.parametrize("args", [("cat", ":data/big"), ("ls", ""), ("ls", ":data")])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(ds: str, args: tuple[str, str]) -> None:
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "cafs.cli", args[0], ds + args[1]], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr == "cafs: standard output: No space left on device\n", r.stderr


def test_cat_to_a_closed_stdout_says_so(ds: str) -> None:
    r = subprocess.run(f"{shlex.quote(sys.executable)} -m cafs.cli cat {shlex.quote(ds + ':data/big')} >&-",
                       shell=True, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1
    assert "standard output is closed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ls_shows_odd_names_escaped(cafs, ds: str) -> None:
    r = cafs("ls", f"{ds}:odd")
    assert r.code == 0, r.err
    names = [ls_name(line) for line in r.out.splitlines()]
    assert len(names) == 9
    for shown in ("with space", r"new\nline", r"tab\there", r"\xff\xfenot-utf8", "-dash",
                  "ünïcødé-名前", "x" * 255):
        assert shown in names
    assert all(ch.isprintable() for name in names for ch in name)


def test_ls_recursive_lists_every_path(cafs, ds: str, src: Path) -> None:
    r = cafs("ls", "-R", ds)
    assert r.code == 0, r.err
    shown = set()
    for line in r.out.splitlines():
        path = ls_name(line)
        if line.startswith("l"):
            path = path.rsplit(" -> ", 1)[0]
        shown.add(path)
    expected = {show_path(p) for p in manifest(src) if p}
    assert shown == expected
    assert len(r.out.splitlines()) == len(expected)


@pytest.mark.parametrize("args", [("ls", "data/big/"), ("ls", "data/big//"), ("ls", "/data/sub/s01/"),
                                  ("cat", "data/big/"), ("get", "data/big/"), ("stats", "data/big/"),
                                  ("prefetch", "data/big/"), ("prefetch PATH", "data/big/"), ("cache", "data/big/")])
def test_a_trailing_slash_after_a_file_is_not_a_directory(cafs, ds: str, tmp_path: Path,
                                                          args: tuple[str, str]) -> None:
    # 'ls REPO#NAME:f/' listed the file f, 'cat' wrote it, 'get' extracted it: POSIX
    # tools refuse 'f/' as "Not a directory", and so does every cafs command now, with
    # the code of a missing path (prefetch gives 2 to both)
    command, path = args

    def run(path: str) -> Any:
        argv = {"get": ("get", f"{ds}:{path}", tmp_path / "out"), "cache": ("cache", "status", f"{ds}:{path}"),
                "prefetch PATH": ("prefetch", f"{ds}:data/", path.removeprefix("data/"), "--no-progress")}
        return cafs(*argv.get(command, (command, f"{ds}:{path}")))

    missing = run("data/nope")
    r = run(path)
    assert r.code == missing.code != 0, (r.code, missing.code, r.out, r.err)
    assert r.err.endswith(f"{path.strip('/')}/: not a directory\n") and r.err.count("\n") == 1, r.err
    assert r.out == "" and not (tmp_path / "out").exists()


def test_a_trailing_slash_after_a_directory_or_a_symlink_is_as_without_it(cafs, ds: str) -> None:
    for plain, slashed in (("", ":/"), (":data/sub", ":data/sub/"), (":data", "://data//"),
                           (":links/to-dir", ":links/to-dir/"), (":links/relative", ":links/relative/")):
        for flags in ((), ("-R",)):
            want = cafs("ls", *flags, ds + plain)
            assert want.code == 0 and want.out, want.err
            assert cafs("ls", *flags, ds + slashed) == want
    assert cafs("prefetch", f"{ds}:data/", "sub/", "--no-progress").code == 0


def test_ls_line_shows_type_mode_and_size(cafs, ds: str, src: Path) -> None:
    r = cafs("ls", f"{ds}:data/readonly")
    assert r.code == 0, r.err
    fields = r.out.split()
    assert fields[0] == "-r--r--r--"
    assert int(fields[3]) == (src / "data" / "readonly").stat().st_size


@pytest.mark.parametrize("form", ["name", "name@jid", "root id", "root id prefix"])
def test_snapshot_selectors(cafs, repo: Path, src: Path, ds: str, form: str) -> None:
    (src / "data" / "extra").write_bytes(b"second snapshot\n")
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    first, second = snapshot_doc(cafs, repo, "ds")
    assert first["root"] != second["root"]
    selector = {"name": "ds", "name@jid": "ds@1", "root id": first["root"],
                "root id prefix": first["root"][:12]}[form]
    want = second if form == "name" else first
    r = cafs("stats", f"{repo}#{selector}", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["root"] == want["root"]


def test_a_ref_named_like_a_root_id_is_ambiguous_not_hidden(cafs, repo: Path, src: Path, ds: str) -> None:
    (root,) = (s["root"] for s in snapshot_doc(cafs, repo, "ds"))
    prefix = root[:16]
    r = cafs("import", src / "data", repo, "--name", prefix, "--no-progress")
    assert r.code == 0, r.err
    r = cafs("stats", f"{repo}#{prefix}", "--json")
    assert r.code != 0
    assert "both a ref and the start of a snapshot's root id" in r.err, r.err
    r = cafs("stats", f"{repo}#{prefix}@1", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["root"] != root


def test_diff_after_mutation(cafs, repo: Path, src: Path, ds: str) -> None:
    m = mutate_tree(src, seed=3)
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("diff", f"{repo}#ds@1", f"{repo}#ds@2")
    assert r.code == 0, r.err
    expected = ({f"+ {show_path(p)}" for p in m["added"]} | {f"- {show_path(p)}" for p in m["removed"]}
                | {f"M {show_path(p)}" for p in m["modified"]})
    assert set(r.out.splitlines()) == expected
    assert len(r.out.splitlines()) == len(expected)


def test_diff_of_identical_snapshots_is_empty(cafs, repo: Path, src: Path, ds: str) -> None:
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("diff", f"{repo}#ds@1", f"{repo}#ds@2")
    assert r.code == 0, r.err
    assert r.out == ""


def test_stats_of_snapshot(cafs, ds: str, src: Path) -> None:
    r = cafs("stats", ds, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    items = manifest(src, include_root=True).values()
    assert doc["files"] == sum(i.kind == "f" for i in items)
    assert doc["dirs"] == sum(i.kind == "d" for i in items)
    assert doc["symlinks"] == sum(i.kind == "l" for i in items)
    assert doc["logical_bytes"] == file_bytes(src)
    assert doc["unique_bytes"] < doc["logical_bytes"]  # dups/ holds four copies and a hard link
    assert doc["dedup_ratio"] > 1
    assert doc["stored_bytes"] <= doc["unique_bytes"]


def test_stats_of_repository(cafs, repo: Path, ds: str, src: Path) -> None:
    r = cafs("stats", repo, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["snapshots"] == 1
    assert doc["logical_bytes"] == file_bytes(src)
    assert doc["dedup_ratio"] > 1
    assert doc["stored_bytes"] == packs_bytes(repo)
    assert doc["packs"] == sum(1 for p in (repo / "packs").rglob("*") if p.is_file())
    assert doc["packs"] > BIG_FILE // PACK_SIZE


def test_identical_copy_adds_no_data(cafs, repo: Path, src: Path, ds: str, tmp_path: Path) -> None:
    before = json.loads(cafs("stats", repo, "--json").out)
    stored_before = packs_bytes(repo)
    shutil.copytree(src, tmp_path / "copy", symlinks=True)
    r = cafs("import", tmp_path / "copy", repo, "--name", "copy", "--no-progress")
    assert r.code == 0, r.err
    assert ", new 0 B," in r.out
    after = json.loads(cafs("stats", repo, "--json").out)
    assert (after["chunks"], after["unique_bytes"]) == (before["chunks"], before["unique_bytes"])
    # only metadata may be new: the copy's directories have other mtimes and inodes
    assert packs_bytes(repo) - stored_before < META_SLACK


def test_a_directory_under_refs_that_no_ref_may_be_named_is_not_a_ref(cafs, repo: Path, ds: str) -> None:
    # put there by hand or another tool: every listing of the repository failed on it
    for bad in ("bad name", ".hidden", "-x"):
        (repo / "refs" / bad).mkdir()
        shutil.copy(repo / "refs" / "ds" / f"{1:020d}", repo / "refs" / bad / f"{1:020d}")
    r = cafs("snapshots", repo, "--json")
    assert r.code == 0, r.err
    assert [s["ref"] for s in json.loads(r.out)] == ["ds"]
    r = cafs("gc", repo, "--dry-run")
    assert r.code == 0, r.err
    r = cafs("fsck", repo)  # fsck still names what does not belong
    assert r.code == 4 and "refs/bad name/" in r.out, r.out + r.err


def test_a_repository_whose_path_holds_a_hash_is_named_by_its_file_url(cafs, src: Path, tmp_path: Path) -> None:
    repo = tmp_path / "runs#2 100%"
    r = cafs("init", repo)
    assert r.code == 0 and repo.as_uri() in r.err, r.err  # file:///.../runs%232%20100%25
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    r = cafs("ls", f"{repo.as_uri()}#ds:data/sub")
    assert r.code == 0 and "s00" in r.out, r.err
    r = cafs("ls", f"file://elsewhere{repo}#ds")
    assert r.code == 2 and "not on 'elsewhere'" in r.err


def test_a_mirror_of_another_repository_is_never_read(cafs, repo: Path, ds: str, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # a mirror answers the names its repository lacks: another repository's journal
    # would have been taken for this one's (ls REPO#elsewhere@1 listed the other dataset);
    # what the repository lacks is then missing (the error was the mirror's, not that)
    other = tmp_path / "other"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "not-ours").write_bytes(b"x")
    assert cafs("init", other).code == 0
    assert cafs("import", tmp_path / "elsewhere", other, "--name", "elsewhere", "--no-progress").code == 0
    r = cafs("ls", f"{repo}#elsewhere@1", "--mirror", other)
    assert r.code == 1 and "not-ours" not in r.out, r.out
    assert "ref 'elsewhere' has no snapshot 1" in r.err, r.err
    assert f"mirror file://{other} holds another repository" in caplog.text
    r = cafs("ls", f"{ds}:data/sub", "--mirror", other)  # what the repository has is read as before
    assert r.code == 0 and "s00" in r.out, r.err
    r = cafs("fsck", repo, "--repair", "--mirror", other)
    assert r.code == 2 and f"--mirror {other} holds another repository" in r.err


def test_reimport_unchanged_reads_nothing(cafs, repo: Path, src: Path, ds: str) -> None:
    stored_before = packs_bytes(repo)
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    assert ", read 0 B," in r.out
    first, second = snapshot_doc(cafs, repo, "ds")
    assert (first["jid"], second["jid"]) == (1, 2)
    assert first["root"] == second["root"]
    assert packs_bytes(repo) == stored_before


def test_incremental_import_stores_about_the_new_bytes(cafs, repo: Path, src: Path, ds: str,
                                                        tmp_path: Path) -> None:
    stored_before = packs_bytes(repo)
    m = mutate_tree(src, seed=5)
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    growth = packs_bytes(repo) - stored_before
    # new files are new bytes; a modified file adds at most its changed chunks
    assert growth <= m["new_bytes"] + len(m["modified"]) * CHUNK_MAX + META_SLACK
    r = cafs("get", f"{repo}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "out")


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_get_resumes_and_repairs(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cafs("get", ds, out).code == 0
    _flip_byte(out / "data" / "big", BIG_FILE // 2)
    (out / "data" / "f0016384").unlink()
    os.truncate(out / "data" / "text.txt", 1000)
    (out / "odd" / "with space").chmod(0o600)
    shutil.rmtree(out / "data" / "sub")
    (out / "data" / "sub").write_bytes(b"a file where a directory was\n")
    r = cafs("get", ds, out)
    assert r.code == 0, r.err
    assert_same_tree(src, out)
    written, kept = get_counts(r.err)
    assert written < file_bytes(src) / 5
    assert kept > file_bytes(src) / 2


def test_get_rerun_writes_nothing(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    assert cafs("get", ds, tmp_path / "out").code == 0
    r = cafs("get", ds, tmp_path / "out")
    assert r.code == 0, r.err
    assert get_counts(r.err)[0] == 0
    assert_same_tree(src, tmp_path / "out")


def test_get_restores_hard_links(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cafs("get", ds, out)
    assert r.code == 0, r.err
    assert "1 of them hard links" in r.err, r.err
    first, second = os.stat(out / "dups" / "copy0"), os.stat(out / "dups" / "hardlink")
    assert (first.st_ino, first.st_nlink) == (second.st_ino, 2)
    assert os.stat(out / "dups" / "copy1").st_nlink == 1  # equal bytes, but never a link
    # a re-run keeps the link; a name that became a separate file is linked again
    (out / "dups" / "hardlink").unlink()
    shutil.copy2(out / "dups" / "copy0", out / "dups" / "hardlink")
    assert cafs("get", ds, out).code == 0
    assert os.stat(out / "dups" / "hardlink").st_ino == os.stat(out / "dups" / "copy0").st_ino
    assert_same_tree(src, out)


def test_get_restores_many_hard_link_groups_far_apart(cafs, tmp_path: Path) -> None:
    """A tree deduplicated with hard links (rdfind, hardlink): 600 files in one directory,
    each with a second name in another, so every group is open at once during the get."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    groups = 600
    for i in range(groups):
        (src / "a" / f"f{i:04d}").write_bytes(b"%d" % i)
        os.link(src / "a" / f"f{i:04d}", src / "b" / f"f{i:04d}")
    repo = tmp_path / "repo"
    assert cafs("init", repo).code == 0
    assert cafs("import", src, repo, "--name", "d", "--no-progress").code == 0
    out = tmp_path / "out"
    r = cafs("get", f"{repo}#d", out)
    assert r.code == 0, r.err
    assert f"{groups} of them hard links" in r.err, r.err
    for i in range(groups):
        assert os.stat(out / "a" / f"f{i:04d}").st_ino == os.stat(out / "b" / f"f{i:04d}").st_ino
    assert_same_tree(src, out)


def test_get_of_more_hard_links_than_open_files_allowed(cafs_proc, repo: Path, tmp_path: Path) -> None:
    """Under ``ulimit -n 64`` (soft and hard), a snapshot of 150 files each with a second
    name met after all the first names extracts whole: the files held open to link to
    are bounded by the limit: 256 of them took every descriptor and ended the get with
    'Too many open files'."""
    import resource

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    for i in range(150):
        (src / "a" / f"{i:03d}").write_bytes(b"file %d\n" % i)
        os.link(src / "a" / f"{i:03d}", src / "b" / f"{i:03d}")

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    r = cafs_proc("import", src, repo, "--name", "links", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = cafs_proc("get", f"{repo}#links", out, preexec_fn=few_files)
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, out)
    linked = sum(os.stat(out / "a" / f"{i:03d}").st_nlink == 2 for i in range(150))
    assert linked >= 1  # those it could hold open are links again; the rest are copies


def test_get_never_writes_through_a_hard_link(cafs, tmp_path: Path) -> None:
    """Names already in DEST that are hard links (to each other, from an earlier get of a
    snapshot where they were one file, or to a file outside DEST) are replaced, never
    written in place: the other names keep their bytes."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a").write_bytes(b"XXXX")
    os.link(one / "a", one / "b")
    (two / "a").write_bytes(b"AAAA")
    (two / "b").write_bytes(b"BBBB")
    repo = tmp_path / "repo"
    assert cafs("init", repo).code == 0
    for tree in (one, two):
        assert cafs("import", tree, repo, "--name", "h", "--no-progress").code == 0
    out = tmp_path / "out"
    assert cafs("get", f"{repo}#h@1", out).code == 0
    assert os.stat(out / "a").st_nlink == 2
    r = cafs("get", f"{repo}#h@2", out)
    assert r.code == 0, r.err
    assert_same_tree(two, out)
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(precious, elsewhere / "a")
    assert cafs("get", f"{repo}#h@2", elsewhere).code == 0
    assert precious.read_bytes() == b"precious"
    assert_same_tree(two, elsewhere)


def test_get_never_follows_a_symlink_out_of_dest(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "data").symlink_to(outside)
    (dest / "dups").symlink_to("../outside")
    r = cafs("get", ds, dest)
    assert r.code == 0, r.err
    assert os.listdir(outside) == []
    assert stat.S_ISDIR(os.lstat(dest / "data").st_mode)
    assert stat.S_ISDIR(os.lstat(dest / "dups").st_mode)
    assert_same_tree(src, dest)


def test_get_refuses_a_symlink_as_dest(cafs, ds: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    r = cafs("get", ds, tmp_path / "link")
    assert r.code != 0
    assert str(tmp_path / "link") in r.err
    assert os.listdir(outside) == []


@pytest.mark.parametrize("slash", ["", "/"])
def test_get_of_a_file_never_replaces_a_symlink_to_a_directory_as_dest(cafs, ds: str, tmp_path: Path,
                                                                        slash: str) -> None:
    # the user's symlink (/scratch -> /mnt/nvme/scratch, say) was deleted and a file put
    # in its place
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    r = cafs("get", f"{ds}:data/script.sh", f"{tmp_path / 'link'}{slash}")
    assert r.code == 1 and len(r.err.splitlines()) == 1, r.err
    assert "symlink to a directory" in r.err
    assert os.readlink(tmp_path / "link") == str(elsewhere)
    assert os.listdir(elsewhere) == []


def test_get_of_a_symlink_to_a_directory_again_keeps_it(cafs, ds: str, src: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()  # where links/to-dir (../data) points from tmp_path/out
    (tmp_path / "out").mkdir()
    for _run in range(2):
        r = cafs("get", f"{ds}:links/to-dir", tmp_path / "out" / "to-dir")
        assert r.code == 0, r.err
    assert_same_tree(src / "links" / "to-dir", tmp_path / "out" / "to-dir")


def test_get_never_removes_a_directory_with_a_filesystem_mounted_in_it(cafs, ds: str, tmp_path: Path) -> None:
    # a directory where the snapshot has a file was removed with all it held, the files
    # of a filesystem mounted below it too (then the mount point failed with EBUSY)
    dest = tmp_path / "out"
    mnt = dest / "data" / "big" / "mnt"
    mnt.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs")
    try:
        (mnt / "precious").write_bytes(b"precious\n")
        r = cafs("get", ds, dest)
        assert r.code == 1 and len(r.err.splitlines()) == 1, r.err
        assert "mounted" in r.err and "never removes" in r.err
        assert (mnt / "precious").read_bytes() == b"precious\n"
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_get_over_a_program_running_from_dest(cafs, repo: Path, tmp_path: Path) -> None:
    # a program running from DEST could not be opened for writing (ETXTBSY): a re-run of
    # the very snapshot it came from failed with "Text file busy", and so did an update
    src = tmp_path / "src"
    src.mkdir()
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, src / "tool")
    assert cafs("import", src, repo, "--name", "env", "--no-progress").code == 0
    dest = tmp_path / "out"
    assert cafs("get", f"{repo}#env", dest).code == 0
    running = subprocess.Popen([dest / "tool", "60"])
    try:
        r = cafs("get", f"{repo}#env", dest)
        assert r.code == 0, r.err
        assert get_counts(r.err)[0] == 0  # kept, not written
        (src / "tool").write_bytes(b"#!/bin/sh\nexit 0\n")
        assert cafs("import", src, repo, "--name", "env", "--no-progress").code == 0
        r = cafs("get", f"{repo}#env", dest)
        assert r.code == 0, r.err
        assert_same_tree(src, dest)
        assert os.readlink(f"/proc/{running.pid}/exe").endswith(" (deleted)")  # it keeps its file
    finally:
        running.kill()
        running.wait()


def repo_files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


@pytest.mark.parametrize("what, dest", [("tree", "."), ("tree", "packs/new"), ("file", "config"),
                                        ("file", ".")])
def test_get_into_the_repository_is_refused(cafs, repo: Path, tmp_path: Path, what: str, dest: str) -> None:
    # a snapshot's own config and packs written over the repository's
    src = tmp_path / "lookalike"
    (src / "packs").mkdir(parents=True)
    (src / "config").write_bytes(b"{}\n")
    (src / "packs" / "junk").write_bytes(b"junk\n")
    assert cafs("import", src, repo, "--name", "x", "--no-progress").code == 0
    before = repo_files(repo)
    r = cafs("get", f"{repo}#x" + (":config" if what == "file" else ""), repo / dest)
    assert r.code == 1 and len(r.err.splitlines()) == 1, r.err
    assert "in the repository" in r.err
    assert repo_files(repo) == before
    assert cafs("fsck", repo).code == 0


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_get_never_removes_or_enters_the_repository(cafs, repo: Path, tmp_path: Path, kind: str) -> None:
    # a snapshot holding an entry named like the repository, extracted where the repository is
    src = tmp_path / "src"
    src.mkdir()
    if kind == "file":
        (src / repo.name).write_bytes(b"in the way\n")
    else:
        (src / repo.name).mkdir()
        (src / repo.name / "config").write_bytes(b"{}\n")
    assert cafs("import", src, repo, "--name", "x", "--no-progress").code == 0
    before = repo_files(repo)
    r = cafs("get", f"{repo}#x", repo.parent)
    assert r.code == 1 and len(r.err.splitlines()) == 1, r.err
    assert "repository" in r.err and "never" in r.err
    assert repo_files(repo) == before
    assert cafs("fsck", repo).code == 0


def test_mtimes_before_1970_round_trip(cafs, repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "old").write_bytes(b"from 1960\n")
    os.utime(src / "dir" / "old", ns=(-315_619_200_123_456_789,) * 2)
    os.utime(src / "dir", ns=(-1,) * 2)
    assert cafs("import", src, repo, "--name", "old", "--no-progress").code == 0
    r = cafs("get", f"{repo}#old", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "out")


def test_mtimes_after_2262_are_clamped(cafs, repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "future").write_bytes(b"from 2446\n")
    (src / "present").write_bytes(b"from now\n")
    far = 15_032_385_535 * 10**9  # the latest time ext4 holds, past int64 nanoseconds
    os.utime(src / "future", ns=(far, far))
    if (src / "future").stat().st_mtime_ns <= INT64_MAX:
        pytest.skip("this filesystem cannot hold times past 2262")
    r = cafs("import", src, repo, "--name", "future", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("get", f"{repo}#future", tmp_path / "out")
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "future").read_bytes() == b"from 2446\n"
    assert (tmp_path / "out" / "future").stat().st_mtime_ns == INT64_MAX
    assert (tmp_path / "out" / "present").read_bytes() == b"from now\n"


@pytest.mark.slow
def test_hundred_thousand_files(cafs, repo: Path, fast_dir: Path) -> None:
    src = fast_dir / "many"
    src.mkdir()
    n = 100_000
    dfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            fd = os.open(f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            os.write(fd, b"%d\n" % i)
            os.close(fd)
    finally:
        os.close(dfd)
    r = cafs("import", src, repo, "--name", "many", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("ls", f"{repo}#many")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == n
    assert lines[0].endswith("  f000000") and lines[-1].endswith(f"  f{n - 1:06d}")
    r = cafs("cat", f"{repo}#many:f054321")
    assert (r.code, r.out) == (0, "54321\n")
    r = cafs("get", f"{repo}#many", fast_dir / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, fast_dir / "out")


def test_import_of_more_directories_than_open_files_allowed(cafs_proc, repo: Path, tmp_path: Path) -> None:
    """Each directory's descriptor is closed when the walk leaves it: a tree of more
    directories than the process may hold open (1024 by default) imports."""
    import resource

    src = tmp_path / "many"
    for i in range(300):
        (src / f"d{i:03d}" / "sub").mkdir(parents=True)
        (src / f"d{i:03d}" / "sub" / "f").write_bytes(b"%d" % i)

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    r = cafs_proc("import", src, repo, "--name", "many", "--no-progress", preexec_fn=few_files)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = cafs_proc("get", f"{repo}#many", out)
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, out)


def traced_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the peak of memory traced while it ran."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def import_traced(repo: Path, src: Path, meta_dir: Path, ref: str) -> tuple[ImportResult, int]:
    """Import ``src`` in this process; the result and the peak of memory traced meanwhile."""
    meta = MetaCache(meta_dir)
    try:
        return traced_peak(lambda: run_import(Repository.open(open_store(str(repo))), meta, src, ref))
    finally:
        meta.close()


def test_importing_a_large_directory_holds_its_entries_not_what_reading_each_file_took(
        repo: Path, tmp_path: Path) -> None:
    # Each small file read on a worker stayed in its directory's list of entries until the
    # directory was done, with its job's Future, its stat results and its path: some 4 KB
    # a file, 450 MB of peak RSS for a directory of 100,000 files (here, 10,000: 40 MB).
    src = tmp_path / "flat"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY)
    try:
        for i in range(10_000):
            f = os.open(f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(f, b"%d\n" % i)
            os.close(f)
    finally:
        os.close(fd)
    result, peak = import_traced(repo, src, tmp_path / "meta", "flat")
    assert result.counters.files == 10_000
    assert peak < 20 << 20, peak


def _deep(root: Path, depth: int, content: bytes, name: str = "d") -> None:
    """``root/d/d/.../d/f`` with ``depth`` directories (each called ``name``): made
    through descriptors, since the path is longer than Python's recursion (os.makedirs)
    allows."""
    root.mkdir(exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            try:
                os.mkdir(name, dir_fd=fd)
            except FileExistsError:
                pass
            sub = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
        f = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(f, content)
        os.close(f)
    finally:
        os.close(fd)


@pytest.fixture
def deep_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for deep trees, removed with rm -rf afterwards: pytest's own clean-up
    (shutil.rmtree) recurses, and would fail on them in a later session."""
    top = tmp_path / "deep-trees"
    top.mkdir()
    try:
        yield top
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_importing_a_deep_tree_of_long_names_holds_the_path_of_one_directory(repo: Path, deep_dir: Path,
                                                                          tmp_path: Path) -> None:
    # Every directory of the walk kept its whole path: the sum grows with the square of
    # the depth (a tree 2,000 deep with names of 255 bytes held 500 MB of paths; 400 deep,
    # as here, 20 MB).
    src = deep_dir / "deep"
    _deep(src, 400, b"bottom", name="n" * 255)
    result, peak = import_traced(repo, src, tmp_path / "meta", "deep")
    assert result.snapshot is not None and not result.skipped and result.counters.dirs == 401
    assert peak < 8 << 20, peak


def _deep_with_files_beside(root: Path, depth: int, name: bytes) -> None:
    """``depth`` directories called ``name`` one in another, and files ``a`` and ``z``
    beside each (one of them is walked after the directory, whichever way a walk goes)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:
        for i in range(depth):
            for file in ("a", "z"):
                f = os.open(file, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(f, b"%d" % i)
                os.close(f)
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


@pytest.mark.parametrize("walker", ["stats", "fsck", "diff"])
def test_walking_a_deep_tree_of_long_names_holds_the_path_of_one_directory(repo: Path, deep_dir: Path,
                                                                         tmp_path: Path, walker: str) -> None:
    # The walks of stats (tree.walk), fsck and diff kept a path for every entry left to
    # walk, and a file beside each directory is left at every level on the way down: the
    # memory grew with the square of the depth (stats of a tree 2,000 deep with names of
    # 255 bytes: 979 MB; here, 400 deep, some 20 MB).
    src = deep_dir / "deep"
    _deep_with_files_beside(src, 400, b"n" * 255)
    (deep_dir / "empty").mkdir()
    meta = MetaCache(tmp_path / "meta")
    try:
        repository = Repository.open(open_store(str(repo)))
        snap = run_import(repository, meta, src, "deep").snapshot
        empty = run_import(repository, meta, deep_dir / "empty", "empty").snapshot
        assert snap is not None and empty is not None
        reader = NodeReader(repository, meta)
        if walker == "stats":
            found, peak = traced_peak(lambda: snapshot_space(reader, snap.root).files)
        elif walker == "fsck":
            found, peak = traced_peak(lambda: Checker(repository).run().chunks)
        else:
            found, peak = traced_peak(lambda: sum(1 for _ in diff_trees(reader, empty.root, snap.root)))
    finally:
        meta.close()
    assert found == (1200 if walker == "diff" else 800), found
    assert peak < 8 << 20, peak


def _wide_dir_snapshots(repo: Path, tmp_path: Path, files: int, *, changed: bool) -> tuple[MetaCache, Repository, list[Any]]:
    """A snapshot of one directory of ``files`` tiny files and, with ``changed``, a second
    one with one file rewritten."""
    src = tmp_path / "wide"
    (src / "big").mkdir(parents=True)
    for i in range(files):
        (src / "big" / f"f{i:06d}").write_bytes(b"%d" % i)
    meta = MetaCache(tmp_path / "meta")
    repository = Repository.open(open_store(str(repo)))
    snaps = [run_import(repository, meta, src, "wide").snapshot]
    if changed:
        (src / "big" / "f000005").write_bytes(b"changed")
        snaps.append(run_import(repository, meta, src, "wide").snapshot)
    assert None not in snaps
    return meta, repository, snaps


def test_diff_of_a_large_directory_holds_a_page_of_each_side_not_both_listings(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # diff put the entries of both versions of a directory in two dicts and sorted their
    # names: both listings whole besides the bounded decoded nodes (550 MB for a
    # directory of 320,000 files). Here the decoded nodes are bounded to two pages, and
    # two versions of 6,000 entries take some 7 MB held whole.
    monkeypatch.setattr("cafs.metacache.DECODED_ITEMS", 2048)
    meta, repository, (first, second) = _wide_dir_snapshots(repo, tmp_path, 6000, changed=True)
    try:
        reader = NodeReader(repository, meta)
        changes, peak = traced_peak(lambda: list(diff_trees(reader, first.root, second.root)))
    finally:
        meta.close()
    assert changes == [("M", b"big/f000005")], changes
    assert peak < 3 << 20, peak


def test_walking_a_large_directory_holds_a_page_not_its_whole_listing(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tree.walk (stats, ls -R, get, prefetch, diff of an added tree) listed each directory
    # whole into a list before walking it: a directory of a million files held a million
    # entries (~600 MB) besides the bounded decoded nodes. Here they are bounded to two
    # pages, and 12,000 entries take some 7 MB held whole.
    monkeypatch.setattr("cafs.metacache.DECODED_ITEMS", 2048)
    meta, repository, (first,) = _wide_dir_snapshots(repo, tmp_path, 12000, changed=False)
    try:
        reader = NodeReader(repository, meta)
        walked, peak = traced_peak(lambda: sum(1 for _ in walk(reader, first.root)))
    finally:
        meta.close()
    assert walked == 12002, walked
    assert peak < 3 << 20, peak


def test_a_tree_deeper_than_the_recursion_limit(cafs, repo: Path, deep_dir: Path) -> None:
    depth = sys.getrecursionlimit() + 200
    tmp_path = deep_dir
    src = tmp_path / "deep"
    _deep(src, depth, b"first")
    assert cafs("import", src, repo, "--name", "deep", "--no-progress").code == 0
    _deep(src, depth, b"second")
    assert cafs("import", src, repo, "--name", "deep", "--no-progress").code == 0
    r = cafs("get", f"{repo}#deep", tmp_path / "out")
    assert r.code == 0, r.err
    _deep(tmp_path / "expected", depth, b"second")
    r = subprocess.run(["diff", "-r", tmp_path / "expected", tmp_path / "out"], capture_output=True)
    assert r.returncode == 0, r.stdout[-300:]
    r = cafs("diff", f"{repo}#deep@1", f"{repo}#deep@2")
    assert r.code == 0 and r.out.count("\n") == 1 and r.out.startswith("M d/d/"), r.out[-200:]
    assert r.out.rstrip().endswith("/d/f")


def test_a_tree_deeper_than_the_hard_limit_of_open_files(cafs_proc, repo: Path, deep_dir: Path) -> None:
    """Under ``ulimit -n 128`` (soft and hard), a tree 400 deep imports and extracts
    whole: the walks keep a bounded number of directories open, not one per level."""
    import resource

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    src = deep_dir / "deep"
    _deep(src, 400, b"bottom")
    r = cafs_proc("import", src, repo, "--name", "deep", "--no-progress", preexec_fn=few_files)
    assert r.returncode == 0, r.stderr[-300:]
    out = deep_dir / "out"
    for _ in range(2):  # a second get walks the tree it made
        r = cafs_proc("get", f"{repo}#deep", out, preexec_fn=few_files)
        assert r.returncode == 0, r.stderr[-300:]
    r = subprocess.run(["diff", "-r", src, out], capture_output=True)
    assert r.returncode == 0, r.stdout[-300:]


def test_a_tree_deeper_than_the_usual_open_files_limit(cafs_proc, repo: Path, deep_dir: Path) -> None:
    """With the usual soft limit of 1024 open files (and a hard limit above it), a tree
    1,100 deep imports and extracts whole."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the hard limit of open files here ({hard}) is too low to show this")

    def usual_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    src = deep_dir / "deep"
    _deep(src, 1100, b"bottom")
    r = cafs_proc("import", src, repo, "--name", "deep", "--no-progress", preexec_fn=usual_soft_limit)
    assert r.returncode == 0, r.stderr[-300:]
    r = cafs_proc("get", f"{repo}#deep", deep_dir / "out", preexec_fn=usual_soft_limit)
    assert r.returncode == 0, r.stderr[-300:]
    r = subprocess.run(["diff", "-r", src, deep_dir / "out"], capture_output=True)
    assert r.returncode == 0, r.stdout[-300:]
