"""The container image: `deploy/image.sh` (what `make image` runs) builds it from the
Containerfile, and the image, run with podman, serves as docs/container.md says.

Without podman the tests skip; with CI set they fail instead (.ci/run installs podman, runc
and debootstrap). The first build on a machine makes the base image with debootstrap when no
registry answers (about a minute, cached in ~/.cache/pgsse-image) and installs the
dependencies (about a minute); later builds reuse the cached layers, and a change to pgsse's
code rebuilds one small layer (about 15 s).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from broker import __version__
from tests.support.sse import SSEClient

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SH = ROOT / "deploy" / "image.sh"
IMAGE = "localhost/pgsse:test"
MAX_IMAGE_BYTES = 250_000_000
GRACE_SECONDS = 5  # BROKER_SHUTDOWN_GRACE_SECONDS in the container
BUILD_TIMEOUT = 900

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 120)


def missing(what: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what}, but CI is set: .ci/run must provide it")
    pytest.skip(f"{what}; CI runs these tests")


def report(config: pytest.Config, line: str) -> None:
    """A figure shown in the test run's output even when output is captured."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def podman_flags() -> list[str]:
    """What `deploy/image.sh` gives podman too: runc as the runtime, when installed."""
    flags = []
    runc = shutil.which("runc")
    if runc is not None:
        flags += ["--runtime", runc]
    return flags


def run_limits() -> list[str]:
    """Explicit limits, as `deploy/image.sh` gives its build: podman's usual values, or this
    process's hard limits where they are lower (a hard limit cannot be raised)."""
    limits = []
    for name, which, usual in (
        ("nofile", resource.RLIMIT_NOFILE, 1_048_576),
        ("nproc", resource.RLIMIT_NPROC, 32_768),
    ):
        hard = resource.getrlimit(which)[1]
        value = usual if hard == resource.RLIM_INFINITY else min(hard, usual)
        limits += ["--ulimit", f"{name}={value}:{value}"]
    return limits


