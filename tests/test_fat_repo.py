"""A local repository on a filesystem without hard links (exFAT, FAT: a USB disk)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fatfs import fat_mount
from mountfix import make_repo, run_cafs
from treegen import assert_same_tree

from cafs.stores.base import ObjectExists
from cafs.stores.local import LocalStore


@pytest.mark.parametrize("kind", ["exfat", "vfat"])
def test_exclusive_puts_work_without_hard_links(tmp_path: Path, kind: str) -> None:
    with fat_mount(kind, tmp_path) as mnt:
        store = LocalStore(mnt / "repo")
        store.put("refs/ds/1", b"first", exclusive=True)
        with pytest.raises(ObjectExists):
            store.put("refs/ds/1", b"second", exclusive=True)
        assert store.get("refs/ds/1") == b"first"
        assert [p.name for p in (mnt / "repo" / "refs" / "ds").iterdir()] == ["1"]  # no temporary left


def test_a_repository_on_exfat_takes_imports_and_serves_gets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "b.txt").write_text("b\n")
    cache = tmp_path / "cache"
    with fat_mount("exfat", tmp_path) as mnt:
        make_repo(mnt / "repo", cache)
        for _ in range(2):
            r = run_cafs("import", src, mnt / "repo", "--name", "ds", "--no-progress", cache=cache)
            assert r.returncode == 0, r.stderr
        r = run_cafs("get", f"{mnt / 'repo'}#ds", tmp_path / "out", cache=cache)
        assert r.returncode == 0, r.stderr
        assert_same_tree(src, tmp_path / "out")
        r = run_cafs("fsck", mnt / "repo", "--read-data", cache=cache)
        assert r.returncode == 0, r.stdout + r.stderr
