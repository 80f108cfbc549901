"""Byte layouts of every repository object; no I/O here.

The canonical description is docs/FORMAT.md; each submodule restates the part it owns.
``FORMAT_VERSION`` is the repository format version written to ``config``; a change to
any layout below bumps it.
"""

FORMAT_VERSION = 1
