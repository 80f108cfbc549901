"""The programs' entry points: ``cafs`` and ``mount.cafs`` (``[project.scripts]``), and
``python -m cafs.entry mount.cafs ARGS`` (what ``cafs install-mount-helper`` writes).

Each imports its command inside a handler of Ctrl-C. Importing a command (trio, lmdb,
urllib3, pyfuse3 and cafs's own modules) takes about 100 ms, and the command's handling
of KeyboardInterrupt begins only once its ``main`` runs: a Ctrl-C in between printed a
Python traceback and the process died of SIGINT. Here it ends as a later Ctrl-C does:
one line, and the code the command gives for it (``cafs``: 130, as ``cafs.cli``;
``mount.cafs``: 32, nothing mounted, as ``cafs.mount_helper``).

This module imports nothing at its top but ``sys`` (already loaded by the interpreter),
and must stay so: what it imports is outside the handler.

Caveats: a Ctrl-C during the interpreter's own start (before it runs this module: a few
milliseconds, in which Python installs its handler of SIGINT and imports ``site``) is
Python's to report. ``python -m cafs.cli`` and ``python -m cafs.mount_helper`` import
everything before any handler, as before.
"""

import sys

CAFS_INTERRUPTED = 130  # cafs.cli.EXIT_INTERRUPTED
MOUNT_FAILURE = 32  # cafs.mount_helper.EXIT_FAILURE


def cafs() -> int:
    return _run("cafs.cli", "cafs: interrupted", CAFS_INTERRUPTED)


def mount_cafs() -> int:
    return _run("cafs.mount_helper", "mount.cafs: interrupted; nothing was mounted", MOUNT_FAILURE)


def _run(module: str, interrupted: str, code: int) -> int:
    """``module``'s ``main()``, imported and called inside the handler of Ctrl-C, which
    says ``interrupted`` and gives ``code``."""
    try:
        return int(__import__(module, fromlist=["main"]).main())
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return code


if __name__ == "__main__":
    program = {"cafs": cafs, "mount.cafs": mount_cafs}.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if program is None:
        sys.exit("usage: python -m cafs.entry {cafs|mount.cafs} ARGS...")
    del sys.argv[1]
    sys.exit(program())
