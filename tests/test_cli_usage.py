"""The command edge given input that makes no sense: one line naming the bad thing and
the documented exit code (2 for usage), never a traceback. Runs ``cafs`` in-process."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("dest", ["", "/"])
def test_install_mount_helper_to_no_file_name_is_a_usage_error(cafs, dest: str) -> None:
    # Path('').with_name(...) raised ValueError: a traceback
    r = cafs("install-mount-helper", "--dest", dest)
    assert r.code == 2 and "--dest" in r.err and len(r.err.splitlines()) == 1, r.err


def test_install_mount_helper_writes_the_helper(cafs, tmp_path: Path) -> None:
    r = cafs("install-mount-helper", "--dest", tmp_path / "mount.cafs")
    assert r.code == 0, r.err
    assert "-m cafs.mount_helper" in (tmp_path / "mount.cafs").read_text()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "abc", "1e400"])
def test_a_timeout_that_is_no_number_of_seconds_is_a_usage_error(cafs, tmp_path: Path, value: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # nan passed the check, and a failing store then met time.sleep(nan): a ValueError traceback;
    # inf (and 1e400) retried a refused connection for ever
    monkeypatch.setenv("CAFS_TIMEOUT", value)
    r = cafs("ls", "http://127.0.0.1:9/repo#ds")
    assert r.code == 2 and "CAFS_TIMEOUT" in r.err and len(r.err.splitlines()) == 1, r.err
