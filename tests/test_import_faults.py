"""What import and get do when the world is not as they would like it.

Paths that cannot be imported (unreadable, special, changing) are skipped and named,
with exit 3; wrong arguments and wrong places are one clear line and exit 1 (or 2);
a full disk is a clear line, never a traceback, and leaves the repository usable.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nobody import NOBODY, SETPRIV, nobody_python
from storewrap import PassThroughStore
from treegen import all_files, assert_same_tree, diff_manifests, make_tree, manifest



def assert_clean_error(r, code: int, *needles: str) -> None:
    """Exit ``code``, no traceback, and every needle on stderr."""
    assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err, r.err
    for needle in needles:
        assert needle in r.err, (needle, r.err)


def journal_entries(repo: Path) -> list[Path]:
    """Journal entries (not the advisory ``latest`` pointers)."""
    refs = repo / "refs"
    return sorted(p for p in refs.rglob("*") if p.is_file() and p.name.isdigit()) if refs.exists() else []


# -- running as another user ------------------------------------------------------------


class NobodyRun:
    def __init__(self, base: Path) -> None:
        found = nobody_python()
        if found is None:
            pytest.skip("needs root, setpriv and a Python that user nobody can run")
        self.python, self.pythonpath = found
        self.cache = base / "cache"
        self.cache.mkdir()
        os.chown(self.cache, NOBODY, NOBODY)

    def __call__(self, *args: str | os.PathLike[str]):
        env = {"PYTHONPATH": self.pythonpath, "PATH": os.environ.get("PATH", ""),
               "CAFS_CACHE_DIR": str(self.cache), "HOME": "/nonexistent"}
        p = subprocess.run([*SETPRIV, self.python, "-m", "cafs.cli", *map(os.fspath, args)],
                           capture_output=True, text=True, env=env, timeout=120)
        return _Result(p.returncode, p.stdout, p.stderr)


class _Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def nobody_base() -> Iterator[tuple[NobodyRun, Path]]:
    """(run-as-nobody, a directory outside pytest's root-only temporary directory)."""
    base = Path(tempfile.mkdtemp(prefix="cafs-nobody-"))
    try:
        base.chmod(0o755)
        yield NobodyRun(base), base
    finally:
        shutil.rmtree(base)


def chown_tree(top: Path, uid: int) -> None:
    for dirpath, _dirs, files in os.walk(top):
        os.chown(dirpath, uid, uid)
        for f in files:
            os.chown(os.path.join(dirpath, f), uid, uid)


@pytest.fixture
def nobody_setup(cafs, nobody_base) -> tuple[NobodyRun, Path, Path]:
    """(run-as-nobody, source tree with one unreadable file ``secret``, repository owned
    by nobody)."""
    run, base = nobody_base
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"readable\n")
    (src / "sub" / "b").write_bytes(os.urandom(100_000))
    (src / "secret").write_bytes(b"nobody may read this\n")
    (src / "secret").chmod(0)
    repo = base / "repo"
    assert cafs("init", repo, "--pack-size", "512K").code == 0
    chown_tree(repo, NOBODY)
    return run, src, repo


