"""Interrupted commands: Ctrl-C, a closed pipe. An interrupt ends the command with one
line and a non-zero exit; an exit code keeps its meaning when its report cannot be
written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


class _InterruptedFinalizer:
    """Ctrl-C pressed while the collector runs this object's finalizer."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_in_a_finalizer_still_interrupts(cafs, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python drops a KeyboardInterrupt raised in a finalizer ("Exception ignored in ...",
    # a traceback): cafs gc went on to the end and exited 0
    def collect(*args: Any, **kwargs: Any) -> Any:
        _InterruptedFinalizer()  # dropped at once: its finalizer runs here
        deadline = time.monotonic() + 5  # the rest of a long gc
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise AssertionError("the interrupt never came")

    monkeypatch.setattr("cafs.gc.collect", collect)
    r = cafs("gc", repo)
    assert (r.code, r.err) == (130, "cafs: interrupted\n")


def to_closed_pipe(*args: str | os.PathLike[str], unbuffered: bool) -> subprocess.CompletedProcess[str]:
    """``cafs ARGS`` with standard output a pipe whose reader is gone (``| head`` done);
    buffered, the closed pipe is met when the output is flushed, unbuffered at the first
    line written."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "cafs.cli", *map(os.fspath, args)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("json", [False, True])
def test_fsck_keeps_its_verdict_when_the_reader_goes_away(cafs, repo: Path, tmp_path: Path, json: bool,
                                                          unbuffered: bool) -> None:
    # cafs fsck REPO | head: exit 0, which to fsck(8) says "clean", for a damaged repository
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    next(p for p in (repo / "packs").rglob("*") if p.is_file()).unlink()
    r = to_closed_pipe("fsck", repo, *(["--json"] if json else []), unbuffered=unbuffered)
    assert (r.returncode, r.stderr) == (4, "")


@pytest.mark.parametrize("unbuffered", [False, True])
def test_import_keeps_its_partial_code_when_the_reader_goes_away(repo: Path, tmp_path: Path,
                                                                 unbuffered: bool) -> None:
    # exit 0, and the paths it skipped went unsaid
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    os.mkfifo(src / "fifo")
    r = to_closed_pipe("import", src, repo, "--name", "ds", "--no-progress", unbuffered=unbuffered)
    assert r.returncode == 3 and "'fifo': fifo" in r.stderr, r.stderr
