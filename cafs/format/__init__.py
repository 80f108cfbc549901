"""Byte layouts of every repository object; no I/O here.

The canonical description is docs/FORMAT.md; each submodule restates the part it owns.
``FORMAT_VERSION`` is the repository format version written to ``config``; a change to
any layout below bumps it.
"""

FORMAT_VERSION = 3
# 1: journal entries had no checksum; such entries (and repositories) are still read
# 2: entries had no blocks (st_blocks); such entries are still read, and an import into a
#    repository of version 1 or 2 writes them so, for the readers of that version
READABLE_VERSIONS = (1, 2, 3)
JOURNAL_CHECKSUM_SINCE = 2  # journal entries of version 2 (with a digest) go into repositories of 2 and on
ENTRY_BLOCKS_SINCE = 3
