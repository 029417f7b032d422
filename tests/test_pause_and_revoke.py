"""Queues that pause, and revokes recorded for workers yet to start."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Consumer, Producer, Queue

from celery_pgnotify import ops
from celery_pgnotify.revoking import REVOKE_EXPIRES
from celery_pgnotify.statements import statements
from tests.tablestats import report, table_reads
from tests.test_scheduled import task
from tests.test_transport import collect, drain_for, drain_until
from tests.workers import close_app


def publish(conn: Connection, queue: Queue, *bodies: Any) -> None:
    producer = Producer(conn.default_channel)
    for body in bodies:
        producer.publish(body, routing_key=queue.name, declare=[queue])


@pytest.fixture
def transport_options(schema: str) -> dict[str, Any]:
    # No fallback re-read within a test: only a notification wakes a consumer.
    return {"schema": schema, "polling_interval": 120.0}


def test_a_paused_queue_gives_nothing_while_others_run_and_drains_on_resume(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    producer, consumer = make_connection(), make_connection()
    held, other = Queue(f"h{uuid.uuid4().hex[:8]}"), Queue(f"o{uuid.uuid4().hex[:8]}")
    publish(producer, held, *range(5))
    stmts = statements(schema)
    assert ops.pause(db, stmts, held.name) is True
    assert ops.pause(db, stmts, held.name) is False  # paused already
    publish(producer, held, 5)  # publishing goes on
    publish(producer, other, *range(3))
    received: list[Any] = []
    with Consumer(consumer.default_channel, [held, other], callbacks=[collect(received)]):
        drain_until(consumer, received, 3)
        drain_for(consumer, 3)
        assert sorted(body for body, _m in received) == [0, 1, 2]  # the other queue only
        status = {q["queue"]: q for q in ops.status(db, stmts)["queues"]}
        assert status[held.name]["paused"] is True and status[held.name]["ready"] == 6
        assert status[other.name]["paused"] is False
        # Resuming notifies: the blocked consumer drains the backlog at once.
        assert ops.resume(db, stmts, held.name) is True
        drain_until(consumer, received, 9, timeout=10)
    assert ops.resume(db, stmts, held.name) is False
    assert sorted(body for body, _m in received) == [0, 0, 1, 1, 2, 2, 3, 4, 5]


def test_basic_get_respects_a_pause(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    publish(connection, queue, "x")
    ops.pause(db, statements(schema), queue.name)
    channel = connection.default_channel
    assert channel.basic_get(queue.name) is None
    ops.resume(db, statements(schema), queue.name)
    message = channel.basic_get(queue.name)
    assert message is not None and message.payload == "x"
    message.ack()


@pytest.fixture
def app(broker_url: str, transport_options: dict[str, Any]) -> Iterator[Celery]:
    app = Celery("revoker", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = transport_options
    yield app
    close_app(app)


def test_the_python_api_pauses_through_the_apps_broker(
    app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    import celery_pgnotify

    assert celery_pgnotify.pause_queue(app, "reports") is True
    paused = db.execute(f'SELECT name FROM "{schema}".paused_queues').fetchall()
    assert paused == [("reports",)]
    assert celery_pgnotify.resume_queue(app, "reports") is True
    assert db.execute(f'SELECT count(*) FROM "{schema}".paused_queues').fetchone() == (0,)


def test_a_revoke_is_recorded_with_its_expiry(
    app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    app.control.revoke("one")
    app.control.revoke(["two", "three"], terminate=True)
    app.control.broadcast("ping")  # other commands are not recorded
    rows = db.execute(
        f'SELECT task_id, extract(epoch FROM expires_at - now()) FROM "{schema}".revoked'
        " ORDER BY task_id"
    ).fetchall()
    assert [r[0] for r in rows] == ["one", "three", "two"]
    assert all(REVOKE_EXPIRES - 60 < float(r[1]) <= REVOKE_EXPIRES for r in rows)
    # Expired records go as the next revoke is written.
    db.execute(f"UPDATE \"{schema}\".revoked SET expires_at = now() - interval '1 s'")
    app.control.revoke("four")
    left = db.execute(f'SELECT task_id FROM "{schema}".revoked').fetchall()
    assert left == [("four",)]


def test_a_claim_tells_the_worker_of_a_revoke_it_did_not_hear(
    make_connection: Any, app: Celery
) -> None:
    from celery.worker import state

    producer, consumer = make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    doomed, _ = task(producer, queue, eta_in=None)
    spared, _ = task(producer, queue, eta_in=None)
    app.control.revoke(doomed)
    state.revoked.discard(doomed)  # this process stands for a worker that was not up
    received: list[Any] = []
    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        drain_until(consumer, received, 2)
    # Both are delivered (the worker discards the revoked one, as Celery
    # does), and the worker now knows the revoke.
    assert doomed in state.revoked and spared not in state.revoked
    state.revoked.discard(doomed)


def test_a_burst_of_revokes_leaves_every_claim_one_probe_per_message(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """A claim asks ``revoked`` about each message it takes. Its plan is made
    once per session; made while ``revoked`` was empty (and vacuumed), it
    read the whole table for every message once a burst of revokes had
    filled it, until the table was next analysed: every claim of every
    consumer slowed with the table's size."""
    producer, consumer = make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    received: list[Any] = []

    def one_at_a_time(rounds: int) -> None:
        for _ in range(rounds):
            task(producer, queue, eta_in=None)
            drain_until(consumer, received, len(received) + 1)

    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        one_at_a_time(1)
        db.execute(f'VACUUM "{schema}".revoked')  # empty, and known to be
        one_at_a_time(12)  # the claim's plan is made and kept: prepared, generic
        db.execute(
            f'INSERT INTO "{schema}".revoked (task_id, expires_at)'
            " SELECT 'r' || g, now() + interval '1 hour' FROM generate_series(1, 20000) AS g"
        )
        before = table_reads(db, schema, "revoked")
        one_at_a_time(5)
        report(consumer.transport.claim_conn())
    assert len(received) == 18
    after = table_reads(db, schema, "revoked")
    read = after["seq_tup_read"] - before["seq_tup_read"]
    assert after["idx_scan"] - before["idx_scan"] >= 5 or read, "no statistics of the claims"
    assert read == 0, f"5 claims read {read} rows of revoked"


