"""The kernel's table of mounts, read from ``/proc/self/mountinfo``: which filesystem is
mounted at a path, and by which device.

Unmounting is done with ``fusermount3 -u``, which for root unmounts any filesystem at
all, not only FUSE ones: before cafs unmounts a path it asks this table what is mounted
there (the topmost of mounts stacked on one path), without touching the path itself
(a dead FUSE mount would answer ENOTCONN; a live one served by the asking process
would deadlock it).

Raises nothing: an unreadable table is an empty one. Caveat: the table is the calling
process's mount namespace.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
CAFS_FSTYPE = "fuse.cafs"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str  # as the kernel names it: absolute, symlinks resolved
    fstype: str  # "fuse.cafs" for a cafs mount
    device: int  # os.makedev(major, minor): the st_dev of files in the mount
    user_id: int | None = None  # a FUSE mount's user_id= option: who mounted it (fusermount3 lets only them unmount)


def _unescape(field: bytes) -> str:
    """A mountinfo field with its octal escapes (space, tab, newline, backslash) undone."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(text: bytes) -> list[MountEntry]:
    """The entries of a mountinfo table, in its order (a mount stacked on another comes
    after it)."""
    out = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = (int(n) for n in fields[2].split(b":"))
            out.append(MountEntry(_unescape(fields[4]), fields[sep + 1].decode(errors="replace"),
                                  os.makedev(major, minor), _user_id(fields[sep + 3:sep + 4])))
        except (ValueError, IndexError):
            continue
    return out


def _user_id(super_options: list[bytes]) -> int | None:
    for option in super_options[0].split(b",") if super_options else []:
        key, _, value = option.partition(b"=")
        if key == b"user_id" and value.isdigit():
            return int(value)
    return None


def mounts(path: str = MOUNTINFO) -> list[MountEntry]:
    try:
        with open(path, "rb") as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def top_mount(mountpoint: str, table: list[MountEntry] | None = None) -> MountEntry | None:
    """What is mounted at ``mountpoint`` (absolute, symlinks resolved), the topmost of
    stacked mounts; None if nothing is."""
    found = [e for e in (mounts() if table is None else table) if e.mountpoint == mountpoint]
    return found[-1] if found else None


def mounted_at(device: int, table: list[MountEntry] | None = None) -> str | None:
    """Where the filesystem of ``device`` is mounted, if it is there on top of any other
    mount; None once it is detached or covered."""
    table = mounts() if table is None else table
    for entry in reversed(table):
        if entry.device == device:
            top = top_mount(entry.mountpoint, table)
            return entry.mountpoint if top is not None and top.device == device else None
    return None