def test_unreadable_file_is_skipped_and_named(nobody_setup, cafs, tmp_path: Path) -> None:
    run, src, repo = nobody_setup
    r = run("import", src, repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 3, "'secret'")
    assert "ermission denied" in r.err
    assert len(journal_entries(repo)) == 1
    r = cafs("get", f"{repo}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    expected = {p: item for p, item in manifest(src).items() if p != b"secret"}
    got = manifest(tmp_path / "out")
    # the root's mtime is the source's; only the unreadable file is missing
    assert diff_manifests(expected, got) == []


def test_strict_import_of_unreadable_file_commits_nothing(nobody_setup) -> None:
    run, src, repo = nobody_setup
    r = run("import", src, repo, "--name", "ds", "--strict", "--no-progress")
    assert r.code != 0
    assert_clean_error(r, r.code, "'secret'", "nothing committed")
    assert journal_entries(repo) == []


def _imported_with_out_for_nobody(cafs, base: Path, src: Path) -> tuple[Path, Path]:
    """``src`` imported (as root) into a new repository as ``ds``, and a directory
    ``nobody`` owns to extract it into."""
    repo = base / "repo"
    assert cafs("init", repo, "--pack-size", "512K").code == 0
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    out = base / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    return repo, out


def test_get_as_non_root_resumes_over_read_only_files(nobody_base, cafs) -> None:
    run, base = nobody_base
    src = base / "src"
    (src / "rodir").mkdir(parents=True)
    (src / "rodir" / "inner").write_bytes(os.urandom(30_000))
    (src / "rodir").chmod(0o555)
    (src / "readonly").write_bytes(os.urandom(70_000))
    (src / "readonly").chmod(0o444)
    repo, out = _imported_with_out_for_nobody(cafs, base, src)
    r = run("get", f"{repo}#ds", out / "tree")
    assert r.code == 0, r.err
    with open(out / "tree" / "readonly", "r+b") as f:  # damage it (as root)
        f.write(b"damaged")
    os.truncate(out / "tree" / "rodir" / "inner", 10)
    r = run("get", f"{repo}#ds", out / "tree")
    assert_clean_error(r, 0)
    assert_same_tree(src, out / "tree")


@pytest.mark.parametrize("mode", [0o300, 0o200, 0o000])
def test_get_as_non_root_runs_again_over_modes_without_read_for_the_owner(nobody_base, cafs, mode: int) -> None:
    # the second run met the first run's modes: 'Permission denied' opening a directory
    # or file of its own that it had to look into
    run, base = nobody_base
    src = base / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "inner").write_bytes(os.urandom(30_000))
    (src / "file").write_bytes(os.urandom(40_000))
    (src / "file").chmod(mode & 0o666)
    (src / "dir").chmod(mode)
    repo, out = _imported_with_out_for_nobody(cafs, base, src)
    for _ in range(2):
        r = run("get", f"{repo}#ds", out / "tree")
        assert_clean_error(r, 0)
        r = run("get", f"{repo}#ds:dir", out / "dir")
        assert_clean_error(r, 0)
    (src / "dir").chmod(0o755)
    (out / "tree" / "dir").chmod(0o755)
    assert_same_tree(src, out / "tree")


@pytest.mark.parametrize("replacement", ["file", "symlink"])
def test_get_as_non_root_replaces_a_read_only_directory_of_an_earlier_run(nobody_base, cafs, replacement: str) -> None:
    # a newer snapshot has a file (or symlink) where an earlier one, extracted to DEST, had
    # a read-only directory: its removal stopped the get, 'DIR: Permission denied', exit 1
    run, base = nobody_base
    src = base / "src"
    (src / "rodir" / "deeper" / "searchonly").mkdir(parents=True)
    (src / "rodir" / "inner").write_bytes(b"inner\n")
    (src / "rodir" / "deeper" / "searchonly" / "leaf").write_bytes(b"leaf\n")
    for d, mode in (("rodir/deeper/searchonly", 0o111), ("rodir/deeper", 0o555), ("rodir", 0o555)):
        (src / d).chmod(mode)
    repo, out = _imported_with_out_for_nobody(cafs, base, src)
    r = run("get", f"{repo}#ds", out / "tree")
    assert_clean_error(r, 0)
    shutil.rmtree(src / "rodir")  # as root
    if replacement == "file":
        (src / "rodir").write_bytes(b"a file now\n")
    else:
        (src / "rodir").symlink_to("elsewhere")
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    r = run("get", f"{repo}#ds", out / "tree")
    assert_clean_error(r, 0)
    assert_same_tree(src, out / "tree")


# -- special and changing files -----------------------------------------------------------


