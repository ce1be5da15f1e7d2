"""Real nginx for tests, configured from the repository's deploy/nginx/ files.

`deploy/cluster.sh render` writes the configuration exactly as `make cluster` does (only the
upstream `server` lines and the listen port differ), and nginx runs in the foreground from a
run directory of its own, so the tests exercise the files users deploy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_SH = DEPLOY / "cluster.sh"


def nginx_binary() -> str | None:
    """The nginx executable, also where Debian puts it outside a non-root PATH."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def require_nginx() -> str:
    """nginx, or skip (locally) / fail (with CI set, where .ci/run installs it)."""
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed, but CI is set: .ci/run must install it")
        pytest.skip("nginx is not installed (apt-get install nginx); these tests run in CI")
    return binary


def run_directory() -> Path:
    """A fresh directory for nginx's configuration, logs and temporary files.

    Directly under the system temp directory and world-readable: nginx started as root runs
    its workers as `nobody`, who must reach the temp paths (pytest's own tmp_path is not).
    """
    path = Path(tempfile.mkdtemp(prefix="pgsse-nginx-"))
    path.chmod(0o755)
    return path


def wait_for_port(port: int, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process exited {alive.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout}s") from None
            time.sleep(0.02)


def wait_for_answer(port: int, timeout: float, alive: subprocess.Popen[bytes]) -> None:
    """Wait, polling every 5 ms, until `port` answers an HTTP request. A refused connection
    means nothing listens yet; a connection accepted and then reset or closed unanswered is
    raised: whatever listens on the public port must answer (`nginx -t`, which cluster.sh
    once ran there, listens while it checks and resets whoever connected when it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive.poll() is not None:
            raise RuntimeError(f"process exited {alive.returncode} before port {port} answered")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: pgsse\r\nConnection: close\r\n\r\n")
                status = sock.makefile("rb").readline()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers on port {port} after {timeout}s") from None
            time.sleep(0.005)
            continue
        assert status.startswith(b"HTTP/1.1 "), f"port {port} accepted, then answered {status!r}"
        return


@dataclass
class Nginx:
    """nginx serving a run directory; `port` is its public (plain HTTP) port."""

    binary: str
    run_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def render(cls, upstream_ports: list[int]) -> Nginx:
        """The run directory as `make cluster` writes it, for these instance ports."""
        nginx = cls(require_nginx(), run_directory())
        subprocess.run(
            ["bash", str(CLUSTER_SH), "render", str(nginx.run_dir), str(nginx.port)]
            + [str(port) for port in upstream_ports],
            check=True,
            timeout=30,
        )
        return nginx

    @property
    def locations(self) -> Path:
        return self.run_dir / "pgsse" / "pgsse-locations.conf"

    def set_directive(self, name: str, value: str) -> None:
        """Change the one `name ...;` line of the locations file (a test's only deviation)."""
        text = self.locations.read_text()
        text, count = re.subn(
            rf"(?m)^(\s*){re.escape(name)}\s[^;]*;", rf"\g<1>{name} {value};", text
        )
        assert count == 1, f"{name} appears {count} times in {self.locations}"
        self.locations.write_text(text)

    def command(self, *extra: str) -> list[str]:
        prefix = f"{self.run_dir}/"
        conf = str(self.run_dir / "nginx.conf")
        return [self.binary, "-p", prefix, "-c", conf, "-e", "stderr", *extra]

    def start(self, timeout: float = 10.0) -> Nginx:
        subprocess.run(self.command("-q", "-t"), check=True, timeout=30, capture_output=True)
        with (self.run_dir / "stderr.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command("-g", "daemon off;"),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for_port(self.port, timeout, self.process)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{self.log()}") from None
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown: open streams end now
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def log(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.run_dir / name
            if path.exists():
                parts.append(f"--- nginx {name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)


@dataclass
class ClusterScript:
    """`deploy/cluster.sh COUNT PUBLIC_PORT FIRST_PORT` running in a session of its own."""

    env: dict[str, str]
    count: int
    public_port: int
    first_port: int
    run_dir: Path = field(default_factory=run_directory)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 45.0) -> ClusterScript:
        env = {**os.environ, **self.env, "PGSSE_RUN_DIR": str(self.run_dir)}
        argv = [str(CLUSTER_SH), str(self.count), str(self.public_port), str(self.first_port)]
        with (self.run_dir / "cluster.out").open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for_answer(self.public_port, timeout, self.process)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.run_report()}") from None
        return self

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C would; the script's exit code. Kills its group if it hangs."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                alive = subprocess.run(
                    ["ps", "-o", "pid,stat,etime,args", "-s", str(self.process.pid)],
                    capture_output=True,
                    text=True,
                ).stdout
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
                raise TimeoutError(
                    f"cluster.sh still running 30 s after SIGTERM; its processes:\n{alive}\n"
                    f"{self.run_report()}"
                ) from None
        return self.process.returncode

    def output(self) -> str:
        return (self.run_dir / "cluster.out").read_text(errors="replace")[-5000:]

    def run_report(self) -> str:
        """The script's output, then the tail of every log in its run directory."""
        parts = [self.output()]
        for path in sorted(self.run_dir.rglob("*.log")):
            parts.append(
                f"--- {path.relative_to(self.run_dir)}\n" + path.read_text(errors="replace")[-2000:]
            )
        return "\n".join(parts)

    def remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
