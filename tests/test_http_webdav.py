"""Writes to WebDAV servers configured otherwise than the nginx site docs/REMOTE.md shows:
without ``create_full_put_path`` (a PUT into a missing directory answers 500, nginx's
rename fails; MKCOL below a missing directory answers 409), and with nginx's default
``client_max_body_size`` of 1 MiB (a pack answers 413). init, import and copy must either
work or stop with one line that says what to change, and work once it is changed.

Commands run in-process (the ``cafs`` fixture); servers are real nginx instances.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from treegen import assert_same_tree, make_tree

SMALL = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "4M")


@pytest.fixture(autouse=True)
def _short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFS_TIMEOUT", "5")


def test_init_and_import_where_the_server_makes_no_directories(cafs, nginx_server, tmp_path: Path) -> None:
    """A new repository two directories below any that exist: every PUT answered 500
    ('server error 500' after the deadline, nothing written) until someone made the
    directories by hand."""
    server = nginx_server(full_put_path=False)
    url = server.url + "/datasets/vision/repo"
    src = make_tree(tmp_path / "src")
    r = cafs("init", url, *SMALL)
    assert r.code == 0, r.err
    r = cafs("import", src, url, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("get", f"{url}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "out")
    r = cafs("fsck", url)
    assert r.code == 0, r.out + r.err


def test_copy_to_a_new_mirror_where_the_server_makes_no_directories(cafs, nginx_server, repo: Path,
                                                                    tmp_path: Path) -> None:
    r = cafs("import", make_tree(tmp_path / "src"), repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    server = nginx_server(full_put_path=False)
    r = cafs("copy", f"{repo}#ds", server.url + "/mirrors/one")
    assert r.code == 0, r.err
    assert cafs("fsck", server.url + "/mirrors/one", "--read-data").code == 0


def test_a_pack_over_the_server_s_body_limit_is_named_and_the_import_resumes(cafs, nginx_server,
                                                                            tmp_path: Path) -> None:
    """nginx's default client_max_body_size (1 MiB) refuses packs: the error said only
    'unexpected answer 413'."""
    server = nginx_server(max_body="1m")
    url = server.url + "/repo"
    src = make_tree(tmp_path / "src")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))  # incompressible: packs over 1 MiB
    assert cafs("init", url, *SMALL).code == 0
    r = cafs("import", src, url, "--name", "ds", "--no-progress")
    assert r.code == 1
    assert "too large (413)" in r.err and "client_max_body_size" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    server.stop()
    server.max_body = "0"
    server.start()
    r = cafs("import", src, url, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("get", f"{url}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "out")
    assert cafs("fsck", url, "--read-data").code == 0
