"""The command edge given input that makes no sense: one line naming the bad thing and
the documented exit code (2 for usage), never a traceback. Runs ``cafs`` in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cafs.cli import main as cafs_main


@pytest.mark.parametrize("dest", ["", "/"])
def test_install_mount_helper_to_no_file_name_is_a_usage_error(cafs, dest: str) -> None:
    # Path('').with_name(...) raised ValueError: a traceback
    r = cafs("install-mount-helper", "--dest", dest)
    assert r.code == 2 and "--dest" in r.err and len(r.err.splitlines()) == 1, r.err


def test_install_mount_helper_writes_the_helper(cafs, tmp_path: Path) -> None:
    r = cafs("install-mount-helper", "--dest", tmp_path / "mount.cafs")
    assert r.code == 0, r.err
    assert "-m cafs.entry mount.cafs" in (tmp_path / "mount.cafs").read_text()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "abc", "1e400"])
def test_a_timeout_that_is_no_number_of_seconds_is_a_usage_error(cafs, tmp_path: Path, value: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # nan passed the check, and a failing store then met time.sleep(nan): a ValueError traceback;
    # inf (and 1e400) retried a refused connection for ever
    monkeypatch.setenv("CAFS_TIMEOUT", value)
    r = cafs("ls", "http://127.0.0.1:9/repo#ds")
    assert r.code == 2 and "CAFS_TIMEOUT" in r.err and len(r.err.splitlines()) == 1, r.err


@pytest.mark.parametrize("where", ["dangling symlink", "under /proc"])
def test_a_cache_directory_that_cannot_be_made_is_an_error_not_a_hang(cafs_proc, repo: Path, tmp_path: Path,
                                                                      where: str) -> None:
    # a cache on a scratch disk that is not mounted: hold() retried mkdir for ever at 100% CPU
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    if where == "dangling symlink":
        cache = tmp_path / "scratch-cache"
        cache.symlink_to(tmp_path / "unmounted" / "cache")
    else:
        cache = Path("/proc/no-such-cafs-cache")
    r = cafs_proc("import", tmp_path / "src", repo, "--name", "ds", "--no-progress", "--cache", cache, timeout=60)
    assert r.returncode == 1 and str(cache) in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["get", "import"])
@pytest.mark.parametrize("url", ["s3://bucket/out", "file:///tmp/out", "https://host/out"])
def test_a_url_where_a_local_path_belongs_is_a_usage_error(cafs, repo: Path, tmp_path: Path, command: str,
                                                           url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 'cafs get REPO#ds s3://bucket/out' extracted into ./s3:/bucket/out and exited 0
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    assert cafs("import", tmp_path / "src", repo, "--name", "ds", "--no-progress").code == 0
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    args = ("get", f"{repo}#ds", url) if command == "get" else ("import", url, repo, "--name", "ds2", "--no-progress")
    r = cafs(*args)
    assert r.code == 2 and url in r.err and "a URL" in r.err and len(r.err.splitlines()) == 1, r.err
    assert os.listdir(tmp_path / "cwd") == []


def test_cache_gc_without_a_size_is_a_usage_error(cafs, tmp_path: Path) -> None:
    # --size defaulted to 0: a `cafs cache gc` that forgot it evicted every cached chunk, exit 0
    r = cafs("cache", "gc", "--cache", tmp_path / "cache")
    assert r.code == 2 and "--size" in r.err and len(r.err.splitlines()) == 1, r.err


@pytest.mark.parametrize("action", ["status", "clear"])
def test_a_size_for_another_cache_action_is_a_usage_error(cafs, tmp_path: Path, action: str) -> None:
    # it was ignored: `cafs cache clear --size 1G` deleted the whole cache
    r = cafs("cache", action, "--size", "1G", "--cache", tmp_path / "cache")
    assert r.code == 2 and "--size" in r.err and len(r.err.splitlines()) == 1, r.err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_a_stats_timeout_that_is_no_wait_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        value: str) -> None:
    # against a mount, nan and inf ended in a traceback from the wait, and 0 or -1 said
    # that a healthy mount was hung and should be unmounted
    with pytest.raises(SystemExit) as exc:  # argparse's own error
        cafs_main(["stats", str(tmp_path), "--timeout", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--timeout" in err, err
