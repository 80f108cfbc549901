"""The test-tree generator itself: deterministic, complete, and a comparison that sees
every kind of difference (and only real ones)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from treegen import (
    DEEP_LEVELS,
    EPOCH_PLUS_1S_NS,
    ODD_SYMLINK_TARGET,
    SPARSE_SIZE,
    YEAR_2100_NS,
    assert_same_tree,
    diff_manifests,
    make_tree,
    manifest,
    mutate_tree,
)

SMALL_BIG = 64 << 10  # keeps these tests fast; importer tests use the default
WIDE = 50
TREE = {"seed": 1, "big_file_size": SMALL_BIG, "wide_dir_files": WIDE}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tree for the tests that only read it."""
    return make_tree(tmp_path_factory.mktemp("treegen") / "src", **TREE)


@pytest.fixture
def twin(tmp_path: Path) -> Path:
    """The same tree as ``tree``, made again, for a test to change."""
    return make_tree(tmp_path / "twin", **TREE)


def test_same_seed_gives_the_same_tree(tree: Path, twin: Path) -> None:
    assert (diff_manifests(manifest(tree, symlink_mtimes=True, include_root=True),
                           manifest(twin, symlink_mtimes=True, include_root=True)) == [])


def test_other_seed_gives_other_bytes(tree: Path, tmp_path: Path) -> None:
    a = manifest(tree)
    b = manifest(make_tree(tmp_path / "b", **(TREE | {"seed": 2})))
    assert a.keys() == b.keys()
    assert a[b"data/big"].digest != b[b"data/big"].digest


