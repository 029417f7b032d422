"""Leases follow the consumer's liveness, not a fixed timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from kombu import Consumer, Exchange, Queue

from tests.test_transport import collect, count_rows, drain_for, drain_until, publish

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_holder(
    broker_url: str, schema: str, queue: str, count: int, *options: str
) -> subprocess.Popen[str]:
    """A ``tests.hold_messages`` process, once it holds ``count`` messages
    (the line it printed is kept as ``proc.held_line``)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.hold_messages",
            broker_url,
            schema,
            queue,
            str(count),
            *options,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("held"), line
    proc.held_line = line  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_sigkilled_consumer_messages_return_within_10s_with_defaults(
    broker_url, schema, make_connection, db
):
    queue = Queue("killed", Exchange("killed"), routing_key="killed")
    survivor = make_connection()
    received: list[Any] = []
    with survivor:
        publish(survivor, queue, "a", "b")
        holder = start_holder(broker_url, schema, "killed", 2)
        try:
            assert count_rows(db, schema, "consumer_id IS NOT NULL") == 2
            with Consumer(survivor, [queue], callbacks=[collect(received)]):
                # The survivor has been up for a while, as in production.
                drain_for(survivor, 9)
                assert received == []
                holder.send_signal(signal.SIGKILL)
                holder.wait()
                killed_at = time.monotonic()
                drain_until(survivor, received, 2, timeout=15)
                back_after = time.monotonic() - killed_at
        finally:
            stop(holder)
    print(f"\nmessages of a SIGKILLed consumer came back after {back_after:.1f}s")
    assert sorted(b for b, _ in received) == ["a", "b"]
    assert all(m.delivery_info["redelivered"] for _, m in received)
    assert back_after <= 10


def test_live_consumer_keeps_messages_far_beyond_the_lease_timeout(
    broker_url, schema, make_connection, db
):
    fast = ("heartbeat_interval=0.2", "lease_timeout=1")
    queue = Queue("longtask", Exchange("longtask"), routing_key="longtask")
    watcher = make_connection(heartbeat_interval=0.2, lease_timeout=1)
    received: list[Any] = []
    with watcher:
        publish(watcher, queue, "long")
        holder = start_holder(broker_url, schema, "longtask", 1, *fast)
        try:
            with Consumer(watcher, [queue], callbacks=[collect(received)]):
                deadline = time.monotonic() + 5  # five lease timeouts
                while time.monotonic() < deadline:
                    try:
                        watcher.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass
            assert received == []
            assert count_rows(db, schema, "consumer_id IS NOT NULL") == 1
        finally:
            stop(holder)


def test_silent_consumer_is_declared_dead_after_lease_timeout(
    pg_dsn, broker_url, schema, make_connection, db
):
    """A consumer that holds its lock but stops heartbeating (a hung host)."""
    queue = Queue("hung", Exchange("hung"), routing_key="hung")
    watcher = make_connection(heartbeat_interval=0.2, lease_timeout=1)
    received: list[Any] = []
    with watcher:
        publish(watcher, queue, "x")
        holder = start_holder(
            broker_url, schema, "hung", 1, "heartbeat_interval=0.2", "lease_timeout=1"
        )
        try:
            holder.send_signal(signal.SIGSTOP)  # alive, session open, silent
            with Consumer(watcher, [queue], callbacks=[collect(received)]):
                drain_until(watcher, received, 1, timeout=10)
        finally:
            stop(holder)
    assert received[0][1].delivery_info["redelivered"] is True


def test_listener_survives_pg_terminate_backend(make_connection, db, schema):
    queue = Queue("term", Exchange("term"), routing_key="term")
    conn = make_connection()
    received: list[Any] = []
    with conn, Consumer(conn, [queue], callbacks=[collect(received)]):
        with pytest_raises_timeout():
            conn.drain_events(timeout=0.2)
        killed = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'celery-pgnotify-listener' AND datname = current_database()"
        ).fetchall()
        assert killed
        time.sleep(0.5)
        with make_connection() as other:
            publish(other, queue, "after")
        drain_until(conn, received, 1, timeout=10)
    assert received[0][0] == "after"