def test_fifo_and_socket_are_skipped_and_named(cafs, repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "regular").write_bytes(b"kept\n")
    os.mkfifo(src / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(src / "sock"))
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 3, "'fifo': fifo", "'sock': socket")
    r = cafs("ls", f"{repo}#ds")
    assert r.code == 0, r.err
    assert [line.rsplit("  ", 1)[1] for line in r.out.splitlines()] == ["regular"]


def test_skipped_paths_with_odd_bytes_are_named_unambiguously(cafs, repo: Path, tmp_path: Path) -> None:
    # the byte 0xff and the four characters '\xff' were both printed as '\\xff'
    src = os.fsencode(tmp_path / "src")
    os.mkdir(src)
    for name in (b"odd\xff", b"odd\\xff", b"new\nline", b"it's"):
        os.mkfifo(src + b"/" + name)
    r = cafs("import", os.fsdecode(src), repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 3, "'odd\\xff': fifo", "'odd\\\\xff': fifo", "'new\\nline': fifo", "'it\\'s': fifo")
    assert len(r.err.splitlines()) == 5, r.err


def test_a_file_of_more_chunks_than_a_file_node_lists_is_skipped_and_named(cafs, tmp_path: Path) -> None:
    # 1 GiB of hole cut into 1 KiB chunks of zeros: a file node of some 80 MB, over the
    # 64 MiB readers accept; stored, it made the directory holding it unreadable (EIO)
    repo = tmp_path / "repo"
    r = cafs("init", repo, "--chunk-min", "256", "--chunk-avg", "512", "--chunk-max", "1K")
    assert r.code == 0, r.err
    src = tmp_path / "src"
    src.mkdir()
    (src / "regular").write_bytes(b"kept\n")
    with open(src / "huge-sparse", "wb") as f:
        f.truncate(1 << 30)
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 3, "'huge-sparse': 1048576 chunks: more than one file node may list")
    r = cafs("ls", f"{repo}#ds")
    assert r.code == 0, r.err
    assert [line.rsplit("  ", 1)[1] for line in r.out.splitlines()] == ["regular"]
    r = cafs("fsck", repo)
    assert r.code == 0, r.out + r.err


WRITER = """
import os, sys, time
path, base, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
block = b"x" * 4096
while time.monotonic() < deadline:
    os.write(fd, block)
    if os.fstat(fd).st_size > base + (8 << 20):
        os.ftruncate(fd, base)
"""


def test_file_changing_during_import_is_reported(cafs, repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "steady").write_bytes(b"does not change\n")
    growing = src / "growing"
    size = 64 << 20
    growing.write_bytes(os.urandom(1 << 20) * (size >> 20))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, growing, str(size), "30"])
    try:
        deadline = time.monotonic() + 10
        while growing.stat().st_size == size:  # wait until the writer is writing
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.01)
        r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    finally:
        writer.kill()
        writer.wait()
    assert_clean_error(r, 3, "'growing'", "changed while being read")
    r = cafs("ls", f"{repo}#ds")
    assert [line.rsplit("  ", 1)[1] for line in r.out.splitlines()] == ["steady"]


