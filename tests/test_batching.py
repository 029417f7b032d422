"""A group's tasks are published by one statement, in order, and all of them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, group
from kombu.exceptions import EncodeError

from celery_pgnotify import enqueue_in
from celery_pgnotify.batching import MANY
from celery_pgnotify.transport import Channel
from tests.workers import close_app


@pytest.fixture
def app(broker_url: str, schema: str) -> Iterator[Celery]:
    app = Celery("batching", broker=broker_url)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.task_default_queue = "batched"
    app.conf.task_ignore_result = True
    yield app
    close_app(app)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement a channel runs on its own connection, in order."""
    ran: list[str] = []
    execute = Channel._execute

    def counted(self: Channel, query: str, params: dict[str, Any]) -> Any:
        ran.append(query)
        return execute(self, query, params)

    monkeypatch.setattr(Channel, "_execute", counted)
    return ran


def _stored(db: psycopg.Connection[Any], schema: str, table: str = "messages") -> list[str]:
    rows = db.execute(f'SELECT task_id FROM "{schema}".{table} ORDER BY id').fetchall()
    return [r[0] for r in rows]


def test_a_group_of_a_thousand_is_one_statement_in_task_order(
    app: Celery, db: psycopg.Connection[Any], schema: str, statements: list[str]
) -> None:
    add = app.signature("tests.add")
    add.delay(0, 0)  # declares the queue
    before = len(_stored(db, schema))
    statements.clear()
    result = group(add.clone((i, i)) for i in range(1000)).apply_async()
    assert len(statements) == 1, "one statement (autocommit: one commit) for the group"
    with app.connection_for_write() as conn:
        publishes = conn.default_channel._publishes
    assert statements == [publishes.publish_many]
    assert _stored(db, schema)[before:] == [r.id for r in result.results]


def test_nested_groups_and_scheduled_members_go_in_the_same_statement(
    app: Celery, db: psycopg.Connection[Any], schema: str, statements: list[str]
) -> None:
    add = app.signature("tests.add")
    add.delay(0, 0)
    statements.clear()
    result = group(
        group(add.clone((1, 1)), add.clone((2, 2))),
        add.clone((3, 3), countdown=3600),
        add.clone((4, 4)),
    ).apply_async()
    assert len(statements) == 1
    first, second, later, last = result.results  # Celery flattens the inner group
    assert _stored(db, schema)[1:] == [first.id, second.id, last.id]
    assert _stored(db, schema, "scheduled") == [later.id]


def test_what_a_failing_group_published_before_the_error_is_stored(
    app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    add = app.signature("tests.add")
    add.delay(0, 0)
    members = [add.clone((i, i)) for i in range(3)] + [add.clone((object(), 1))]
    with pytest.raises(EncodeError):
        group(members).apply_async()
    assert len(_stored(db, schema)) == 1 + 3


def test_a_group_member_matching_no_queue_is_reported_and_the_rest_stored(
    app: Celery, db: psycopg.Connection[Any], schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    add = app.signature("tests.add")
    add.delay(0, 0)
    with app.connection_for_write() as conn:
        conn.default_channel.exchange_declare("lonely", "direct")
    lost = add.clone((9, 9), exchange="lonely", routing_key="nowhere")
    with caplog.at_level(logging.WARNING, logger="celery_pgnotify.transport"):
        result = group(add.clone((1, 1)), lost, add.clone((2, 2))).apply_async()
    assert "matched no queue" in caplog.text
    first, _, last = result.results
    assert _stored(db, schema)[1:] == [first.id, last.id]


def test_a_group_larger_than_one_statement_holds_is_stored_in_several(
    app: Celery, db: psycopg.Connection[Any], schema: str, statements: list[str]
) -> None:
    add = app.signature("tests.add")
    add.delay(0, 0)
    statements.clear()
    result = group(add.clone((i, i)) for i in range(2 * MANY + 1)).apply_async()
    assert len(statements) == 3
    assert _stored(db, schema)[1:] == [r.id for r in result.results]


@pytest.mark.parametrize("commit", [True, False])
def test_a_group_inside_enqueue_in_is_one_statement_of_the_callers_transaction(
    app: Celery, db: psycopg.Connection[Any], schema: str, pg_dsn: str, commit: bool
) -> None:
    add = app.signature("tests.add")
    add.delay(0, 0)
    ran: list[str] = []
    with psycopg.connect(pg_dsn) as conn:
        conn.add_notice_handler(lambda _: None)
        execute = conn.execute

        def counted(query: Any, params: Any = None, **kwargs: Any) -> Any:
            ran.append(str(query))
            return execute(query, params, **kwargs)

        conn.execute = counted  # type: ignore[method-assign]
        with conn.transaction(force_rollback=not commit):
            with enqueue_in(conn):
                result = group(add.clone((i, i)) for i in range(5)).apply_async()
            assert len(_stored(db, schema)) == 1, "not visible before the caller commits"
    assert len(ran) == 1
    expected = [r.id for r in result.results] if commit else []
    assert _stored(db, schema)[1:] == expected


def test_a_group_whose_connection_was_lost_is_stored_on_a_new_one(
    app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    """As kombu retries a single publish, a group's statement is tried again
    on a new connection (PostgreSQL restarted, the session terminated)."""
    add = app.signature("tests.add")
    add.delay(0, 0)
    with app.connection_for_write() as conn:
        pid = conn.default_channel.connection.work_conn().info.backend_pid
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        result = group(add.clone((i, i)) for i in range(5)).apply_async(
            producer=app.amqp.Producer(conn)
        )
    assert _stored(db, schema)[1:] == [r.id for r in result.results]
