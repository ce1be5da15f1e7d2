"""`make cluster` (deploy/cluster.sh): it checks its ports before starting anything, and an
instance that fails is reported with the last lines of its log, not only a status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Database
from tests.support.nginx import CLUSTER_SH, require_nginx
from tests.support.processes import free_port


def run_cluster(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    require_nginx()
    return subprocess.run(
        [str(CLUSTER_SH), *args],
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PGSSE_RUN_DIR": str(tmp_path / "run"),
            "BROKER_LOG_FORMAT": "json",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


def test_a_busy_port_stops_the_cluster_before_anything_starts(
    tmp_path: Path, busy_port: int
) -> None:
    public = free_port()
    done = run_cluster(tmp_path, "1", str(public), str(busy_port), DATABASE_URL="")
    assert done.returncode == 1
    assert f"port(s) {busy_port} already in use" in done.stderr
    assert not list((tmp_path / "run").glob("broker-*.log")), "an instance was started"
    assert "embedded_postgres_started" not in done.stderr


def test_a_failing_instance_is_shown_with_its_log(
    tmp_path: Path, busy_port: int, database: Database
) -> None:
    port = free_port()
    done = run_cluster(
        tmp_path,
        "1",
        str(free_port()),
        str(port),
        DATABASE_URL=database.url,
        BROKER_ADMIN_PORT=str(busy_port),  # every instance fails to bind it
    )
    assert done.returncode == 1
    assert f"the instance on port {port} exited" in done.stderr
    # Its log's last line, quoted: the one-line reason naming the setting.
    assert f"pgsse: invalid BROKER_ADMIN_PORT={busy_port}" in done.stderr
    assert "cluster stopped" in done.stdout