def test_tree_holds_every_case(tree: Path) -> None:
    m = manifest(tree, symlink_mtimes=True)
    r = os.fsencode(tree)

    def content(rel: bytes) -> bytes:
        with open(r + b"/" + rel, "rb") as f:
            return f.read()

    assert {item.kind for item in m.values()} == {"d", "f", "l"}
    # sizes, compressibility, deduplication, holes
    assert m[b"data/f0000000"].size == 0 and m[b"data/f0000001"].size == 1
    assert m[b"data/big"].size == SMALL_BIG
    assert m[b"empty"].kind == "d" and not any(p.startswith(b"empty/") for p in m)
    half_dup = content(b"data/half-dup")
    assert half_dup[: len(half_dup) // 2] == half_dup[len(half_dup) // 2:]
    assert len({m[p].digest for p in (b"dups/copy0", b"dups/copy3", b"data/copy-of-dups")}) == 1
    assert os.lstat(tree / "dups" / "hardlink").st_ino == os.lstat(tree / "dups" / "copy0").st_ino
    sparse = content(b"data/sparse")
    assert len(sparse) == SPARSE_SIZE and sparse[200_000:250_000] == bytes(50_000)
    assert content(b"data/sparse-tail")[-1000:] == bytes(1000)
    # names
    for rel in (b"odd/" + b"x" * 255, b"odd/new\nline", b"odd/\xff\xfenot-utf8", b"odd/with space",
                "odd/ünïcødé-名前".encode(), b"dir \xff\xfe odd/inside", b".hidden",
                b".hidden-dir/.inner"):
        assert m[rel].kind == "f", rel
    chain = b"/".join(b"d%02d" % i for i in range(DEEP_LEVELS))
    assert m[b"deep/" + chain + b"/bottom"].kind == "f"
    # symlinks are not followed
    assert {name: m[b"links/" + name].target for name in (b"relative", b"to-dir", b"absolute",
                                                        b"dangling", b"odd-target")} == {
        b"relative": b"../data/big", b"to-dir": b"../data",
        b"absolute": b"/etc/hostname-does-not-exist", b"dangling": b"no/such/target",
        b"odd-target": ODD_SYMLINK_TARGET}
    # modes
    assert {rel: m[rel].mode for rel in (b"modes/private", b"modes/exec", b"modes/readonly",
                                         b"modes/setgid-dir", b"modes/private-dir")} == {
        b"modes/private": 0o600, b"modes/exec": 0o755, b"modes/readonly": 0o444,
        b"modes/setgid-dir": 0o2755, b"modes/private-dir": 0o700}
    # mtimes: explicit everywhere (directories too), nanoseconds, the edges
    assert m[b"mtimes/epoch-plus-1s"].mtime_ns == EPOCH_PLUS_1S_NS
    assert m[b"mtimes/year-2100"].mtime_ns == YEAR_2100_NS
    assert m[b"mtimes/future-dir"].mtime_ns == YEAR_2100_NS + 999_999_999
    hour_ago = time.time_ns() - 3600 * 10**9
    recent = [p for p, item in m.items() if item.mtime_ns is not None and item.mtime_ns > hour_ago
              and not p.startswith(b"mtimes/")]
    assert recent == []
    assert sum(item.mtime_ns % 10**9 != 0 for item in m.values() if item.mtime_ns) > len(m) / 2


def test_wide_directory(tree: Path) -> None:
    names = sorted(os.listdir(tree / "wide"))
    assert len(names) == WIDE and names[0] == "f000001" and names[-1] == f"f{WIDE:06d}"
    assert (tree / "wide" / "f000042").read_bytes() == b"42\n"


def test_make_tree_refuses_a_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_bytes(b"")
    with pytest.raises(FileExistsError):
        make_tree(tmp_path / "src")


def test_cp_a_copy_compares_equal(tree: Path, tmp_path: Path) -> None:
    subprocess.run(["cp", "-a", tree, tmp_path / "copy"], check=True)
    assert_same_tree(tree, tmp_path / "copy", symlink_mtimes=True, include_root=True)


def _keep_mtime(path: Path, change: Callable[[], None]) -> None:
    """Make ``change`` and put back the mtime of ``path``."""
    ns = os.lstat(path).st_mtime_ns
    change()
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _flip_byte(root: Path) -> None:
    path = root / "data" / "f0004096"

    def flip() -> None:
        with open(path, "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(bytes([b[0] ^ 1]))

    _keep_mtime(path, flip)


def _retarget(root: Path) -> None:
    link = root / "links" / "relative"

    def retarget() -> None:
        ns = os.lstat(link).st_mtime_ns
        link.unlink()
        link.symlink_to("../data/zeros")
        os.utime(link, ns=(ns, ns), follow_symlinks=False)

    _keep_mtime(root / "links", retarget)


CHANGES: dict[str, tuple[Callable[[Path], None], bytes, str]] = {
    "one byte": (_flip_byte, b"data/f0004096", "digest"),
    "one mode": (lambda root: (root / "data" / "script.sh").chmod(0o744), b"data/script.sh",
                 "mode"),
    "one file mtime": (lambda root: os.utime(root / "data" / "text.txt", ns=(1, 1)),
                       b"data/text.txt", "mtime_ns"),
    "one directory mtime": (lambda root: os.utime(root / "deep" / "d00", ns=(1, 1)), b"deep/d00",
                            "mtime_ns"),
    "one symlink target": (_retarget, b"links/relative", "target"),
    "one extra file": (lambda root: _keep_mtime(root / "empty", (root / "empty" / "new").touch),
                       b"empty/new", "only in second"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_one_change_is_one_difference(tree: Path, twin: Path, change: str) -> None:
    apply, path, field = CHANGES[change]
    apply(twin)
    diffs = diff_manifests(manifest(tree), manifest(twin))
    assert len(diffs) == 1, diffs
    assert diffs[0].startswith(repr(path.decode()) + ": " + field), diffs


def test_ignore_dir_mtime(tree: Path, twin: Path) -> None:
    os.utime(twin / "deep" / "d00", ns=(1, 1))
    a, b = (manifest(root, ignore_dir_mtime=True) for root in (tree, twin))
    assert diff_manifests(a, b) == []


def test_symlink_mtimes_only_when_asked(tree: Path, twin: Path) -> None:
    os.utime(twin / "links" / "dangling", ns=(1, 1), follow_symlinks=False)
    assert diff_manifests(manifest(tree), manifest(twin)) == []
    a, b = (manifest(root, symlink_mtimes=True) for root in (tree, twin))
    assert len(diff_manifests(a, b)) == 1


def test_a_file_root_compares_as_one_entry(tree: Path) -> None:
    assert list(manifest(tree / "data" / "big")) == [b""]
    assert_same_tree(tree / "dups" / "copy0", tree / "dups" / "hardlink")
    with pytest.raises(AssertionError, match="digest"):
        assert_same_tree(tree / "dups" / "copy0", tree / "data" / "zeros")


def test_assert_same_tree_names_the_first_20_differences(tree: Path, twin: Path) -> None:
    for i in range(30):
        (twin / "empty" / f"n{i:02d}").touch()
    with pytest.raises(AssertionError) as info:
        assert_same_tree(tree, twin)
    message = str(info.value)
    assert "differ in 31 ways, the first 20" in message  # 30 files and the directory's mtime
    assert len(message.splitlines()) == 1 + 20


def test_mutate_tree_changes_what_it_reports(twin: Path) -> None:
    before = manifest(twin, ignore_dir_mtime=True)
    m = mutate_tree(twin, seed=2)
    after = manifest(twin, ignore_dir_mtime=True)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert changed == set(m["modified"]) | set(m["added"]) | set(m["removed"])
    assert m["modified"] and m["added"] and m["removed"]
    assert not set(m["modified"]) & set(m["removed"])
    for p in m["modified"]:
        old, new = before[p], after[p]
        assert old.size == new.size and old.digest != new.digest and old.mtime_ns != new.mtime_ns
    assert m["new_bytes"] == sum(after[p].size for p in m["modified"] + m["added"])


def test_mutate_tree_is_deterministic(twin: Path, tmp_path: Path) -> None:
    other = make_tree(tmp_path / "other", **TREE)
    assert mutate_tree(twin, seed=4) == mutate_tree(other, seed=4)
    assert_same_tree(twin, other, symlink_mtimes=True, include_root=True)
