"""Interrupted commands: Ctrl-C, a closed pipe. An interrupt ends the command with one
line and a non-zero exit; an exit code keeps its meaning when its report cannot be
written."""

from __future__ import annotations

import signal
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
