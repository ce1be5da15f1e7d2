"""The command line: bad settings stop start-up with one line; the embedded database path."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import jwt
import pytest

from broker.database import EmbeddedPostgres
from broker.embedded.placement import BASE
from broker.workers import STARTUP_SECONDS
from tests.support.database import Database, chain_modes
from tests.support.processes import BrokerProcess, free_port
from tests.support.sse import SSEClient

NO_DATABASE_URL = {"DATABASE_URL": "", "PGDATABASE_URL": ""}


def run_broker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("env", "args", "setting"),
    [
        ({"BROKER_PORT": "http"}, (), "BROKER_PORT"),
        ({"BROKER_HEARTBEAT_SECONDS": "0"}, (), "BROKER_HEARTBEAT_SECONDS"),
        ({}, ("--max-connections", "-5"), "BROKER_MAX_CONNECTIONS"),
        ({}, ("--log-format", "yaml"), "BROKER_LOG_FORMAT"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(
    env: dict[str, str], args: tuple[str, ...], setting: str
) -> None:
    result = run_broker("serve", *args, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0] and lines[0].startswith("pgsse: invalid")


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    result = run_broker("migrate", DATABASE_URL=f"postgresql://nobody@/db?host={tmp_path}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgsse: cannot connect to DATABASE_URL=")


StartUpCase = Callable[[Path, int], dict[str, str]]


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        (lambda tmp, busy: {"BROKER_PORT": str(busy)}, "BROKER_PORT"),
        (lambda tmp, busy: {"BROKER_HOST": "999.1.1.1"}, "BROKER_HOST"),
        (lambda tmp, busy: {"BROKER_HOST": "192.0.2.1"}, "BROKER_HOST"),  # not this machine's
        (lambda tmp, busy: {"BROKER_DATA_DIR": "/proc/nope"}, "BROKER_DATA_DIR"),
        (
            lambda tmp, busy: {
                "BROKER_MIGRATE": "false",
                "DATABASE_URL": f"postgresql://nobody@/db?host={tmp}",
            },
            "DATABASE_URL",
        ),
        (lambda tmp, busy: {"DATABASE_URL": "mysql://db.example/app"}, "DATABASE_URL"),
        (lambda tmp, busy: {"DATABASE_URL": "postgresql://h/db?nope=1"}, "DATABASE_URL"),
        (lambda tmp, busy: {"BROKER_LOG_LEVEL": "loud"}, "BROKER_LOG_LEVEL"),
    ],
    ids=[
        "busy-port",
        "unresolvable-host",
        "foreign-host",
        "data-dir-in-proc",
        "migrate-off-database-down",
        "not-postgresql",
        "bad-url-option",
        "log-level",
    ],
)
def test_start_up_failure_is_one_line_naming_the_setting_before_the_database_starts(
    case: StartUpCase, setting: str, tmp_path: Path, busy_port: int
) -> None:
    data_dir = tmp_path / "data"
    env = {
        **NO_DATABASE_URL,
        "BROKER_PORT": str(free_port()),
        "BROKER_DATA_DIR": str(data_dir),
        "BROKER_LOG_FORMAT": "json",
        **case(tmp_path, busy_port),
    }
    result = run_broker("serve", **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgsse: ") and setting in lines[0]
    assert not os.path.lexists(data_dir), "the embedded database was started"


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgres", "postgresql"])
def test_url_schemes_of_other_tools_are_accepted(
    scheme: str, database: Database, session_id: str
) -> None:
    url = database.url.replace("postgresql://", f"{scheme}://", 1)
    result = run_broker("publish", "--session", session_id, "x", DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sessionId"] == session_id


def test_pgsse_and_broker_are_one_command_with_a_version() -> None:
    scripts = Path(sys.executable).parent
    for name in ("pgsse", "broker"):
        done = subprocess.run(
            [str(scripts / name), "--version"], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [name, version("pgsse")]


@pytest.mark.parametrize("command", ["serve", "migrate", "publish", "token", "clean"])
def test_every_flag_says_its_default(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    entries: list[str] = []  # one per option: its line and the help lines under it
    for line in done.stdout.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("    "):
            entries[-1] += " " + line.strip()
    flags = [entry for entry in entries if not entry.startswith("  -h")]
    assert flags
    for entry in flags:
        assert "default" in entry or "(required)" in entry, entry


def test_publish_inserts_and_prints_the_stored_message(database: Database, session_id: str) -> None:
    result = run_broker(
        "publish",
        "--session",
        session_id,
        "--robot",
        "r1",
        "hé 你好",
        DATABASE_URL=database.url,
        BROKER_LOG_FORMAT="json",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = json.loads(result.stdout)
    assert printed["sessionId"] == session_id and printed["content"] == "hé 你好"
    rows = database.query(
        "SELECT content, robot_id FROM messages WHERE id = %s", (int(printed["id"]),)
    )
    assert rows == [("hé 你好", "r1")]


def test_migrate_is_idempotent_and_safe_in_parallel(database: Database) -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "broker", "migrate"],
            env={**os.environ, "DATABASE_URL": database.url, "BROKER_LOG_FORMAT": "json"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert out.startswith(b"migrated: 001_messages.sql") and err == b""
    triggers = database.query(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'trigger_notify_new_message'"
    )
    assert triggers == [(1,)]


async def test_serve_without_database_url_starts_the_embedded_postgres(
    home: Path, session_id: str
) -> None:
    """What `make run` does on a fresh clone, as root in a mode-700 home too: no
    DATABASE_URL, data for `.data`, served on 127.0.0.1; no directory's mode changes."""
    clone = home / "pgsse"
    clone.mkdir()
    before = chain_modes(clone)
    data_dir = clone / ".data"
    env = {**NO_DATABASE_URL, "BROKER_LOG_FORMAT": "json", "BROKER_DATA_DIR": str(data_dir)}
    broker = BrokerProcess({**env, "BROKER_HOST": ""}, home.parent / "broker.log")
    try:
        broker.start(timeout=60)
        assert (data_dir / "PG_VERSION").exists()
        client = await SSEClient.open(broker.port, params={"sessionId": session_id})
        published = run_broker("publish", "--session", session_id, "hello", **env)
        assert published.returncode == 0, published.stderr
        assert published.stderr == ""  # its result on stdout, and nothing else
        assert json.loads(published.stdout)["content"] == "hello"
        assert json.loads((await client.message(timeout=10)).data or "")["data"]["content"] == (
            "hello"
        )
        await client.close()
    finally:
        broker.stop()
        log = broker.log_events()
        EmbeddedPostgres(data_dir).destroy()
    assert broker.wait() == 0
    assert chain_modes(clone) == before
    events = {e["event"]: e for e in log}
    assert "embedded_postgres_started" in events and "embedded_postgres_stopped" in events
    assert events["listening"]["addresses"] == [f"127.0.0.1:{broker.port}"]  # not 0.0.0.0
    if os.geteuid() == 0:  # one line says where the data really is
        assert Path(events["embedded_postgres_data"]["data_dir"]).parent == BASE


