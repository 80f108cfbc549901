"""Byte layouts of every repository object; no I/O here.

The canonical description is docs/FORMAT.md; each submodule restates the part it owns.
``FORMAT_VERSION`` is the repository format version written to ``config``; a change to
any layout below bumps it.
"""

FORMAT_VERSION = 2
# 1: journal entries had no checksum; such entries (and repositories) are still read
READABLE_VERSIONS = (1, 2)
