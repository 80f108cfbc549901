"""Mount options: parsing ``-o a=b,c`` into a frozen ``MountOptions``, strictly.

cafs options: ``cache=DIR``, ``cache_size=SIZE``, ``cache_mode=auto|full|meta``,
``readahead=SIZE``, ``allow_other``, ``noexec``, ``debug``, ``log=PATH|syslog``, ``mirror=URL``
(repeatable: stores holding the same repository, read when the repository's own store
fails; see ``cafs.sources``) and ``timeout=SECONDS`` (how long a read may wait for the
stores, retries included, before it fails with EIO; default 30. One deadline per read:
the kernel's page-by-page retries of a failed read fail at once, see ``cafs.fetch``).
``noexec`` is mount(8)'s: no file of the mount can be executed; ``exec`` (the default)
undoes it, and as with mount(8) the last of the two given wins (``user,exec`` in fstab).

``cache_mode``: ``full`` writes every fetched chunk through to the sparse chunk cache;
``meta`` caches metadata only and reads chunks from the store each time the kernel asks;
``auto`` (the default) is ``meta`` for a repository on a local path (it is on local disk
already: copying would double the disk space and the I/O of a cold read for nothing) and
``full`` for remote ones. A repository on a slow network filesystem mounted at a local
path wants ``cache_mode=full``. Generic mount(8) options that mean nothing to a
read-only FUSE filesystem of ours are accepted and ignored: ``ro``, ``rw`` (the mount is
read-only whatever is asked), ``defaults``, ``auto``, ``noauto``, ``user``, ``nouser``,
``users``, ``nofail``, ``_netdev``, ``_rnetdev``, ``suid``, ``nosuid``, ``dev``, ``nodev``
(the mount is always ``nosuid,nodev``), the atime options (the mount is ``noatime``),
``iversion``, ``mand``, ``silent``, ``loud``, ``sync``, ``async``, ``dirsync`` and their
negations, ``x-*``, ``comment=*`` and the SELinux ``context=``, ``fscontext=``,
``defcontext=`` and ``rootcontext=``. mount(8) hands a helper the options of these it was
given, as ``-o ro,nodiratime,_netdev,...``, and quotes a value that holds commas in double
quotes (``context="...:s0:c0,c1"``, ``cache="/a,b"``): a comma within quotes does not end
an option, and the quotes are not part of the value.
Anything else is an error naming the option, and so is an option given twice with
different values (the same value twice is accepted: fstab and ``-o`` often repeat one).
``remount`` (``mount -t cafs -o remount``) is refused saying so: a mount's options are
fixed when it is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cafs import sizes
from cafs.errors import UsageError
from cafs.stores.access import refuse_userinfo

DEFAULT_CACHE_SIZE = 10 << 30
DEFAULT_READAHEAD = 8 << 20
MIN_CACHE_SIZE = 1 << 20
MAX_CACHE_SIZE = 1 << 60  # 1 EiB: beyond any disk, and within the cache's 64-bit counters
CACHE_MODES = ("auto", "full", "meta")
MAX_READAHEAD = 256 << 20
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 24 * 3600.0
OPTIONS_HELP = ("mount options, comma-separated (repeatable): cache=DIR, cache_size=SIZE, "
                "cache_mode=auto|full|meta, readahead=SIZE, mirror=URL, timeout=SECONDS, allow_other, "
                "noexec, debug, log=PATH|syslog; mount(8)'s generic ones are ignored (see mount/README.md)")

_IGNORED = {"ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev",
            "_rnetdev", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime", "norelatime",
            "strictatime", "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime",
            "iversion", "noiversion", "mand", "nomand", "silent", "loud", "async", "sync", "dirsync"}
# SELinux labels: mount(8) passes them on to a helper only where SELinux is enabled; the
# mount keeps the label its policy gives FUSE filesystems
_IGNORED_VALUED = {"comment", "context", "fscontext", "defcontext", "rootcontext"}


@dataclass(frozen=True)
class MountOptions:
    cache: Path | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    readahead: int = DEFAULT_READAHEAD
    allow_other: bool = False
    noexec: bool = False
    debug: bool = False
    log: str | None = None
    cache_mode: str = "auto"
    mirrors: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT


def parse_size(text: str, option: str) -> int:
    try:
        return sizes.parse_size(text)
    except ValueError:
        raise UsageError(f"mount option {option}={text!r}: not a size (examples: 512M, 20G)") from None


def parse_seconds(text: str, option: str) -> float:
    try:
        return sizes.parse_seconds(text.removesuffix("s"), MAX_TIMEOUT)
    except ValueError:
        raise UsageError(f"mount option {option}={text!r}: seconds, more than 0 and at most {MAX_TIMEOUT:.0f}") from None


def parse_cache_mode(text: str, option: str) -> str:
    if text not in CACHE_MODES:
        raise UsageError(f"mount option {option}={text!r}: one of {', '.join(CACHE_MODES)}")
    return text


_VALUED: dict[str, Callable[[str, str], object]] = {
    "cache": lambda text, _option: Path(text),
    "cache_size": parse_size,
    "readahead": parse_size,
    "log": lambda text, _option: text,
    "cache_mode": parse_cache_mode,
    "timeout": parse_seconds,
}


def split_options(text: str) -> list[str]:
    """``a=b,c`` split at the commas outside double quotes: mount(8) quotes a value that
    holds commas (``context="system_u:object_r:t:s0:c0,c1"``)."""
    items = [""]
    quoted = False
    for ch in text:
        if ch == "," and not quoted:
            items.append("")
            continue
        if ch == '"':
            quoted = not quoted
        items[-1] += ch
    return [i for i in items if i]


def parse_options(text: str) -> MountOptions:
    values: dict[str, object] = {}
    texts: dict[str, str] = {}  # as first given, for the message
    mirrors: list[str] = []
    for item in split_options(text):
        key, eq, value = item.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key in _IGNORED or key.startswith("x-") or key in _IGNORED_VALUED:
            continue
        if key in ("allow_other", "debug"):
            if eq:
                raise UsageError(f"mount option {key} takes no value")
            parsed: object = True
        elif key in ("exec", "noexec"):
            if eq:
                raise UsageError(f"mount option {key} takes no value")
            values["noexec"] = key == "noexec"  # mount(8)'s rule: the last one given wins
            continue
        elif key == "mirror":
            if not value:
                raise UsageError("mount option mirror needs a URL (mirror=https://...)")
            refuse_userinfo(value)
            mirrors.append(value)
            continue
        elif key == "remount":  # not 'unknown': mount(8) knows it, cafs cannot do it
            raise UsageError("mount option remount: not supported (a cafs mount's options are fixed "
                             "when it is made); unmount and mount again")
        elif key in _VALUED:
            if not value:
                raise UsageError(f"mount option {key} needs a value ({key}=...)")
            parsed = _VALUED[key](value, key)
        else:
            raise UsageError(f"unknown mount option {key!r}")
        # fstab options and a -o on the command line are easily both given: the same
        # value twice is harmless, two different ones are a mistake to name, not to guess
        if values.setdefault(key, parsed) != parsed:
            raise UsageError(f"mount option {key} given twice with different values ({texts[key]!r} and {item!r})")
        texts.setdefault(key, item)
    opts = MountOptions(mirrors=tuple(mirrors), **values)  # type: ignore[arg-type]
    if not MIN_CACHE_SIZE <= opts.cache_size <= MAX_CACHE_SIZE:
        raise UsageError(f"mount option cache_size={opts.cache_size}: between {MIN_CACHE_SIZE} bytes and 1E")
    if not 4096 <= opts.readahead <= MAX_READAHEAD:
        raise UsageError(f"mount option readahead={opts.readahead}: between 4K and {MAX_READAHEAD >> 20}M")
    return opts


def format_options(opts: MountOptions) -> str:
    """The inverse of ``parse_options``, to hand options to the daemon process."""
    items = [f"cache_size={opts.cache_size}", f"readahead={opts.readahead}", f"cache_mode={opts.cache_mode}",
             f"timeout={opts.timeout!r}"]
    items.extend(valued_option("mirror", url) for url in opts.mirrors)
    if opts.cache is not None:
        items.append(valued_option("cache", str(opts.cache)))
    if opts.allow_other:
        items.append("allow_other")
    if opts.noexec:
        items.append("noexec")
    if opts.debug:
        items.append("debug")
    if opts.log:
        items.append(valued_option("log", opts.log))
    return ",".join(items)


def valued_option(key: str, value: str) -> str:
    """``key=value``, the value in double quotes if it holds a comma (see ``split_options``)."""
    return f'{key}="{value}"' if "," in value else f"{key}={value}"
