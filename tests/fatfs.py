"""Small FAT-family filesystems for tests: an exFAT or FAT image on a loop device,
mounted with the FUSE drivers Debian ships (``exfat-fuse``, ``fusefat``), as a USB disk
would be (no hard links, no symlinks, no modes, mtimes in coarse steps).

``fat_mount(kind, tmp)`` is a context manager yielding the mountpoint; it always
unmounts and detaches the loop device in ``finally``. It skips the test when the tools
(mkfs.exfat / mkfs.vfat, the FUSE driver, losetup) are missing or the test is not root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_TOOLS = {"exfat": ("mkfs.exfat", "mount.exfat-fuse"), "vfat": ("mkfs.vfat", "fusefat")}
IMAGE_BYTES = 64 << 20


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


@contextmanager
def fat_mount(kind: str, tmp: Path) -> Iterator[Path]:
    tools = _TOOLS[kind]
    missing = [t for t in (*tools, "losetup") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(missing) or 'nothing more'} for a {kind} filesystem")
    image, mnt = tmp / f"{kind}.img", tmp / f"{kind}-mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    _run(tools[0], str(image))
    try:
        loop = _run("losetup", "-f", "--show", str(image))
    except subprocess.CalledProcessError as exc:  # a container without loop devices
        pytest.skip(f"no loop device for a {kind} image: {exc.stderr.strip()}")
    try:
        if kind == "exfat":
            _run(tools[1], loop, str(mnt))
        else:
            _run(tools[1], "-o", "rw+", loop, str(mnt))
        try:
            yield mnt
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60, check=False)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=60, check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)