def podman(*args: str, timeout: float = 60, check: bool = True) -> str:
    result = subprocess.run(
        ["podman", *podman_flags(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def logs(name: str) -> str:
    """The container's output: the broker logs to stderr."""
    return subprocess.run(
        ["podman", *podman_flags(), "logs", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
        check=False,
    ).stdout


def inspect_image() -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(podman("image", "inspect", IMAGE))
    return found[0]


@pytest.fixture(scope="module")
def image(pytestconfig: pytest.Config) -> str:
    """The image, built as `make image` builds it; an earlier build's tag is moved and the
    image it named removed, so repeated runs do not pile up images."""
    if shutil.which("podman") is None:
        missing("podman is not installed (apt-get install podman runc)")
    base = subprocess.run(
        [str(IMAGE_SH), "base"], capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    if base.returncode != 0:
        missing(f"no base image: {base.stderr.strip()[-500:]}")
    before = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False)
    started = time.monotonic()
    build = subprocess.run(
        [str(IMAGE_SH), IMAGE],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "CONTAINER_ENGINE": "podman"},
    )
    assert build.returncode == 0, f"image build failed:\n{build.stdout[-3000:]}{build.stderr}"
    after = podman("image", "inspect", "--format", "{{.Id}}", IMAGE)
    if before and before != after:
        podman("rmi", before, check=False)
    report(pytestconfig, f"\nimage {IMAGE} built in {time.monotonic() - started:.0f} s")
    return IMAGE


@dataclass
class Container:
    name: str
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def wait_for_health(container: Container, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(container.url("/readyz"), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", container.name)
        if state != "running" or time.monotonic() > deadline:
            raise AssertionError(
                f"container {state}, not ready after {timeout} s:\n{logs(container.name)}"
            )
        time.sleep(0.2)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    """The image run as the README shows (embedded PostgreSQL, no DATABASE_URL), its port
    published on a free loopback port."""
    name = f"pgsse-test-{os.getpid()}"
    try:  # a container that failed to start is created all the same: removed below
        podman(
            "run",
            "--detach",
            "--name",
            name,
            *run_limits(),
            "--publish",
            "127.0.0.1::5001",
            "--env",
            f"BROKER_SHUTDOWN_GRACE_SECONDS={GRACE_SECONDS}",
            image,
        )
        address = podman("port", name, "5001/tcp")
        running = Container(name, int(address.rsplit(":", 1)[1]))
        wait_for_health(running, timeout=60)
        yield running
    finally:
        podman("rm", "--force", "--volumes", name, check=False)


def test_image_is_small_and_labelled(image: str, pytestconfig: pytest.Config) -> None:
    found = inspect_image()
    size = found["Size"]
    report(pytestconfig, f"\nimage {IMAGE}: {size / 1e6:.1f} MB")
    assert size <= MAX_IMAGE_BYTES, f"{size / 1e6:.1f} MB"
    config = found["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert "org.opencontainers.image.source" in labels
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][-2:] == ["pgsse", "serve"]
    assert "5001/tcp" in config["ExposedPorts"]
    assert "/data" in config["Volumes"]
    healthcheck = found.get("Healthcheck") or config["Healthcheck"]  # podman's place, docker's
    assert "/healthz" in " ".join(healthcheck["Test"])


def test_containerfile_default_version_is_the_package_version() -> None:
    """A plain `docker build` (no --build-arg) labels the image with the right version."""
    text = (ROOT / "Containerfile").read_text()
    assert f"ARG VERSION={__version__}\n" in text


def test_healthcheck_passes(container: Container) -> None:
    result = subprocess.run(
        ["podman", *podman_flags(), "healthcheck", "run", container.name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with urllib.request.urlopen(container.url("/healthz"), timeout=5) as response:
        assert response.status == 200


def test_every_process_runs_as_non_root(container: Container) -> None:
    rows = podman("top", container.name, "user", "args").splitlines()[1:]  # podman's own ps
    commands = {row.split(None, 1)[1]: row.split()[0] for row in rows}
    assert any("pgsse serve" in command for command in commands), commands
    assert any("postgres" in command for command in commands), commands
    assert set(commands.values()) == {"pgsse"}, commands
    assert podman("exec", container.name, "id", "-u") == "10001"


async def test_stream_receives_published_rows(container: Container) -> None:
    stream = await SSEClient.open(container.port, params={"sessionId": "image"})
    assert stream.status == 200
    await stream.events_until(lambda e: e.type == "connected")

    published = json.loads(
        podman(
            "exec", container.name, "pgsse", "publish", "--session", "image", "from the CLI 你好"
        )
    )
    event = await stream.message(timeout=10)
    assert event.id == published["id"]
    assert event.json["data"]["content"] == "from the CLI 你好"

    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            container.url("/api/messages"), json={"sessionId": "image", "content": "over HTTP"}
        )
    assert response.status_code == 201, response.text
    event = await stream.message(timeout=10)
    assert event.json["data"]["content"] == "over HTTP"
    await stream.close()


async def test_with_a_database_url_it_serves_from_that_database(container: Container) -> None:
    """The production mode: a second container given DATABASE_URL starts no PostgreSQL of
    its own. Its database here is the first container's embedded one (reached through the
    shared volume's socket), so a row published through the second reaches a stream of the
    first."""
    second = f"{container.name}-url"
    try:
        podman(
            "run",
            "--detach",
            "--name",
            second,
            *run_limits(),
            "--volumes-from",
            container.name,
            "--publish",
            "127.0.0.1::5001",
            "--env",
            "DATABASE_URL=postgresql://postgres@/postgres?host=/data/postgres",
            IMAGE,
        )
        address = podman("port", second, "5001/tcp")
        production = Container(second, int(address.rsplit(":", 1)[1]))
        wait_for_health(production, timeout=60)
        stream = await SSEClient.open(container.port, params={"sessionId": "image-url"})
        await stream.events_until(lambda e: e.type == "connected")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                production.url("/api/messages"),
                json={"sessionId": "image-url", "content": "through the second"},
            )
        assert response.status_code == 201, response.text
        event = await stream.message(timeout=10)
        assert event.json["data"]["content"] == "through the second"
        await stream.close()
        output = logs(second)
        assert "embedded_postgres_started" not in output, output
        assert '"addresses":["0.0.0.0:5001"]' in output, output
    finally:
        podman("rm", "--force", "--volumes", second, check=False)


async def test_sigterm_ends_it_within_the_grace_period(
    container: Container, pytestconfig: pytest.Config
) -> None:
    """`podman stop` sends SIGTERM (to tini, which forwards it): streams are told to
    reconnect, the embedded PostgreSQL is stopped, and the container exits 0 by itself,
    long before podman would resort to SIGKILL."""
    stream = await SSEClient.open(container.port, params={"sessionId": "image"})
    await stream.events_until(lambda e: e.type == "connected")
    kill_after = GRACE_SECONDS + 20
    started = time.monotonic()
    podman("stop", "--time", str(kill_after), container.name, timeout=kill_after + 30)
    took = time.monotonic() - started
    last = (await stream.events_until(lambda e: e.type == "error", timeout=5))[-1]
    assert "reconnect" in last.json["error"]
    state = json.loads(podman("inspect", "--format", "{{json .State}}", container.name))
    report(pytestconfig, f"\npodman stop took {took:.1f} s")
    assert state["ExitCode"] == 0, state
    assert took < GRACE_SECONDS + 5, f"{took:.1f} s"
    assert "embedded_postgres_stopped" in logs(container.name)