@pytest.mark.parametrize(("level", "logged"), [("info", False), ("debug", True)])
async def test_streams_opening_and_closing_are_logged_at_debug(
    level: str, logged: bool, start_broker: Callable[..., BrokerProcess], session_id: str
) -> None:
    broker = start_broker(BROKER_LOG_LEVEL=level)
    client = await SSEClient.open(broker.port, params={"sessionId": session_id})
    await client.event()
    await client.close()
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 0, 5, "stream released")
    broker.stop()
    events = {e["event"] for e in broker.log_events()}
    assert ("stream_opened" in events) is logged and ("stream_closed" in events) is logged
    assert "listening" in events  # info still logged


async def test_workers_without_a_bus_listen_each_and_one_killed_is_forked_again(
    start_broker: Callable[..., BrokerProcess], database: Database, session_id: str
) -> None:
    """`--workers 2` with no bus: two listening backends, and a warning saying so. A worker
    killed with -9 is forked again (its clients come back through the same port); SIGTERM
    stops every worker and the parent exits 0."""
    broker = start_broker(BROKER_WORKERS="2")
    started = time.monotonic()
    first = set(broker.worker_stats(2))
    broker.wait_until(lambda: database.listening_backends() == 2, 10, "two listeners")
    warned = [e for e in broker.log_events() if e["event"] == "workers_without_bus"]
    assert warned and warned[0]["listening_backends"] == 2
    # A worker that dies while starting stops them all instead: wait until that is past.
    await asyncio.sleep(max(0.0, STARTUP_SECONDS - (time.monotonic() - started)))
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    broker.wait_until(
        lambda: (pids := set(broker.worker_stats(2))) != first and victim not in pids,
        20,
        "the killed worker forked again",
    )
    client = await SSEClient.open(broker.port, params={"sessionId": session_id})
    await client.events_until(lambda event: event.type == "connected")
    row = database.insert(session_id, "after the restart")
    assert (await client.message(timeout=10)).json["data"]["id"] == str(row)
    await client.close()
    workers = set(broker.worker_stats(2))
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    events = [e["event"] for e in broker.log_events()]
    assert "worker_died" in events and "worker_restarted" in events
    assert "workers_stopped" in events


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_shutdown_with_a_dead_log_pipe_closes_streams_and_exits_zero(
    sig: signal.Signals, database: Database, session_id: str
) -> None:
    """`make run 2>&1 | tee run.log`, then Ctrl-C, which ends `tee` as well: the broker's
    stdout and stderr are a pipe nobody reads any more. Writing its log fails from then on
    (EPIPE), which must not stop the shutdown: every stream still gets the error event and
    the broker exits 0 at once, not after the grace period."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database.url,
        "BROKER_MIGRATE": "false",
        "BROKER_LOG_FORMAT": "json",
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": str(port),
        "BROKER_SHUTDOWN_GRACE_SECONDS": "10",
    }
    process = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "broker", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        broker = BrokerProcess({}, Path(os.devnull), port=port, process=process)
        await asyncio.to_thread(broker.wait_until, broker.ready, 20, "broker ready")
        client = await SSEClient.open(port, params={"sessionId": session_id})
        await client.events_until(lambda event: event.type == "connected")
        assert process.stdout is not None
        process.stdout.close()  # the reader of the pipe is gone, as `tee` is after Ctrl-C
        started = time.monotonic()
        process.send_signal(sig)
        events = await client.events_until(lambda event: event.type == "error", timeout=5)
        assert "shutting down" in events[-1].json["error"]
        assert await asyncio.to_thread(process.wait, 8) == 0
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"shutdown took {elapsed:.1f}s"
        await client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_a_misspelt_setting_is_warned_about_in_one_line_naming_the_closest() -> None:
    result = run_broker(
        "token",
        "--sessions",
        "s1",
        BROKER_AUTH_SECRET="a-secret-of-thirty-two-bytes-or-more!",
        BROKER_MAX_CONECTIONS="5",
        BROKER_LOG_FORMAT="json",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    warning = json.loads(lines[0])
    assert warning["event"] == "unknown_setting" and warning["level"] == "warning"
    assert warning["variable"] == "BROKER_MAX_CONECTIONS"
    assert warning["closest"] == "BROKER_MAX_CONNECTIONS"


@pytest.mark.parametrize(
    "args", [("publish", "--session", "s1", "hello"), ("migrate",)], ids=["publish", "migrate"]
)
def test_commands_other_than_serve_create_no_database(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    """Run in the wrong directory, `publish` used to create an embedded cluster there, fail
    on its missing table after seconds and leave it behind. It says instead, in one line,
    where it looked and what to set."""
    data_dir = tmp_path / "elsewhere" / ".data"
    env = {**NO_DATABASE_URL, "BROKER_DATA_DIR": str(data_dir), "BROKER_LOG_FORMAT": "json"}
    started = time.monotonic()
    result = run_broker(*args, **env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgsse: no database:")
    assert str(data_dir) in lines[0] and "DATABASE_URL" in lines[0]
    assert "BROKER_DATA_DIR" in lines[0]
    assert not os.path.lexists(data_dir) and not os.path.lexists(data_dir.parent)
    assert time.monotonic() - started < 10


def test_version_imports_neither_the_server_nor_the_database() -> None:
    """`pgsse --version` answers at once: it used to import the whole server (1.2 s)."""
    heavy = ("uvicorn", "starlette", "psycopg", "structlog", "orjson", "redis", "jwt")
    probe = (
        "import sys\n"
        "from broker.cli import main\n"
        "try:\n    main(['--version'])\n"
        "except SystemExit:\n    pass\n"
        f"print(sorted(set({heavy!r}) & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.splitlines() == [f"pgsse {version('pgsse')}", "[]"]


def test_clean_shows_what_is_kept_and_removes_only_what_is_unused(
    home: Path, database: Database
) -> None:
    """`pgsse clean` lists BROKER_DATA_DIR's cluster and what /var/lib/pgsse holds; with
    --yes it removes BROKER_DATA_DIR's cluster and, as root, stopped clusters whose checkout
    is gone, never a running one (the test session's) or one in use."""
    mine, gone, kept = home / "mine" / ".data", home / "gone" / ".data", home / "kept" / ".data"
    clusters = {path: EmbeddedPostgres(path) for path in (mine, gone, kept)}
    for cluster in clusters.values():
        cluster.start()
        cluster.stop()
    real = {path: path.resolve() for path in clusters}
    shutil.rmtree(gone.parent)  # a checkout removed without `make clean`
    try:
        shown = run_broker("clean", "--data-dir", str(mine), **NO_DATABASE_URL)
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        lines = shown.stdout.splitlines()
        assert (
            lines[0]
            == f"{mine}: embedded PostgreSQL in {real[mine]}, {lines[0].split(', ')[1]}, stopped"
        )
        assert all(path.exists() for path in real.values())  # only shown

        removed = run_broker("clean", "--yes", "--data-dir", str(mine), **NO_DATABASE_URL)
        assert removed.returncode == 0, removed.stderr
        assert not real[mine].exists() and not os.path.lexists(mine)
        assert real[kept].exists() and database.server.data_dir.exists()  # in use; running
        if os.geteuid() == 0:  # relocated under /var/lib/pgsse, with their origin recorded
            assert f"{real[kept]}: embedded PostgreSQL for {kept}," in shown.stdout
            assert f"{real[gone]}: embedded PostgreSQL for {gone}, which is gone," in shown.stdout
            assert f"removed {real[gone]}" in removed.stdout and not real[gone].exists()
            assert f"{database.server.data_dir}: embedded PostgreSQL for" in removed.stdout
    finally:
        for cluster in clusters.values():
            cluster.destroy()


TOKEN_SECRET = "a-secret-of-thirty-two-bytes-or-more!"


def _claims(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    claims: dict[str, object] = jwt.decode(
        result.stdout.strip(), TOKEN_SECRET, algorithms=["HS256"]
    )
    return claims


def test_token_feed_keys_scope_each_feed_beside_the_sessions(tmp_path: Path) -> None:
    env = {"BROKER_AUTH_SECRET": TOKEN_SECRET}
    claims = _claims(
        run_broker(
            "token", "--sessions", "s1", "--feed", "orders", "--keys", "42, 43",
            "--feed", "tickets", "--keys", "*", **env,
        )
    )  # fmt: skip
    assert claims["feeds"] == {"orders": ["42", "43"], "tickets": "*"}
    assert claims["sessions"] == ["s1"] and claims["robots"] == "*"
    only_feeds = _claims(run_broker("token", "--feed", "orders", "--keys", "*", **env))
    assert only_feeds["feeds"] == {"orders": "*"} and only_feeds["sessions"] == []
    assert "feeds" not in _claims(run_broker("token", "--sessions", "*", **env))

    config = tmp_path / "pgsse.toml"
    config.write_text('[feeds.orders]\ntable = "shop.orders"\nkey = "customer_id"\n')
    declared = run_broker(
        "token", "--config", str(config), "--feed", "orders", "--keys", "1", **env
    )
    assert _claims(declared)["feeds"] == {"orders": ["1"]}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "give --sessions, --feed"),
        (("--feed", "orders"), "give each --feed its --keys"),
        (("--feed", "orders", "--keys", " , "), "--keys is empty"),
        (("--feed", "orders", "--keys", "1", "--feed", "orders", "--keys", "2"), "given twice"),
        (("--feed", "messages", "--keys", "s1"), "scoped by --sessions"),
        (("--config", "{config}", "--feed", "ordres", "--keys", "1"), "feeds: orders"),
    ],
    ids=["nothing", "no-keys", "empty-keys", "twice", "messages", "undeclared"],
)
def test_token_feed_mistakes_are_one_line_and_print_no_token(
    args: tuple[str, ...], says: str, tmp_path: Path
) -> None:
    config = tmp_path / "pgsse.toml"
    config.write_text('[feeds.orders]\ntable = "shop.orders"\nkey = "customer_id"\n')
    argv = [arg.format(config=config) for arg in args]
    result = run_broker("token", *argv, BROKER_AUTH_SECRET=TOKEN_SECRET)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgsse: token:") and says in lines[0]