def test_a_hard_link_written_between_its_names_is_read_again(cafs, repo: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The second name took the first name's chunks with its own, newer mtime: it read
    # as the old bytes, and every later import kept them (same size, mtime and inode).
    from cafs import importer

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "x").write_bytes(b"old bytes\n")
    os.link(src / "a" / "x", src / "b" / "x")
    file_done = importer.Importer._file_done

    def write_after_the_first_read(self, name: bytes, path: bytes, st: os.stat_result, spans):
        entry = file_done(self, name, path, st, spans)
        if self.counters.files == 1:  # a/x was just read: a writer changes the file
            with open(src / "a" / "x", "r+b") as f:
                f.write(b"NEW")
            os.utime(src / "a" / "x", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return entry

    monkeypatch.setattr(importer.Importer, "_file_done", write_after_the_first_read)
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    assert cafs("cat", f"{repo}#ds:a/x").out == "old bytes\n"
    assert cafs("cat", f"{repo}#ds:b/x").out == "NEW bytes\n"


def test_what_is_replaced_or_removed_after_its_stat_is_named_as_such(cafs, repo: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # a file become a symlink was 'cannot open: Too many levels of symbolic links', a
    # symlink become a file 'cannot read symlink: Invalid argument', and so on
    from cafs import importer

    src = tmp_path / "src"
    src.mkdir()
    for name in ("dir-gone", "dir-to-link", "file-gone", "file-to-link"):
        (src / name).mkdir() if name.startswith("dir") else (src / name).write_bytes(b"x")
    (src / "link-gone").symlink_to("x")
    (src / "link-to-file").symlink_to("x")
    import_entry = importer.Importer._import_entry

    def change_after_stat(self, parent, name: bytes, st: os.stat_result):
        path = src / os.fsdecode(name)
        if name.startswith(b"dir"):
            path.rmdir()
        else:
            path.unlink()
        if name.endswith(b"-to-link"):
            path.symlink_to("elsewhere")
        elif name.endswith(b"-to-file"):
            path.write_bytes(b"a file now")
        return import_entry(self, parent, name, st)

    monkeypatch.setattr(importer.Importer, "_import_entry", change_after_stat)
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 3, *(f"'{name}': vanished while importing" for name in ("dir-gone", "file-gone", "link-gone")),
                       *(f"'{name}': replaced while importing" for name in ("dir-to-link", "file-to-link", "link-to-file")))


# -- wrong places and names ---------------------------------------------------------------


def test_a_repository_inside_the_tree_is_left_out(cafs, tmp_path: Path) -> None:
    # every import stored again the packs the import before it wrote
    src = make_small_tree(tmp_path / "src")
    repo = src / "repo"
    assert cafs("init", repo, "--pack-size", "512K").code == 0
    for _ in range(2):
        r = cafs("import", src, repo, "--name", "ds", "--no-progress")
        assert_clean_error(r, 0, "left out 'repo': the repository")
    assert "new 0 B, stored 0 B in 0 pack(s)" in r.out, r.out
    r = cafs("ls", f"{repo}#ds")
    assert [line.rsplit("  ", 1)[1] for line in r.out.splitlines()] == ["dir", "file"]
    assert cafs("fsck", repo, "--read-data").code == 0


def test_the_metadata_cache_inside_the_tree_is_left_out(cafs, repo: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_small_tree(tmp_path / "src")
    monkeypatch.setenv("CAFS_CACHE_DIR", str(src / "cache"))
    for _ in range(2):
        r = cafs("import", src, repo, "--name", "ds", "--no-progress")
        assert_clean_error(r, 0, "its metadata cache")
    r = cafs("ls", f"{repo}#ds", "-R")
    assert not [line for line in r.out.splitlines() if "cache/" in line], r.out


@pytest.mark.parametrize("where", [".", "packs"])
def test_importing_the_repository_into_itself_is_refused(cafs, repo: Path, ds: str, where: str) -> None:
    before = all_files(repo)
    r = cafs("import", repo / where, repo, "--name", "self", "--no-progress")
    assert_clean_error(r, 2, "inside the repository", "nothing imported")
    assert all_files(repo) == before



def test_an_empty_dir_to_import_is_a_usage_error(cafs, repo: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # '' (an unset variable in a script) was the current directory, imported whole
    make_small_tree(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    r = cafs("import", "", repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 2, "empty DIR")
    assert journal_entries(repo) == []


@pytest.mark.parametrize("kind", ["empty directory", "missing"])
def test_import_into_a_non_repository(cafs, tmp_path: Path, kind: str) -> None:
    src = make_small_tree(tmp_path / "src")
    target = tmp_path / "notarepo"
    if kind == "empty directory":
        target.mkdir()
    r = cafs("import", src, target, "--name", "ds", "--no-progress")
    assert_clean_error(r, 1, str(target), "not a cafs repository")
    assert len(r.err.splitlines()) == 1
    assert (os.listdir(target) == []) if kind == "empty directory" else not target.exists()


def test_init_on_an_existing_repository_fails(cafs, repo: Path) -> None:
    before = all_files(repo)
    r = cafs("init", repo)
    assert_clean_error(r, 1, "already")
    assert all_files(repo) == before


def test_init_on_a_non_empty_directory_fails(cafs, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious").write_bytes(b"keep me\n")
    r = cafs("init", tmp_path / "busy")
    assert_clean_error(r, 1, "not empty")
    assert os.listdir(tmp_path / "busy") == ["precious"]


@pytest.mark.parametrize("args, says", [
    (("--pack-size", "0"), "pack size 0"), (("--chunk-min", "0"), "chunk min size 0"),
    (("--chunk-min", "2M", "--chunk-avg", "1M"), "chunk min size"),
    (("--chunk-min", "512K", "--chunk-avg", "256K", "--chunk-max", "1M"), "min <= avg <= max")])
def test_init_with_sizes_that_make_no_sense_is_a_usage_error(cafs, tmp_path: Path, args: tuple[str, ...],
                                                             says: str) -> None:
    r = cafs("init", tmp_path / "repo", *args)
    assert_clean_error(r, 2, says)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", "-rf", "", "x" * 101, "sp ace"])
def test_bad_ref_name_is_rejected_and_writes_nothing(cafs, repo: Path, tmp_path: Path, name: str) -> None:
    src = make_small_tree(tmp_path / "src")
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    r = cafs("import", src, repo, f"--name={name}", "--no-progress")
    assert_clean_error(r, 2, "invalid ref name")
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


@pytest.mark.parametrize("json_out", [False, True])
def test_snapshots_of_a_ref_the_repository_lacks_is_an_error(cafs, ds: str, repo: Path, json_out: bool) -> None:
    # it said "no snapshots" (or []) and exit 0: a mistyped name looked like an empty ref
    r = cafs("snapshots", repo, "nosuch", *(["--json"] if json_out else []))
    assert_clean_error(r, 1, "no ref named 'nosuch'")
    assert r.out == ""


@pytest.mark.parametrize("command", ["snapshots", "forget", "ls", "ls-at-jid", "cat", "copy-all"])
def test_an_invalid_ref_name_is_a_usage_error(cafs, repo: Path, tmp_path: Path, command: str) -> None:
    bad = "sp ace"
    args = {"snapshots": ("snapshots", repo, bad), "forget": ("forget", repo, bad, "--keep-last", "1"),
            "ls": ("ls", f"{repo}#{bad}"), "ls-at-jid": ("ls", f"{repo}#{bad}@1"),
            "cat": ("cat", f"{repo}#{bad}:file"), "copy-all": ("copy", f"{repo}#{bad}", "--all", tmp_path / "dst")}
    assert_clean_error(cafs(*args[command]), 2, "invalid ref name", repr(bad))


@pytest.fixture
def ds(cafs, repo: Path, tmp_path: Path) -> str:
    src = make_small_tree(tmp_path / "src")
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    return f"{repo}#ds"


def make_small_tree(root: Path) -> Path:
    (root / "dir").mkdir(parents=True)
    (root / "file").write_bytes(b"a file\n")
    (root / "dir" / "inner").write_bytes(os.urandom(50_000))
    return root


def test_get_tree_onto_a_regular_file_fails(cafs, ds: str, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.write_bytes(b"in the way\n")
    r = cafs("get", ds, dest)
    assert_clean_error(r, 1, str(dest))
    assert len(r.err.splitlines()) == 1
    assert dest.read_bytes() == b"in the way\n"


@pytest.mark.parametrize("args, needle", [
    (("ls", "{repo}#nosuch"), "nosuch"),
    (("get", "{repo}#nosuch", "{tmp}/out"), "nosuch"),
    (("ls", "{repo}#ds@7"), "ds"),
    (("ls", "{repo}#0123456789ab"), "0123456789ab"),
    (("ls", "{repo}#ds:no/such/path"), "no/such/path"),
    (("cat", "{repo}#ds:missing"), "missing"),
    (("get", "{repo}#ds:dir/missing", "{tmp}/out"), "dir/missing"),
    (("cat", "{repo}#ds:dir"), "not a regular file"),
])
def test_unknown_snapshot_or_path_is_a_clear_error(cafs, ds: str, repo: Path, tmp_path: Path,
                                                   args: tuple[str, ...], needle: str) -> None:
    r = cafs(*(a.format(repo=repo, tmp=tmp_path) for a in args))
    assert r.code in (1, 2)
    assert_clean_error(r, r.code, needle)
    assert len(r.err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, path, shown", [
    ("ls", b"new\nline/x", "new\\nline/x: 'x' is under a non-directory"),
    ("ls", b"no\nsuch", "no\\nsuch: no such file or directory"),
    ("ls", b"bad\xff/x", "bad\\xff/x: 'x' is under a non-directory"),
    ("cat", b"dir\nnl", "dir\\nnl: not a regular file")])
def test_a_path_with_odd_bytes_is_named_on_one_line(cafs, repo: Path, tmp_path: Path, command: str,
                                                    path: bytes, shown: str) -> None:
    # the names came out raw: a newline broke the error in two, other bytes became U+FFFD
    src = tmp_path / "src"
    os.makedirs(os.fsencode(src) + b"/dir\nnl")
    for name in (b"new\nline", b"bad\xff"):
        with open(os.fsencode(src) + b"/" + name, "wb") as f:
            f.write(b"x")
    assert cafs("import", src, repo, "--name", "odd", "--no-progress").code == 0
    r = cafs(command, f"{repo}#odd:" + os.fsdecode(path))
    assert r.code in (1, 2)
    assert_clean_error(r, r.code, shown)
    assert len(r.err.splitlines()) == 1


@pytest.mark.parametrize("jid", ["\u00b2", "\u0661", "-1", "", "1x"])
def test_a_journal_id_that_is_not_ascii_digits_is_a_usage_error(cafs, ds: str, jid: str) -> None:
    # '²' and the Arabic-Indic '١' are str.isdigit(): the first was a traceback, the other ref@1
    r = cafs("ls", f"{ds}@{jid}")
    assert_clean_error(r, 2, "the journal id after '@' must be a number")
    assert len(r.err.splitlines()) == 1


def test_a_journal_key_with_other_digits_is_not_a_snapshot(cafs, ds: str, repo: Path) -> None:
    (repo / "refs" / "ds" / ("0" * 19 + "\u00b2")).write_bytes(b"")
    r = cafs("snapshots", repo, "--json")
    assert r.code == 0, r.err
    assert [s["jid"] for s in json.loads(r.out)] == [1]



def test_a_journal_key_that_is_not_a_file_stops_the_commit_with_its_name(cafs, ds: str, repo: Path,
                                                                         tmp_path: Path) -> None:
    # A directory at the next jid's key: the exclusive put fails, the listing never
    # shows it, and the commit took it for a concurrent import's entry 100 times over
    # ("too many concurrent writers").
    (repo / "refs" / "ds" / f"{2:020d}").mkdir()
    r = cafs("import", tmp_path / "src", repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 1, f"refs/ds/{2:020d}", "does not show it")
    assert len(r.err.splitlines()) == 1
    assert "concurrent" not in r.err

# -- full disks ---------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted whatever happens."""
    path = tmp_path / "small"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", path], check=True)  # busy: detach it anyway


def grow(mountpoint: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", mountpoint], check=True)


@pytest.fixture
def big_src(tmp_path: Path) -> Path:
    """A tree of about 5.5 MB: more than the small tmpfs holds."""
    return make_tree(tmp_path / "src", seed=11, big_file_size=4 << 20)


def test_import_into_a_full_disk_fails_cleanly(cafs, small_tmpfs: Path, big_src: Path) -> None:
    repo = small_tmpfs / "repo"
    assert cafs("init", repo, "--pack-size", "512K").code == 0
    r = cafs("import", big_src, repo, "--name", "ds", "--no-progress")
    assert_clean_error(r, 1, "no space left")
    assert len(r.err.splitlines()) == 1
    assert journal_entries(repo) == []
    assert list(repo.rglob(".tmp-*")) == []  # the pack being written is given up


def test_import_works_again_once_the_disk_has_room(cafs, small_tmpfs: Path, big_src: Path,
                                                   tmp_path: Path) -> None:
    repo = small_tmpfs / "repo"
    assert cafs("init", repo, "--pack-size", "512K").code == 0
    assert cafs("import", big_src, repo, "--name", "ds", "--no-progress").code == 1
    grow(small_tmpfs)
    r = cafs("import", big_src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    assert cafs("get", f"{repo}#ds", tmp_path / "out").code == 0
    assert_same_tree(big_src, tmp_path / "out")
    r = cafs("fsck", repo)
    assert r.code == 0, r.out + r.err


def test_a_metadata_cache_on_a_full_tmpfs_is_an_error_not_a_crash(cafs, repo: Path, small_tmpfs: Path,
                                                                   big_src: Path) -> None:
    # LMDB writes its lock file through a shared mapping: on a full tmpfs (a cache
    # under /tmp) the first write to a page without a block was a SIGBUS.
    assert cafs("import", big_src, repo, "--name", "ds", "--no-progress").code == 0
    with open(small_tmpfs / "fill", "wb") as f:
        try:
            while True:
                f.write(bytes(64 << 10))
                f.flush()
        except OSError:
            pass
    env = {**os.environ, "CAFS_CACHE_DIR": str(small_tmpfs / "cache")}
    for args in (("ls", f"{repo}#ds"), ("cat", f"{repo}#ds:data/big")):
        p = subprocess.run([sys.executable, "-m", "cafs.cli", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode == 1, (args, p.returncode, p.stderr)
        assert "no space left" in p.stderr.lower() and str(small_tmpfs / "cache") in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == 1, p.stderr


def test_get_into_a_full_disk_fails_cleanly(cafs, repo: Path, small_tmpfs: Path, big_src: Path) -> None:
    assert cafs("import", big_src, repo, "--name", "ds", "--no-progress").code == 0
    r = cafs("get", f"{repo}#ds", small_tmpfs / "out")
    assert_clean_error(r, 1, "no space left", str(small_tmpfs / "out"))
    assert len(r.err.splitlines()) == 1


def test_get_completes_once_the_disk_has_room(cafs, repo: Path, small_tmpfs: Path, big_src: Path) -> None:
    assert cafs("import", big_src, repo, "--name", "ds", "--no-progress").code == 0
    assert cafs("get", f"{repo}#ds", small_tmpfs / "out").code == 1
    grow(small_tmpfs)
    r = cafs("get", f"{repo}#ds", small_tmpfs / "out")
    assert r.code == 0, r.err
    assert_same_tree(big_src, small_tmpfs / "out")


def test_gc_on_a_full_disk_says_how_to_go_on_and_then_frees_it(cafs, small_tmpfs: Path, tmp_path: Path) -> None:
    repo = small_tmpfs / "repo"
    assert cafs("init", repo, "--pack-size", "512K").code == 0
    src = tmp_path / "src"
    src.mkdir()
    for n in range(2):  # two snapshots with nothing in common; the first is then forgotten
        (src / "f").write_bytes(os.urandom(900_000))
        assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    assert cafs("forget", repo, "ds", "--keep-last", "1").code == 0
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):  # until the disk is full
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    before = all_files(repo)
    r = cafs("gc", repo)
    assert_clean_error(r, 1, "no space left", "--repack-below 0")
    assert all_files(repo) == before  # nothing lost, nothing half-written
    os.truncate(filler, filler.stat().st_size - (64 << 10))  # a little room
    r = cafs("gc", repo, "--repack-below", "0")
    assert r.code == 0, r.err
    assert shutil.disk_usage(small_tmpfs).free > 800_000  # the forgotten snapshot's bytes are free
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err


class LosesFirstJournalAnswer(PassThroughStore):
    """A local store that writes the first journal entry, then reports the connection
    lost, as a server whose answer never arrived would."""

    lost = False

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        super().put(key, data, exclusive=exclusive)
        if key.startswith("refs/") and key.rsplit("/", 1)[-1].isdigit() and not self.lost:
            from cafs.errors import StoreUnavailable
            self.lost = True
            raise StoreUnavailable(f"{self.url}: connection reset after writing {key}")


def test_a_commit_whose_answer_was_lost_is_recorded_once(tmp_path: Path) -> None:
    from cafs.importer import run_import
    from cafs.metacache import MetaCache
    from cafs.repository import Repository
    from cafs.stores.local import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello")
    store = LosesFirstJournalAnswer(LocalStore(tmp_path / "repo"))
    repo = Repository.init(store)
    meta = MetaCache(tmp_path / "cache")
    try:
        result = run_import(repo, meta, src, "ds")
    finally:
        meta.close()
    assert store.lost  # the answer was lost, and the retry met the entry in place
    assert result.snapshot is not None and result.snapshot.jid == 1
    assert repo.jids("ds") == [1]
    assert len(journal_entries(tmp_path / "repo")) == 1


def test_a_proc_file_of_size_zero_is_skipped_saying_what_it_is(cafs, repo: Path) -> None:
    # /proc files say size 0 and read what they hold: never an empty file in the
    # snapshot, and not "changed while being read" either
    r = cafs("import", "/proc/sys/kernel/random", repo, "--name", "proc", "--no-progress")
    assert_clean_error(r, 3, "'poolsize': reads ", " bytes where its size says 0 (a /proc or /sys file?)")
    assert "changed while being read" not in r.err


def test_a_rerun_by_another_user_with_nothing_to_change_changes_nothing(nobody_base, cafs) -> None:
    # A dataset directory a team shares: one member extracted it, another runs the same
    # get again. Setting a mode or an mtime needs to own the file, even to the value it
    # has: the re-run failed with "Operation not permitted" where nothing needed changing.
    run, base = nobody_base
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (src / "a.txt").write_text("a\n")
    (src / "link").symlink_to("sub/b.bin")
    repo = base / "repo"
    assert cafs("init", repo).code == 0
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    chown_tree(repo, NOBODY)
    dest = base / "dest"
    assert cafs("get", f"{repo}#ds", dest).code == 0
    before = {p: os.lstat(p) for p in [dest, *dest.rglob("*")]}
    r = run("get", f"{repo}#ds", dest)
    assert r.code == 0, r.err
    assert_same_tree(src, dest)
    for p, st in before.items():
        now = os.lstat(p)
        assert (now.st_mode, now.st_uid, now.st_mtime_ns, now.st_ino) == \
            (st.st_mode, st.st_uid, st.st_mtime_ns, st.st_ino), p
    (src / "a.txt").write_text("changed\n")
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    chown_tree(repo, NOBODY)
    r = run("get", f"{repo}#ds", dest)
    assert r.code != 0 and "a.txt" in r.err and "ermission denied" in r.err and "Traceback" not in r.err, r.err
