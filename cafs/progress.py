"""A one-line progress display for long commands, shown only on a terminal.

``Progress`` runs a daemon thread that redraws a status line on stderr a few times a
second from a callable, and clears it on exit; it prints nothing when stderr is not a
terminal, so pipes and logs stay clean. ``scan_totals`` counts files and bytes of a tree
in the background so an ETA can be shown.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from types import TracebackType
from typing import TextIO
from collections.abc import Callable


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, render: Callable[[float], str], *, stream: TextIO = sys.stderr,
                 enabled: bool | None = None, interval: float = 0.2) -> None:
        self.render = render
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.monotonic()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="cafs-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            width = _columns(self.stream)
            line = self.render(time.monotonic() - self.started)
            self.stream.write("\r\033[K" + line[: width - 1])
            self.stream.flush()


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (100 if that cannot be told)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 100
    except (AttributeError, OSError, ValueError):
        return 100


class TreeTotals:
    """Files and bytes below a directory, counted on a background thread."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.done = False

    def start(self, root: str) -> TreeTotals:
        threading.Thread(target=self._scan, args=(root,), name="cafs-scan", daemon=True).start()
        return self

    def _scan(self, root: str) -> None:
        stack = [root]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            stack.append(e.path)
                        else:
                            self.files += 1
                            if stat.S_ISREG(st.st_mode):
                                self.bytes += st.st_size
            except OSError:
                continue
        self.done = True