def _park_holding_one(make_connection: Any, db: Any, schema: str, queue: Queue) -> tuple[Any, int]:
    """A consumer holding one unacked message whose connection is then lost
    (parked); returns that message and the consumer's id."""
    first = make_connection()
    received: list[Any] = []
    publish(first, queue, "held")
    consumer = Consumer(first, [queue], callbacks=[collect(received, ack=False)])
    consumer.__enter__()
    drain_until(first, received, 1)
    consumer_id = first.transport.consumer_id()
    first.transport.park()
    first.release()  # as after a lost connection: closed, the lease kept
    assert count_rows(db, schema, f"consumer_id = {consumer_id}") == 1
    return received[0][1], consumer_id


def test_a_lost_connections_consumer_is_taken_over_with_its_leases(make_connection, db, schema):
    queue = Queue("park", Exchange("park"), routing_key="park")
    message, consumer_id = _park_holding_one(make_connection, db, schema, queue)
    second = make_connection()
    with second, Consumer(second, [queue], callbacks=[collect([])]):
        assert second.transport.consumer_id() == consumer_id
        assert second.transport.resumed
        assert count_rows(db, schema, f"consumer_id = {consumer_id}") == 1  # still ours
        message.channel = second.default_channel
        message.ack()
    assert count_rows(db, schema) == 0


def test_a_failed_takeover_keeps_the_parked_consumer_for_the_next_try(
    make_connection, db, pg_dsn, schema
):
    """The next connection's LISTEN session cannot start (here: the
    consumers table is locked past lock_timeout). The parked consumer and its
    lease are kept, neither released nor forgotten: the retry takes it over."""
    queue = Queue("retake", Exchange("retake"), routing_key="retake")
    _, consumer_id = _park_holding_one(make_connection, db, schema, queue)
    second = make_connection()
    with second:
        second.connect()
        with psycopg.connect(pg_dsn) as locker:
            locker.execute(f'LOCK TABLE "{schema}".consumers IN ACCESS EXCLUSIVE MODE')
            with pytest.raises(psycopg.errors.LockNotAvailable):
                second.transport.consumer_id()
            locker.rollback()
        assert count_rows(db, schema, f"consumer_id = {consumer_id}") == 1
        assert second.transport.consumer_id() == consumer_id
        assert second.transport.resumed


def test_a_parked_consumer_reaped_meanwhile_starts_afresh(make_connection, db, schema):
    queue = Queue("reaped", Exchange("reaped"), routing_key="reaped")
    _, consumer_id = _park_holding_one(make_connection, db, schema, queue)
    # What the reaper does to a consumer gone too long: row deleted, leases freed.
    db.execute(
        f'WITH gone AS (DELETE FROM "{schema}".consumers WHERE id = %s)'
        f' UPDATE "{schema}".messages SET consumer_id = NULL, redelivered = true',
        (consumer_id,),
    )
    received: list[Any] = []
    second = make_connection()
    with second, Consumer(second, [queue], callbacks=[collect(received)]):
        drain_until(second, received, 1)
        assert not second.transport.resumed
    assert received[0][1].delivery_info["redelivered"] is True
    assert count_rows(db, schema) == 0


def test_lost_notification_is_caught_by_the_fallback_poll(make_connection, db, schema):
    queue = Queue("poll", Exchange("poll"), routing_key="poll")
    conn = make_connection(polling_interval=0.5)
    received: list[Any] = []
    with conn, Consumer(conn, [queue], callbacks=[collect(received)]):
        with pytest_raises_timeout():
            conn.drain_events(timeout=0.2)
        # A row written without NOTIFY: only the fallback poll can find it.
        payload = (
            '{"body":"InBvbGwi","content-encoding":"utf-8",'
            '"content-type":"application/json","headers":{},'
            '"properties":{"body_encoding":"base64","delivery_info":'
            '{"exchange":"poll","routing_key":"poll"},"priority":0}}'
        )
        db.execute(
            f'INSERT INTO "{schema}".messages (queue, payload) VALUES (%s, %s)', ("poll", payload)
        )
        drain_until(conn, received, 1, timeout=5)
    assert received[0][0] == "poll"


