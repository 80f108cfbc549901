"""Interrupted commands: Ctrl-C, a closed pipe. An interrupt ends the command with one
line and a non-zero exit; an exit code keeps its meaning when its report cannot be
written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

SRC_ROOT = Path(__file__).resolve().parents[1]


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


def console_script(program: str, interrupted_in: str) -> str:
    """What pip's script for ``program`` runs (its ``[project.scripts]`` entry), with a
    Ctrl-C (a real SIGINT to itself) as the module ``interrupted_in`` is first looked for.
    SIGINT is Python's, as in a terminal, even where this test runs with it ignored."""
    with open(SRC_ROOT / "pyproject.toml", "rb") as f:
        module, func = tomllib.load(f)["project"]["scripts"][program].split(":")
    return f"""
import signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == {interrupted_in!r}:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.meta_path.insert(0, CtrlC())
from {module} import {func}
sys.exit({func}())
"""


@pytest.mark.parametrize(("program", "interrupted_in"), [
    ("cafs", "cafs.cli"), ("cafs", "argparse"), ("cafs", "lmdb"), ("cafs", "cafs.repository"),
    ("mount.cafs", "cafs.mount_helper"), ("mount.cafs", "lmdb"), ("mount.cafs", "trio"), ("mount.cafs", "pyfuse3")])
def test_ctrl_c_while_a_command_starts_is_one_line(tmp_path: Path, program: str, interrupted_in: str) -> None:
    # a Ctrl-C in the first ~100 ms, while the command imported trio, lmdb and the rest,
    # printed a traceback and the process died of SIGINT: only main() handled it
    code, line = {"cafs": (130, "cafs: interrupted"),
                  "mount.cafs": (32, "mount.cafs: interrupted; nothing was mounted")}[program]
    args = ["ls", f"{tmp_path}/repo#ds"] if program == "cafs" else [f"{tmp_path}/repo#ds", str(tmp_path / "mnt")]
    r = subprocess.run([sys.executable, "-c", console_script(program, interrupted_in), *args], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(SRC_ROOT)))
    assert (r.returncode, r.stderr) == (code, line + "\n")


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


@pytest.mark.parametrize("sigint", [signal.default_int_handler, signal.SIG_IGN])  # SIG_IGN: started with & by a script
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_ends_an_import_through_its_clean_up(cafs, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     signum: int, sigint: Any) -> None:
    # a job cancelled by its scheduler (scancel, a pod deleted) was killed by the default
    # action with its lock in the repository, stale for other hosts only after 30 minutes
    def import_tree(*args: Any, **kwargs: Any) -> Any:
        assert list((repo / "locks").iterdir()), "the import holds its lock now"
        signal.raise_signal(signum)
        deadline = time.monotonic() + 5  # the rest of a long import
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise AssertionError("the signal never ended the import")

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    def left_to_default(*_: Any) -> None:  # rather than let the default action kill pytest
        raise AssertionError(f"cafs left {signal.Signals(signum).name} to its default action")

    monkeypatch.setattr("cafs.importer.Importer.import_tree", import_tree)
    before = signal.signal(signum, left_to_default)
    before_int = signal.signal(signal.SIGINT, sigint)
    try:
        r = cafs("import", src, repo, "--name", "ds", "--no-progress")
        assert signal.getsignal(signum) is left_to_default  # restored when the command ended
        assert signal.getsignal(signal.SIGINT) == sigint
    finally:
        signal.signal(signum, before)
        signal.signal(signal.SIGINT, before_int)
    assert (r.code, r.err) == (128 + signum, f"cafs: stopped by {signal.Signals(signum).name}\n")
    assert not list((repo / "locks").iterdir())
