"""deploy/compose.yaml: the pool in containers. Its images are pulled from a registry, so
the tests cannot run it; they read it, check that its parts are wired to each other, and have
nginx check the configuration its nginx container starts with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.nginx import require_nginx, run_directory

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX_DIR = DEPLOY / "nginx"
BROKERS = ["broker1", "broker2", "broker3"]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def healthy_dependencies(service: dict[str, Any]) -> set[str]:
    depends = service["depends_on"]
    assert all(dep["condition"] == "service_healthy" for dep in depends.values()), depends
    return set(depends)


def test_compose_wires_database_bus_brokers_and_nginx() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "nginx", *BROKERS}

    postgres = services["postgres"]["environment"]
    url = (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    first = services[BROKERS[0]]
    for name in BROKERS:
        broker = services[name]
        assert broker == first, f"{name} differs from {BROKERS[0]}"
        assert broker["environment"]["DATABASE_URL"] == url
        assert broker["environment"]["BROKER_BUS_URL"] == "redis://redis:6379/0"
        assert healthy_dependencies(broker) == {"postgres", "redis"}
        assert (DEPLOY / broker["build"]["context"] / broker["build"]["dockerfile"]).is_file()
        assert "/readyz" in " ".join(broker["healthcheck"]["test"])
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name

    nginx = services["nginx"]
    assert nginx["ports"] == ["8080:8080"]
    assert nginx["environment"]["PGSSE_BROKERS"].split() == [f"{b}:5001" for b in BROKERS]
    assert healthy_dependencies(nginx) == set(BROKERS)
    targets = {}
    for volume in nginx["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro"
        assert (DEPLOY / source).is_file(), source
        targets[target] = (DEPLOY / source).resolve()
    assert targets["/etc/nginx/pgsse/pgsse-locations.conf"] == NGINX_DIR / "pgsse-locations.conf"
    assert targets["/etc/nginx/pgsse-upstream.template"] == NGINX_DIR / "pgsse-upstream.conf"
    script = targets["/docker-entrypoint.d/40-pgsse-upstream.sh"]
    assert os.access(script, os.X_OK), "the nginx image runs only executable scripts"


def test_compose_nginx_configuration_is_valid() -> None:
    """What the nginx container starts with: the upstream that upstream.sh writes as the
    container runs it (three servers, least_conn, the template's parameters) and
    nginx-compose.conf, checked by `nginx -t` with the brokers' names and the image's paths
    made local."""
    nginx = require_nginx()
    run_dir = run_directory()
    try:
        upstream = run_dir / "pgsse" / "pgsse-upstream.conf"
        addresses = "127.0.0.1:15001 127.0.0.1:15002 127.0.0.1:15003"
        subprocess.run(
            ["sh", str(NGINX_DIR / "upstream.sh")],
            env={
                **os.environ,
                "PGSSE_BROKERS": addresses,
                "PGSSE_UPSTREAM_TEMPLATE": str(NGINX_DIR / "pgsse-upstream.conf"),
                "PGSSE_UPSTREAM_TARGET": str(upstream),
            },
            check=True,
            capture_output=True,
            timeout=30,
        )
        text = upstream.read_text()
        servers = re.findall(r"(?m)^\s*server\s+(\S+)\s+max_fails=0;$", text)
        assert servers == addresses.split(), text
        assert re.search(r"(?m)^\s*least_conn;$", text), text

        shutil.copy(NGINX_DIR / "pgsse-locations.conf", run_dir / "pgsse")
        conf = (NGINX_DIR / "nginx-compose.conf").read_text()
        conf, users = re.subn(r"(?m)^user nginx;.*\n", "", conf)  # no such user here
        conf = conf.replace("/var/log/nginx/", f"{run_dir}/").replace("/var/run/", f"{run_dir}/")
        assert users == 1 and "/var/" not in conf, conf
        (run_dir / "temp").mkdir()
        temp_paths = "".join(
            f"    {kind}_temp_path {run_dir}/temp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = conf.replace("http {\n", "http {\n" + temp_paths, 1)
        (run_dir / "nginx.conf").write_text(conf)
        check = subprocess.run(
            [nginx, "-t", "-p", f"{run_dir}/", "-c", str(run_dir / "nginx.conf"), "-e", "stderr"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
