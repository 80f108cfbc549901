"""Shared fixtures: an isolated cache directory, fresh repositories, and ways to run the
``cafs`` command in-process (fast) or as a real subprocess (for kills and other users)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cafs.cli import main as cafs_main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CAFS_CACHE_DIR", str(path))
    return path


@pytest.fixture
def cafs(cache_dir: Path, capsys: pytest.CaptureFixture[str]):
    """Run ``cafs ARGS...`` in-process; returns a Result with exit code, stdout, stderr."""

    def run(*args: str | os.PathLike[str]) -> Result:
        capsys.readouterr()
        code = cafs_main([os.fspath(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def cafs_proc(cache_dir: Path):
    """Run ``cafs ARGS...`` as a subprocess (``python -m cafs.cli``)."""

    def run(*args: str | os.PathLike[str], **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cafs.cli", *map(os.fspath, args)],
                              capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)

    return run


@pytest.fixture
def repo(tmp_path: Path, cafs) -> Path:
    """A new repository with small chunks and packs, so small trees exercise many packs."""
    path = tmp_path / "repo"
    r = cafs("init", path, "--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K",
             "--pack-size", "512K")
    assert r.code == 0, r.err
    return path


# ---- mounts (tests/mountfix.py): a session-level sweep of stale cafs mounts -------------
# Every mount fixture unmounts in its own ``finally``; this catches what a crashed
# fixture or a killed test left behind below this session's temporary directories.

@pytest.fixture(scope="session", autouse=True)
def _sweep_cafs_mounts(tmp_path_factory: pytest.TempPathFactory):
    from mountfix import sweep_mounts

    yield
    left = sweep_mounts(tmp_path_factory.getbasetemp())
    if left:
        print(f"\nswept {len(left)} stale cafs mount(s): {', '.join(left)}", file=sys.stderr)
# ---- end of mounts ----------------------------------------------------------------------

pytest_plugins = ["remote_fixtures"]  # nginx_server, fault_proxy
