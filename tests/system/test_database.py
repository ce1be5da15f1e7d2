"""The embedded PostgreSQL, clusters created and started (the checks without a cluster of their
own: tests/test_database.py).

Run by root, the server runs as user `pgserver`; in a mode-700 directory (as `/root` is) it
must start and serve without changing the mode of that directory or of any parent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from broker.database import EmbeddedPostgres
from broker.embedded.placement import BASE, installed_pginstall
from tests.support.database import chain_modes

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="root's placement of the server's files")


@as_root
def test_root_cluster_in_a_mode_700_home_changes_no_directory(home: Path) -> None:
    before = chain_modes(home)
    server = EmbeddedPostgres(home / "app" / ".data")
    try:
        server.start()
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        assert chain_modes(home) == before
        # The data went where user pgserver reaches it; BROKER_DATA_DIR links there.
        assert server.data_dir.parent == BASE and server.data_dir.owner() == "pgserver"
        assert (home / "app" / ".data").resolve() == server.data_dir
        server.stop()
        assert not server.is_running()
        server.start()  # a second run finds the same cluster through the link
        assert server.is_running()
    finally:
        server.destroy()
    assert chain_modes(home) == before
    assert not server.data_dir.exists() and not os.path.lexists(home / "app" / ".data")


def start_from(site: Path, data_dir: Path) -> tuple[Path, str]:
    """Start, query and destroy a cluster in a process whose pgserver is the one in `site`;
    the mirror its binaries ran from, and the query's answer."""
    script = (
        "import sys; from pathlib import Path; from broker.database import EmbeddedPostgres\n"
        "import psycopg; from broker.log import configure\n"
        "configure('json')  # to stderr: stdout carries the answers\n"
        "server = EmbeddedPostgres(Path(sys.argv[1]))\n"
        "try:\n"
        "    server.start()\n"
        "    print(server.placement.pginstall)\n"
        "    print(psycopg.connect(server.url).execute('SELECT 41 + 1').fetchone()[0])\n"
        "finally:\n"
        "    server.destroy()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        env={**os.environ, "PYTHONPATH": str(site), "BROKER_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    pginstall, answer = done.stdout.split()
    return Path(pginstall).parents[1], answer


@as_root
def test_binaries_the_server_user_cannot_reach_are_linked_where_it_can(home: Path) -> None:
    """pgserver installed in a mode-700 home (a virtualenv in /root): the server runs from
    links under /var/lib/pgsse, laid out so the binaries still find their libraries; the
    links of an installation that is gone are removed."""
    installed = installed_pginstall().parent.parent
    sites = [home / "old-venv", home / "venv"]
    for site in sites:
        site.mkdir()
        for part in ("pgserver", "pgserver.libs"):
            if (installed / part).exists():
                shutil.copytree(installed / part, site / part, symlinks=True, copy_function=os.link)
    before = chain_modes(sites[1])
    mirrors = []
    try:
        for site in sites:
            mirror, answer = start_from(site, home / ".data")
            mirrors.append(mirror)
            assert mirror.parent == BASE and answer == "42"
            assert (mirror / "pgserver.libs").is_dir() == (installed / "pgserver.libs").is_dir()
            shutil.rmtree(sites[0], ignore_errors=True)  # the first virtualenv is removed
        assert not mirrors[0].exists() and mirrors[1].is_dir()
    finally:
        for mirror in mirrors:
            shutil.rmtree(mirror, ignore_errors=True)
    assert chain_modes(sites[1]) == before


def test_a_socket_directory_made_first_by_someone_else_is_never_used() -> None:
    """A data directory path over 100 characters puts the socket under /tmp. Another local
    user who makes the directory there first (the name pgsse used to derive from the path)
    must not get the `postgres` superuser's socket: pgsse makes its own, unpredictable one."""
    top = Path(tempfile.mkdtemp(prefix="pgsse-squat-"))
    top.chmod(0o755)
    data = top / ("d" * 110)
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:16]
    squatted = Path("/tmp") / f"pgsse-{os.geteuid()}-{digest}"
    squatted.mkdir(mode=0o777)
    squatted.chmod(0o777)  # the squatter's: everyone may enter (and, as root, nobody's)
    if os.geteuid() == 0:
        os.chown(squatted, 65534, 65534)
    server = EmbeddedPostgres(data)
    try:
        server.start()
        host = server.socket_dir
        with psycopg.connect(server.url, connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert host != squatted and list(squatted.iterdir()) == []
        info = host.stat()
        assert info.st_mode & 0o777 == 0o700
        server.stop()
        assert not host.exists()  # removed with the server
    finally:
        server.destroy()
        shutil.rmtree(squatted, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
