"""Running cafs as user ``nobody`` from tests run as root.

``nobody_python()`` finds an interpreter and a PYTHONPATH with which ``nobody`` can run
this checkout of cafs (or None: not root, no setpriv, no such Python); ``SETPRIV`` is
the command prefix that drops to ``nobody`` (uid and gid 65534, no supplementary groups).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

NOBODY = 65534
SRC_ROOT = str(Path(__file__).resolve().parents[1])
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


REEXEC = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import cafs.cli'], check=True)"


@cache
def nobody_python() -> tuple[str, str] | None:
    """An interpreter and PYTHONPATH with which user ``nobody`` can run cafs, or None.

    The test interpreter may live where nobody cannot reach it (a venv over a Python
    under /root); then the system Python of the same version with this environment's
    site-packages will do, since compiled extensions match the version. It must also
    start itself again (``mount.cafs`` starts the daemon so): setpriv execs the first
    program with root's capabilities still in effect, which may reach what a later
    exec cannot."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    import site

    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [(sys.executable, SRC_ROOT),
                  (f"/usr/bin/python{ver}", os.pathsep.join([SRC_ROOT, *site.getsitepackages()]))]
    for python, pythonpath in candidates:
        probe = subprocess.run([*SETPRIV, python, "-c", REEXEC], capture_output=True,
                               env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", "")}, timeout=60)
        if probe.returncode == 0:
            return python, pythonpath
    return None
