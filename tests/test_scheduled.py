"""Broker-held ETAs: a task due later waits in ``scheduled``, where no claim
looks, and a consumer of its queue moves it to the queue when due."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Producer, Queue

from celery_pgnotify import migrations
from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.options import PROMOTE_AHEAD
from tests.test_transport import collect, drain_until

# A consumer refreshes its next due time at each heartbeat: short beats let
# a short threshold (2 x beat + PROMOTE_AHEAD) keep the tests short.
FAST = {"heartbeat_interval": 0.5, "lease_timeout": 30.0, "broker_eta_threshold": 2.0}


@pytest.fixture
def transport_options(schema: str) -> dict[str, Any]:
    return {"schema": schema, **FAST}


def task(
    conn: Connection, queue: Queue, eta_in: float | None, priority: int = 0, name: str = "t"
) -> tuple[str, datetime | None]:
    """Publish a Celery-shaped task message due in ``eta_in`` seconds."""
    task_id = str(uuid.uuid4())
    eta = None if eta_in is None else datetime.now(timezone.utc) + timedelta(seconds=eta_in)
    headers = {"task": name, "id": task_id, "eta": None if eta is None else eta.isoformat()}
    Producer(conn.default_channel).publish(
        {"id": task_id}, routing_key=queue.name, declare=[queue], headers=headers, priority=priority
    )
    return task_id, eta


def counts(db: psycopg.Connection[Any], schema: str) -> tuple[int, int]:
    row = db.execute(
        f'SELECT (SELECT count(*) FROM "{schema}".scheduled),'
        f' (SELECT count(*) FROM "{schema}".messages)'
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_a_task_due_later_waits_in_the_database_and_is_delivered_when_due(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    task_id, eta = task(connection, queue, eta_in=4.0)
    assert eta is not None
    assert counts(db, schema) == (1, 0)  # no claim can see it
    received: list[Any] = []
    with Consumer(connection.default_channel, [queue], callbacks=[collect(received)]):
        try:
            connection.drain_events(timeout=1.5)
        except TimeoutError:
            pass
        assert received == []  # not before it is due
        drain_until(connection, received, 1, timeout=10)
    got_at = datetime.now(timezone.utc)
    assert received[0][0] == {"id": task_id}
    # Moved at most PROMOTE_AHEAD early; the worker holds it for the rest.
    assert got_at >= eta - timedelta(seconds=PROMOTE_AHEAD)
    assert counts(db, schema) == (0, 0)


def test_due_tasks_keep_priority_and_publish_order(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    producer, consumer = make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}", max_priority=9)
    order = []
    for priority in (0, 5, 0, 9, 5):
        task_id, _ = task(producer, queue, eta_in=3.0, priority=priority)
        order.append((priority, task_id))
    assert counts(db, schema) == (5, 0)
    # All due at about the same time: the best priority first, then FIFO.
    time.sleep(3.0)
    received: list[Any] = []
    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        drain_until(consumer, received, 5, timeout=10)
    want = [i for _p, i in sorted(order, key=lambda pi: -pi[0])]
    assert [body["id"] for body, _m in received] == want


@pytest.mark.parametrize(
    ("eta_in", "extra", "scheduled"),
    [
        (None, {}, 0),  # no ETA
        (1.0, {}, 0),  # within broker_eta_threshold: the worker holds it
        (-30.0, {}, 0),  # overdue already
        (60.0, {}, 1),
        (60.0, {"broker_etas": False}, 0),  # turned off: as on other brokers
    ],
)
def test_which_tasks_wait_in_the_database(
    make_connection: Any,
    db: psycopg.Connection[Any],
    schema: str,
    eta_in: float | None,
    extra: dict[str, Any],
    scheduled: int,
) -> None:
    conn = make_connection(**extra)
    task(conn, Queue(f"q{uuid.uuid4().hex[:8]}"), eta_in=eta_in)
    assert counts(db, schema) == (scheduled, 1 - scheduled)


def test_a_message_that_is_not_a_task_is_never_held(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    Producer(connection.default_channel).publish(
        "x", routing_key=queue.name, declare=[queue], headers={"eta": later}
    )
    assert counts(db, schema) == (0, 1)


def test_the_threshold_must_leave_a_heartbeat_to_notice(make_connection: Any) -> None:
    with pytest.raises(ConfigurationError, match="broker_eta_threshold"):
        make_connection(broker_eta_threshold=1.0).connect()


def test_send_task_in_sql_schedules_long_countdowns(
    db: psycopg.Connection[Any], schema: str
) -> None:
    migrations.migrate(db, schema)
    try:
        db.execute(f'SELECT "{schema}".send_task(%s, countdown => 3600)', ("t.later",))
        db.execute(f'SELECT "{schema}".send_task(%s, countdown => 5)', ("t.soon",))
        row = db.execute(
            f"SELECT task_id, queue, due_at - now() > interval '59 minutes'"
            f' FROM "{schema}".scheduled'
        ).fetchone()
        assert row is not None and row[1:] == ("celery", True)
        assert counts(db, schema) == (1, 1)
        eta = db.execute(
            f"SELECT (payload::jsonb)->'headers'->>'eta', (payload::jsonb)->'headers'->>'id'"
            f' FROM "{schema}".scheduled'
        ).fetchone()
        assert eta is not None and eta[1] == row[0] and eta[0] is not None
    finally:
        db.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_tasks_due_while_no_consumer_ran_are_delivered_when_one_starts(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    producer = make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    ids = [task(producer, queue, eta_in=2.5)[0] for _ in range(3)]
    db.execute(
        f"UPDATE \"{schema}\".scheduled SET due_at = now() - interval '1 hour'"
    )  # long overdue, as after an outage
    consumer = make_connection()
    received: list[Any] = []
    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        drain_until(consumer, received, 3, timeout=10)
    assert sorted(body["id"] for body, _m in received) == sorted(ids)
    assert counts(db, schema) == (0, 0)


def test_status_counts_them_and_purge_drops_them(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    from celery_pgnotify import ops
    from celery_pgnotify.statements import statements

    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    for eta_in in (600.0, 900.0, None):
        task(connection, queue, eta_in=eta_in)
    (row,) = [q for q in ops.status(db, statements(schema))["queues"] if q["queue"] == queue.name]
    assert (row["ready"], row["scheduled"]) == (1, 2)
    assert 590 <= row["next_due_s"] <= 600
    assert connection.default_channel.queue_purge(queue.name) == 3
    assert counts(db, schema) == (0, 0)


@pytest.mark.parametrize(
    "payload",
    ["not json", "[1, 2]", '"text"', "[" * 100_000, '{"headers": [], "body": ""}', "{}"],
)
def test_a_scheduled_row_that_is_no_task_is_left_out_of_inspect(payload: str) -> None:
    from celery_pgnotify.promoter import inspect_entry

    assert inspect_entry(payload, datetime.now(timezone.utc), 0, "w@h") is None


def test_a_backlog_fallen_due_is_moved_a_batch_a_turn(
    db: psycopg.Connection[Any], schema: str
) -> None:
    # After an outage thousands may be due at once: each turn of the LISTEN
    # thread moves at least one batch and then yields to the heartbeat.
    from celery_pgnotify.promoter import PROMOTE_BATCH, Promoter
    from celery_pgnotify.statements import statements

    migrations.migrate(db, schema)
    stmts = statements(schema)
    db.execute(
        f'INSERT INTO "{schema}".scheduled (queue, payload, due_at)'
        " SELECT 'q', '{}', now() - interval '1 hour' FROM generate_series(1, %s)",
        (PROMOTE_BATCH + 10,),
    )
    promoter = Promoter(stmts, retry_after=0.0, fresh=3.0)  # no time for a second batch
    promoter.promote(db, ["q"])
    assert counts(db, schema) == (10, PROMOTE_BATCH)
    assert promoter.is_due()  # the rest on the next turn
    promoter.promote(db, ["q"])
    assert counts(db, schema) == (0, PROMOTE_BATCH + 10)
    assert promoter.next_at is None  # nothing scheduled any more
    db.execute(f'DROP SCHEMA "{schema}" CASCADE')