def test_a_revoke_reads_only_the_expired_records_it_removes(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """Each revoke removes the records that have expired. It found them by
    reading the whole table: with 20,000 revokes of the last hours recorded,
    every revoke read 20,000 rows, so revoking a batch of tasks one at a
    time took time that grew with the square of their number."""
    from kombu import pidbox

    conn = make_connection()
    # Celery's own broadcast (``app.control.revoke``), on a session this test knows.
    mailbox = pidbox.Mailbox("celery", type="fanout", accept=["json"])(conn)

    def revoke(task_id: str) -> None:
        mailbox._broadcast("revoke", {"task_id": task_id, "terminate": False})

    for i in range(20):  # prepared, then planned once for good while the table is small
        revoke(f"warm{i}")
    db.execute(
        f'INSERT INTO "{schema}".revoked (task_id, expires_at)'
        " SELECT 'live' || g, now() + interval '1 hour' FROM generate_series(1, 20000) AS g"
        " UNION ALL SELECT 'gone' || g, now() - interval '1 s' FROM generate_series(1, 5) AS g"
    )
    work = conn.transport.work_conn()
    report(work)
    before = table_reads(db, schema, "revoked")
    revoke("fresh")
    report(work)
    after = table_reads(db, schema, "revoked")
    assert after["seq_scan"] + after["idx_scan"] > before["seq_scan"] + before["idx_scan"], (
        "no statistics of the revoke"
    )
    read = after["seq_tup_read"] - before["seq_tup_read"]
    assert read == 0, f"one revoke read {read} rows of revoked"
    kinds = db.execute(
        f'SELECT left(task_id, 4), count(*) FROM "{schema}".revoked GROUP BY 1 ORDER BY 1'
    ).fetchall()
    assert kinds == [("fres", 1), ("live", 20000), ("warm", 20)]  # the expired ones went
