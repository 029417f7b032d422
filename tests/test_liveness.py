"""A stall is not a death; what the table says beats what a process remembers."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psycopg
from kombu import Consumer, Exchange, Queue

from celery_pgnotify.statements import statements
from tests.test_leases import _park_holding_one, start_holder, stop
from tests.test_transport import collect, count_rows, drain_until, publish

FAST = {"heartbeat_interval": 0.2, "lease_timeout": 1.0}


def test_a_shared_stall_longer_than_the_lease_reaps_nobody(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, pg_dsn: str
) -> None:
    """Every consumer's heartbeat is held up by a lock on ``consumers`` for
    three times ``lease_timeout``; when it goes, nobody was dead, so nobody
    is reaped and every lease stays where it is."""
    queue = Queue("stall", Exchange("stall"), routing_key="stall")
    consumers = [make_connection(**FAST) for _ in range(3)]
    for conn in consumers:
        publish(conn, queue, "held")
    held = []
    for conn in consumers:
        message = conn.default_channel.basic_get("stall")
        assert message is not None
        held.append(message)
    assert count_rows(db, schema, "consumer_id IS NOT NULL") == 3

    with psycopg.connect(pg_dsn) as locker:
        with locker.transaction():
            locker.execute(f'LOCK TABLE "{schema}".consumers IN ACCESS EXCLUSIVE MODE')
            time.sleep(3 * FAST["lease_timeout"])
    time.sleep(2 * FAST["lease_timeout"])  # every consumer beats and reaps again

    assert count_rows(db, schema, "consumer_id IS NOT NULL") == 3, "a live consumer was reaped"
    assert count_rows(db, schema, "redelivered") == 0
    alive = db.execute(f'SELECT count(*) FROM "{schema}".consumers').fetchone()
    assert alive == (3,)
    for message in held:
        message.ack()


def test_descriptors_above_1024_are_watched(make_connection: Any, db: Any, schema: str) -> None:
    """select() refuses descriptors above 1024; a consumer in a process with
    many open files must still wake on its notifications."""
    pipes = [os.pipe() for _ in range(600)]  # 1200 descriptors: the next ones are > 1024
    try:
        queue = Queue("many-fds", Exchange("many-fds"), routing_key="many-fds")
        conn = make_connection(**FAST)
        received: list[Any] = []
        with conn, Consumer(conn, [queue], callbacks=[collect(received)]):
            assert conn.transport.listener().wake_fd > 1024
            publish_later = threading.Timer(0.3, publish, (make_connection(), queue, "hello"))
            publish_later.start()
            drain_until(conn, received, 1, timeout=10)
            publish_later.join()
            assert conn.transport.listener().is_alive()
        assert received[0][0] == "hello"
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_resumed_consumer_gives_back_what_it_does_not_hold(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """A claim that committed while its reply was lost leases a message the
    process never saw: on resuming, the table is reconciled with what the
    process holds, and that message goes back at once."""
    queue = Queue("reconcile", Exchange("reconcile"), routing_key="reconcile")
    message, consumer_id = _park_holding_one(make_connection, db, schema, queue)
    with make_connection() as producer:
        publish(producer, queue, "claimed, reply lost")
    db.execute(
        f'UPDATE "{schema}".messages SET consumer_id = %s, leased_at = now()'
        " WHERE consumer_id IS NULL",
        (consumer_id,),
    )
    assert count_rows(db, schema, f"consumer_id = {consumer_id}") == 2
    second = make_connection()
    with second:
        assert second.transport.consumer_id() == consumer_id and second.transport.resumed
        assert second.transport.reconcile([message.delivery_tag]) == 1
        assert count_rows(db, schema, f"consumer_id = {consumer_id}") == 1  # the one held
        assert count_rows(db, schema, "consumer_id IS NULL AND redelivered") == 1
        message.channel = second.default_channel
        message.ack()


def test_a_forked_child_does_not_keep_a_dead_parents_session(
    broker_url: str, db: psycopg.Connection[Any], schema: str
) -> None:
    """A child forked after the LISTEN session exists (a pool child, a
    replaced one) closes its copy of the socket: when the parent is
    SIGKILLed, its session and the lock proving it alive end with it (so its
    messages come back within the lock grace, not after lease_timeout)."""
    holder = start_holder(broker_url, schema, "forked", 0, "heartbeat_interval=0.2", "fork=1")
    line = holder.held_line  # type: ignore[attr-defined]
    assert line.startswith("held 0 child"), line
    child = int(line.split()[-1])
    try:
        row = db.execute(
            f'SELECT id FROM "{schema}".consumers WHERE pid = %s', (holder.pid,)
        ).fetchone()
        assert row is not None
        lock = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s AND objid = %s AND objsubid = 2"
        )
        key = (statements(schema).lock_namespace, row[0])
        assert db.execute(lock, key).fetchone() == (1,)
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 10
        while db.execute(lock, key).fetchone() != (0,) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db.execute(lock, key).fetchone() == (0,), "the child kept the session alive"
    finally:
        stop(holder)
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_deleting_a_queue_reads_no_other_queue(
    connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """Every `celery inspect` deletes its reply queue: with a large backlog
    elsewhere that must be index lookups, never a scan of the table."""
    connection.default_channel.basic_get("celery")  # creates the schema
    db.execute(
        f'INSERT INTO "{schema}".messages (queue, payload)'
        " SELECT 'q' || (i % 50), '{}' FROM generate_series(1, 50000) i"
    )
    db.execute(f'ANALYZE "{schema}".messages')
    statement = statements(schema).delete_queue.replace("%(name)s", "'reply'")
    plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + statement).fetchall())
    assert "Seq Scan on messages" not in plan, plan


def test_a_closed_connection_leaves_the_event_loop(make_connection: Any) -> None:
    """Celery's worker reconnects by dropping the hub's readers and making a
    new connection; it never asks the old transport to leave. Its tick
    callback and polling timer must go with the connection, or they keep
    running (and could claim, starting a consumer nobody serves) for the
    life of the process; and its wake-up pipes, once closed, are never
    touched again (their numbers soon belong to other files)."""
    from kombu.asynchronous import Hub

    hub = Hub()
    try:
        conn = make_connection()
        conn.default_channel.basic_get("loop-q")  # a schema and a channel
        transport = conn.transport
        transport.register_with_event_loop(conn.connection, hub)
        listener = transport.session.current()
        assert transport.delivery._on_tick in hub.on_tick
        timer = transport.delivery._poll_timer
        assert timer is not None and not timer.canceled
        conn.release()
        assert transport.delivery._on_tick not in hub.on_tick
        assert timer.canceled
        assert listener.wake_fd == -1  # closed once, never again
        listener.wake()  # touches nothing
        assert listener.take_notified() == set()
    finally:
        hub.close()
