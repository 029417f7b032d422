"""Shared fixtures: a real database per session, a schema per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection

from tests import pgserver
from tests.workers import E2E


@pytest.fixture(scope="session")
def broker_url(pg_dsn: str) -> str:
    return pgserver.as_broker_url(pg_dsn)


@pytest.fixture
def schema() -> str:
    """A schema name of this test's own; the transport creates it."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def db(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection to the test database, for assertions."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def transport_options(schema: str) -> dict[str, Any]:
    return {"schema": schema}


@pytest.fixture
def connection(broker_url: str, transport_options: dict[str, Any]) -> Iterator[Connection]:
    conn = Connection(broker_url, transport_options=transport_options)
    yield conn
    conn.release()


@pytest.fixture
def make_connection(broker_url: str, transport_options: dict[str, Any]) -> Iterator[Any]:
    """Open more connections (other 'processes') on the same schema."""
    opened: list[Connection] = []

    def make(**extra: Any) -> Connection:
        conn = Connection(broker_url, transport_options={**transport_options, **extra})
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.release()


def _listener_threads() -> set[Any]:
    import threading

    return {t for t in threading.enumerate() if t.name == "celery-pgnotify-listener"}


@pytest.fixture(autouse=True)
def no_leaked_listeners() -> Iterator[None]:
    """Every LISTEN session a test opens is closed when its connection is."""
    before = _listener_threads()
    yield
    import time

    deadline = time.monotonic() + 5
    while _listener_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = _listener_threads() - before
    assert not leaked, f"{len(leaked)} LISTEN session(s) left running"


@pytest.fixture
def e2e(broker_url: str, pg_dsn: str, schema: str) -> Iterator[E2E]:
    """A sending app, a log table and worker processes, stopped afterwards."""
    env = E2E(broker_url, pg_dsn, schema)
    yield env
    env.close()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines a test reports at the end of the run (carried in its report,
    so that they reach the summary from pytest-xdist's workers too)."""
    lines: list[str] = []
    yield lines
    request.node.user_properties.extend(("figure", line) for line in lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "teardown"
        for key, value in getattr(report, "user_properties", ())
        if key == "figure"
    ]
    if lines:
        terminalreporter.section("fault suite: every task accounted for")
        for line in lines:
            terminalreporter.write_line(line)