def test_forked_child_does_not_break_the_parents_connection(make_connection):
    queue = Queue("fork", Exchange("fork"), routing_key="fork")
    conn = make_connection()
    received: list[Any] = []
    with conn, Consumer(conn, [queue], callbacks=[collect(received)]):
        publish(conn, queue, "before")
        drain_until(conn, received, 1)
        pid = os.fork()
        if pid == 0:  # child: drop and close everything inherited, as Celery does
            try:
                conn.collect()
                conn.release()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        publish(conn, queue, "after")
        drain_until(conn, received, 2)
    assert [b for b, _ in received] == ["before", "after"]


def test_concurrent_migrations_are_safe(pg_dsn, schema):
    import threading

    from celery_pgnotify import migrations

    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                migrations.migrate(conn, schema)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_dsn) as conn:
        assert migrations.schema_version(conn, schema) == migrations.LATEST_VERSION


class pytest_raises_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        assert exc_type is socket.timeout, exc_type
        return True


def test_leases_of_a_consumer_deleted_by_hand_come_back(make_connection, db, schema):
    """Leases whose consumer row is gone (deleted by an operator, with its
    process) are found by the orphan search within a few reaps."""
    queue = Queue("orphaned", Exchange("orphaned"), routing_key="orphaned")
    conn = make_connection(heartbeat_interval=0.2, lease_timeout=1)
    received: list[Any] = []
    with conn:
        publish(conn, queue, "a", "b")
        db.execute(
            f'UPDATE "{schema}".messages SET consumer_id = 987654,'
            " leased_at = now() - interval '10 seconds'"
        )
        with Consumer(conn, [queue], callbacks=[collect(received)]):
            drain_until(conn, received, 2, timeout=6)
    assert sorted(b for b, _ in received) == ["a", "b"]
    assert all(m.delivery_info["redelivered"] for _, m in received)


def test_a_consumer_reaped_while_it_lived_takes_nothing_until_it_comes_back(
    make_connection, db, schema
):
    """Reaped behind a partition or a freeze, a consumer may claim before its
    heartbeat tells it so. It must take nothing under its dead id: whatever
    it took, its coming back would give to another consumer too."""
    queue = Queue("reaped", Exchange("reaped"), routing_key="reaped")
    # With its row gone no publish notifies it: its fallback re-read claims.
    conn = make_connection(heartbeat_interval=2, lease_timeout=10, polling_interval=0.1)
    received: list[Any] = []
    with conn, Consumer(conn, [queue], callbacks=[collect(received)]):
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.2)  # registered, listening
        consumers = f'"{schema}".consumers'
        (cid, beat) = db.execute(f"SELECT id, heartbeat_at FROM {consumers}").fetchone()
        deadline = time.monotonic() + 5
        while db.execute(f"SELECT heartbeat_at FROM {consumers}").fetchone()[0] == beat:
            assert time.monotonic() < deadline
            time.sleep(0.01)  # a heartbeat just went: the next is 2 s away
        db.execute(f"DELETE FROM {consumers} WHERE id = %s", (cid,))  # as a reaper does
        publish(conn, queue, "a")
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.6)
        assert received == []
        row = db.execute(f'SELECT consumer_id FROM "{schema}".messages').fetchone()
        assert row == (None,)  # still ready: taken by nobody
    # Closed without having taken it: another consumer gets it, once.
    conn2 = make_connection(heartbeat_interval=2, lease_timeout=10)
    with conn2, Consumer(conn2, [queue], callbacks=[collect(received)]):
        drain_until(conn2, received, 1, timeout=10)
    assert [body for body, _ in received] == ["a"]
