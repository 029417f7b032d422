"""Conformance suite for the pgnotify kombu transport, against a real PostgreSQL."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_pgnotify.errors import ConfigurationError, InvalidName
from tests.tablestats import report, table_reads


def drain_until(conn: Connection, received: list[Any], count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(received)} of {count} messages")
        try:
            conn.drain_events(timeout=min(left, 1.0))
        except TimeoutError:
            pass


def drain_for(conn: Connection, seconds: float) -> None:
    """Let ``conn`` deliver whatever comes for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            pass


def collect(received: list[Any], ack: bool = True) -> Any:
    def on_message(body: Any, message: Any) -> None:
        received.append((body, message))
        if ack:
            message.ack()

    return on_message


def publish(conn: Any, queue: Queue, *bodies: Any) -> None:
    """Publish each of ``bodies`` to ``queue`` (declared on the way)."""
    producer = Producer(conn)
    for body in bodies:
        producer.publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )


def count_rows(db: psycopg.Connection[Any], schema: str, where: str = "true") -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".messages WHERE {where}').fetchone()
    assert row is not None
    return int(row[0])


# -- basic messaging ---------------------------------------------------------------


def test_publish_consume_and_ack_deletes_the_row(connection, db, schema):
    queue = Queue("basic", Exchange("basic", type="direct"), routing_key="basic")
    received: list[Any] = []
    with connection:
        Producer(connection).publish(
            {"n": 1}, exchange=queue.exchange, routing_key="basic", declare=[queue]
        )
        assert count_rows(db, schema) == 1
        with Consumer(connection, [queue], callbacks=[collect(received)]):
            drain_until(connection, received, 1)
    assert received[0][0] == {"n": 1}
    assert received[0][1].delivery_info["redelivered"] is False
    assert count_rows(db, schema) == 0


def test_drain_events_times_out_when_idle(connection):
    queue = Queue("idle", Exchange("idle"), routing_key="idle")
    with connection, Consumer(connection, [queue], callbacks=[collect([])]):
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 3


def test_message_survives_its_producer_and_a_new_connection_reads_it(make_connection):
    queue = Queue("durable", Exchange("durable"), routing_key="durable")
    with make_connection() as producer_conn:
        Producer(producer_conn).publish(
            "kept", exchange=queue.exchange, routing_key="durable", declare=[queue]
        )
    received: list[Any] = []
    with make_connection() as consumer_conn:
        with Consumer(consumer_conn, [queue], callbacks=[collect(received)]):
            drain_until(consumer_conn, received, 1)
    assert received[0][0] == "kept"


def test_large_body_of_10_mb(connection):
    body = os.urandom(10 * 1024 * 1024)
    queue = Queue("large", Exchange("large"), routing_key="large")
    received: list[Any] = []
    with connection:
        Producer(connection).publish(
            body,
            exchange=queue.exchange,
            routing_key="large",
            declare=[queue],
            serializer=None,
            content_type="application/data",
            content_encoding="binary",
        )
        with Consumer(connection, [queue], callbacks=[collect(received)]):
            drain_until(connection, received, 1, timeout=60)
    assert received[0][1].body == body


def test_notification_wakes_a_blocked_consumer_at_once(make_connection):
    queue = Queue("wake", Exchange("wake"), routing_key="wake")
    received: list[Any] = []
    consumer_conn = make_connection()
    with consumer_conn, Consumer(consumer_conn, [queue], callbacks=[collect(received)]):

        def publish_later() -> None:
            time.sleep(0.5)
            with make_connection() as c:
                Producer(c).publish("now", exchange=queue.exchange, routing_key="wake")

        thread = threading.Thread(target=publish_later)
        thread.start()
        started = time.monotonic()
        consumer_conn.drain_events(timeout=20)
        waited = time.monotonic() - started
        thread.join()
    assert received and received[0][0] == "now"
    # Woken by NOTIFY, long before the 5 s fallback poll.
    assert waited < 4


# -- claims, leases, acks ----------------------------------------------------------


def test_claim_is_batched_up_to_prefetch_and_leased(connection, db, schema):
    queue = Queue("batch", Exchange("batch"), routing_key="batch")
    received: list[Any] = []
    with connection:
        publish(connection, queue, *range(10))
        consumer = Consumer(connection, [queue], callbacks=[collect(received, ack=False)])
        consumer.qos(prefetch_count=4)
        with consumer:
            drain_until(connection, received, 4)
            assert len(received) == 4
            assert count_rows(db, schema, "consumer_id IS NOT NULL") == 4
            assert [b for b, _ in received] == [0, 1, 2, 3]
            for _, message in received:
                message.ack()
            drain_until(connection, received, 8)
            assert count_rows(db, schema) == 6
            assert count_rows(db, schema, "consumer_id IS NOT NULL") == 4


def test_reject_with_requeue_redelivers_with_the_flag(connection):
    queue = Queue("requeue", Exchange("requeue"), routing_key="requeue")
    received: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        received.append(message.delivery_info["redelivered"])
        if len(received) == 1:
            message.requeue()
        else:
            message.ack()

    with connection:
        Producer(connection).publish(
            "x", exchange=queue.exchange, routing_key="requeue", declare=[queue]
        )
        with Consumer(connection, [queue], callbacks=[on_message]):
            drain_until(connection, received, 2)
    assert received == [False, True]


def test_reject_without_requeue_drops(connection, db, schema):
    queue = Queue("drop", Exchange("drop"), routing_key="drop")
    received: list[Any] = []
    with connection:
        Producer(connection).publish(
            "x", exchange=queue.exchange, routing_key="drop", declare=[queue]
        )
        with Consumer(
            connection, [queue], callbacks=[lambda b, m: (received.append(b), m.reject())]
        ):
            drain_until(connection, received, 1)
    assert count_rows(db, schema) == 0


def test_clean_close_returns_unacked_messages_at_once(make_connection, db, schema):
    queue = Queue("close", Exchange("close"), routing_key="close")
    received: list[Any] = []
    first = make_connection()
    with first:
        Producer(first).publish("x", exchange=queue.exchange, routing_key="close", declare=[queue])
        with Consumer(first, [queue], callbacks=[collect(received, ack=False)]):
            drain_until(first, received, 1)
            assert count_rows(db, schema, "consumer_id IS NOT NULL") == 1
    assert count_rows(db, schema, "consumer_id IS NULL AND redelivered") == 1
    again: list[Any] = []
    with make_connection() as second, Consumer(second, [queue], callbacks=[collect(again)]):
        drain_until(second, again, 1)
    assert again[0][1].delivery_info["redelivered"] is True


def test_basic_get_and_queue_length_and_purge(connection):
    queue = Queue("getq", Exchange("getq"), routing_key="getq")
    with connection:
        channel = connection.default_channel
        publish(channel, queue, *range(3))
        bound = queue(channel)
        assert bound.queue_declare(passive=True).message_count == 3
        message = bound.get(no_ack=False)
        assert message.payload == 0
        message.ack()
        message = bound.get(no_ack=True)
        assert message.payload == 1
        assert bound.purge() == 1
        assert bound.get() is None


def test_ack_from_another_thread(connection, db, schema):
    queue = Queue("threads", Exchange("threads"), routing_key="threads")
    received: list[Any] = []
    with connection:
        publish(connection, queue, *range(20))
        with Consumer(connection, [queue], callbacks=[collect(received, ack=False)]):
            drain_until(connection, received, 20)
            threads = [threading.Thread(target=m.ack) for _, m in received]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert count_rows(db, schema) == 0


def test_deferred_acks_leave_with_the_next_claim_or_before_blocking(
    connection, db, schema, monkeypatch
):
    queue = Queue("defer", Exchange("defer"), routing_key="defer")
    received: list[Any] = []
    with connection:
        publish(connection, queue, *range(2))
        consumer = Consumer(
            connection, [queue], callbacks=[collect(received, ack=False)], prefetch_count=1
        )
        with consumer:
            drain_until(connection, received, 1)
            transport = connection.transport
            channel = connection.default_channel
            session = transport.claim_conn()
            statements: list[str] = []
            execute = session.execute

            def spy(query: Any, *args: Any, **kwargs: Any) -> Any:
                statements.append(query)
                return execute(query, *args, **kwargs)

            monkeypatch.setattr(session, "execute", spy)
            with transport.batched_acks(write=False):
                received[0][1].ack()
            assert count_rows(db, schema) == 2  # not written yet
            drain_until(connection, received, 2)  # the claim of the second writes it
            assert channel._writes.claim in statements
            assert channel._writes.ack_many not in statements  # no statement of its own
            assert count_rows(db, schema) == 1
            assert count_rows(db, schema, "consumer_id IS NOT NULL") == 1
            with transport.batched_acks(write=False):
                received[1][1].ack()
            with pytest.raises(TimeoutError):  # nothing to claim: written before blocking
                connection.drain_events(timeout=0.2)
            assert count_rows(db, schema) == 0
    assert [body for body, _ in received] == [0, 1]


@pytest.mark.parametrize("async_acks", [True, False])
def test_only_consumer_writes_skip_the_wal_flush(make_connection, db, schema, async_acks):
    # Claims, acks and requeues set synchronous_commit off for their own
    # transaction; the session (which also publishes) keeps the server's.
    conn = make_connection(async_acks=async_acks)
    with conn:
        channel = conn.default_channel
        queue = Queue("flush", Exchange("flush"), routing_key="flush")(channel)
        queue.declare()
        statements = {
            "claim": (
                channel._writes.claim,
                {
                    "queue": "flush",
                    "limit": 1,
                    "consumer": 0,
                    "max_size": 1,
                    "acks": [],
                    "prefix": channel._stmts.channel_prefix,
                    "fresh": 3.0,
                },
            ),
            "take_no_ack": (channel._writes.take_no_ack, {"queue": "flush", "limit": 1}),
            "ack": (channel._writes.ack, {"id": -1}),
            "ack_many": (channel._writes.ack_many, {"ids": [-1]}),
            "requeue": (
                channel._writes.requeue,
                {"ids": [-1], "consumer": 0, "prefix": channel._stmts.channel_prefix},
            ),
        }
        expected = "off" if async_acks else "on"
        for name, (query, params) in statements.items():
            with db.transaction():
                db.execute(query, params)
                setting = db.execute("SHOW synchronous_commit").fetchone()
                assert setting == (expected,), name
            assert db.execute("SHOW synchronous_commit").fetchone() == ("on",), name
        # Publishing on the transport's own session still waits for the flush.
        Producer(channel).publish("x", exchange="flush", routing_key="flush")
        work = conn.transport.work_conn()
        assert work.execute("SHOW synchronous_commit").fetchone() == ("on",)
        message = queue.get(no_ack=False)
        message.ack()
        assert work.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert count_rows(db, schema) == 0


def test_a_claim_reads_the_ready_index_in_order_and_never_sorts_the_backlog(connection, db, schema):
    # The table was never analysed: the planner's guess alone picks a bitmap
    # scan and a sort of all 10,000 rows for every claim.
    with connection:
        channel = connection.default_channel
        Queue("plan", Exchange("plan"), routing_key="plan")(channel).declare()
        db.execute(
            f'INSERT INTO "{schema}".messages (queue, payload)'
            " SELECT 'plan', json_build_object('body', repeat('x', 900))"
            " FROM generate_series(1, 10000)"
        )
        params = {
            "queue": "plan",
            "limit": 4,
            "consumer": 0,
            "max_size": 1 << 20,
            "acks": [],
            "prefix": "p",
            "fresh": 3.0,
        }
        session = connection.transport.claim_conn()
        for query in (channel._writes.claim, channel._writes.take_no_ack):
            plan = "\n".join(r[0] for r in session.execute("EXPLAIN " + query, params))
            assert "Index Scan using messages_ready" in plan, plan
            assert "Sort" not in plan, plan
        assert len(channel.claim("plan", 4)) == 4


# -- priorities --------------------------------------------------------------------


@pytest.mark.parametrize(("order", "expected"), [("desc", [9, 5, 0]), ("asc", [0, 5, 9])])
def test_priority_order(make_connection, order, expected):
    queue = Queue("prio", Exchange("prio"), routing_key="prio")
    received: list[Any] = []
    conn = make_connection(priority_order=order)
    with conn:
        producer = Producer(conn)
        for p in (5, 0, 9):
            producer.publish(
                p, exchange=queue.exchange, routing_key="prio", declare=[queue], priority=p
            )
        with Consumer(conn, [queue], callbacks=[collect(received)]):
            drain_until(conn, received, 3)
    assert [b for b, _ in received] == expected


# -- exchanges and routing across processes ------------------------------------------


def test_topic_routing_declared_by_another_connection(make_connection):
    exchange = Exchange("events", type="topic")
    queue = Queue("task_events", exchange, routing_key="task.#")
    received: list[Any] = []
    consumer_conn = make_connection()
    with consumer_conn, Consumer(consumer_conn, [queue], callbacks=[collect(received)]):
        # This producer never declared the queue nor the binding.
        with make_connection() as other:
            producer = Producer(other)
            producer.publish("a", exchange="events", routing_key="task.succeeded")
            producer.publish("b", exchange="events", routing_key="worker.heartbeat")
            producer.publish("c", exchange="events", routing_key="task")
        drain_until(consumer_conn, received, 2)
        with pytest.raises(socket.timeout):
            consumer_conn.drain_events(timeout=0.5)
    assert sorted(b for b, _ in received) == ["a", "c"]


def test_fanout_reaches_every_bound_queue(make_connection):
    exchange = Exchange("bcast", type="fanout")
    queues = [Queue(f"bcast_{i}", exchange) for i in range(3)]
    got: list[Any] = []
    conns = [make_connection() for _ in queues]
    consumers = []
    for conn, queue in zip(conns, queues, strict=True):
        consumer = Consumer(conn, [queue], callbacks=[collect(got)])
        consumer.consume()
        consumers.append(consumer)
    with make_connection() as producer_conn:
        Producer(producer_conn).publish("hello", exchange=exchange, routing_key="ignored")
    for conn in conns:
        mine: list[Any] = []
        before = len(got)
        drain_until(conn, got, before + 1)
        mine.extend(got[before:])
        assert mine[0][0] == "hello"
    for consumer in consumers:
        consumer.cancel()


def test_unroutable_message_is_dropped(connection, db, schema):
    with connection:
        connection.default_channel.exchange_declare("nobody", type="direct")
        Producer(connection).publish("lost", exchange="nobody", routing_key="none")
    assert count_rows(db, schema) == 0


# -- expiry ----------------------------------------------------------------------------


def test_message_ttl_and_expiration_are_honoured(connection):
    queue = Queue("ttl", Exchange("ttl"), routing_key="ttl", message_ttl=0.2)
    with connection:
        channel = connection.default_channel
        producer = Producer(channel)
        producer.publish("queue-ttl", exchange=queue.exchange, routing_key="ttl", declare=[queue])
        producer.publish("msg-ttl", exchange=queue.exchange, routing_key="ttl", expiration=0.2)
        time.sleep(0.5)
        bound = queue(channel)
        assert bound.get() is None


def test_queue_expires_and_is_removed_by_the_reaper(make_connection, db, schema):
    queue = Queue("shortlived", Exchange("shortlived"), routing_key="sl", expires=0.5)
    conn = make_connection(heartbeat_interval=0.2, lease_timeout=0.5)
    with conn:
        queue(conn.default_channel).declare()
        watcher = Queue("watcher", Exchange("watcher"), routing_key="w")
        with Consumer(conn, [watcher], callbacks=[collect([])]):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = db.execute(
                    f'SELECT count(*) FROM "{schema}".queues WHERE name = %s', ("shortlived",)
                ).fetchone()
                if row and row[0] == 0:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("expired queue was not removed")


def test_heartbeats_rewrite_no_queue_row_but_an_expiring_ones(make_connection, db, schema):
    """Each heartbeat of each consumer rewrote the row of every queue it
    consumed: while a transaction held vacuum back, every publish to the
    queue walked all those dead versions (16 consumers, 10 minutes: 4,800)."""
    plain = Queue("plain", Exchange("plain"), routing_key="plain")
    expiring = Queue("expiring", Exchange("expiring"), routing_key="expiring", expires=0.5)
    conn = make_connection(heartbeat_interval=0.2, lease_timeout=0.5)

    def versions() -> dict[str, str]:
        rows = db.execute(f'SELECT name, xmin::text FROM "{schema}".queues').fetchall()
        return dict(rows)

    with conn, Consumer(conn, [plain, expiring], callbacks=[collect([])]):
        drain_for(conn, 0.5)  # declared, and heartbeats under way
        before = versions()
        drain_for(conn, 1.5)  # seven heartbeats or so
        after = versions()
    assert after["plain"] == before["plain"]  # never written
    assert after["expiring"] != before["expiring"]  # said it was used


# -- names are data ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "it's; DROP TABLE messages; --",
        'quote"d',
        "ünïcødé-キュー",
        "q" * 200,
    ],
)
def test_hostile_and_long_names_work(connection, name):
    queue = Queue(name, Exchange(name + "x", type="topic"), routing_key=name)
    received: list[Any] = []
    with connection:
        Producer(connection).publish(
            name, exchange=queue.exchange, routing_key=name, declare=[queue]
        )
        with Consumer(connection, [queue], callbacks=[collect(received)]):
            drain_until(connection, received, 1)
    assert received[0][0] == name


def test_name_with_nul_is_refused_clearly(connection):
    with connection, pytest.raises(InvalidName, match="NUL"):
        Queue("bad\x00name")(connection.default_channel).declare()
    with connection, pytest.raises(InvalidName, match="surrogate"):  # no UTF-8 for it
        Queue("bad\ud800name")(connection.default_channel).declare()


def test_bad_option_names_the_setting(broker_url):
    with pytest.raises(ConfigurationError, match="priority_order"):
        Connection(broker_url, transport_options={"priority_order": "up"}).connect()
    with pytest.raises(ConfigurationError, match="schema"):
        Connection(broker_url, transport_options={"schema": "x;y"}).connect()
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        Connection(broker_url, transport_options={"heartbeat_interval": "soon"}).connect()


def test_an_ack_on_a_closed_channel_is_a_connection_error(make_connection, db, schema):
    """Celery acks a message when its task ends, which may be after the
    connection it came on was lost and its channel closed: the ack must fail
    with one of the transport's connection errors, which Celery logs and
    survives (any other error stops the stock worker), and the message is
    back in its queue."""
    import logging

    conn = make_connection()
    queue = Queue("closed-ack", routing_key="closed-ack")
    publish(conn, queue, {"n": 1})
    channel = conn.channel()
    message = channel.basic_get("closed-ack")
    assert message is not None
    channel.close()
    with pytest.raises(conn.connection_errors):
        message.ack()
    message.ack_log_error(logging.getLogger("test"), conn.connection_errors)  # no raise
    conn.release()
    left = db.execute(
        f'SELECT count(*) FROM "{schema}".messages WHERE consumer_id IS NULL'
    ).fetchone()[0]
    assert left == 1


def test_only_a_passive_declare_counts_the_backlog(connection, db, schema):
    """Every worker and producer declares its queues on each connection:
    that must not count a backlog of millions. A passive declare (kombu's
    ``SimpleQueue.qsize()``, the usual "how long is my queue?") does, and
    creates nothing."""
    from kombu.exceptions import ChannelError

    queue = Queue("countq", Exchange("countq"), routing_key="countq")
    with connection:
        channel = connection.default_channel
        publish(channel, queue, *range(3))
        before = _scans(db, schema)
        assert channel.queue_declare("countq", durable=True).message_count == 0
        assert _scans(db, schema) == before  # nothing read from messages
        assert channel.queue_declare("countq", passive=True).message_count == 3
        with pytest.raises(ChannelError) as raised:
            channel.queue_declare("nosuchq", passive=True)
        assert "NOT_FOUND" in str(raised.value)
    assert (
        db.execute(
            f'SELECT count(*) FROM "{schema}".queues WHERE name = %s', ("nosuchq",)
        ).fetchone()[0]
        == 0
    )


def _scans(db: Any, schema: str) -> int:
    """Scans of ``messages`` and its indexes so far (this session's view)."""
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables"
        " WHERE schemaname = %s AND relname = 'messages'",
        (schema,),
    ).fetchone()
    return int(row[0])


def test_a_claiming_session_compiles_none_of_its_statements(connection, schema):
    # Claiming sessions run with sorting off; a statement whose plan still
    # sorts (a requeue orders its queues) is priced out of all reason, and
    # was JIT-compiled at each run (about 1.8 s) until JIT was turned off too.
    from celery_pgnotify.statements import statements

    assert connection.default_channel is not None
    conn = connection.transport.claim_conn()
    stmts = statements(schema)
    params = {"ids": [1], "consumer": 1, "prefix": stmts.channel_prefix}
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + stmts.writes(True).requeue, params))
    assert "Sort" in plan  # the case in point: a sort, disabled
    assert "JIT" not in plan


def test_a_burst_into_a_quiet_queue_leaves_claims_and_acks_on_the_indexes(
    make_connection, db, schema
):
    """A session keeps its statements' plans. Made while ``messages`` was
    empty and vacuumed (a quiet queue), the claim and the ack found a row by
    its id by reading the whole table: once a burst of 200,000 messages
    arrived, every claim and ack read all of them, until the table was next
    analysed (44.8 ms a claim here instead of 1.2 ms)."""
    producer, consumer = make_connection(), make_connection()
    name = f"q{os.urandom(4).hex()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    received: list[Any] = []

    def one_at_a_time(rounds: int) -> None:
        for _ in range(rounds):
            publish(producer.default_channel, queue, len(received))
            drain_until(consumer, received, len(received) + 1)

    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        one_at_a_time(1)
        db.execute(f'VACUUM "{schema}".messages')  # empty, and known to be
        one_at_a_time(12)  # the plans are made and kept: prepared, generic
        db.execute(
            f'INSERT INTO "{schema}".messages (queue, rank, payload)'
            " SELECT 'elsewhere', 0, '{}' FROM generate_series(1, 200000)"
        )
        report(consumer.transport.claim_conn())  # its statistics so far
        before = table_reads(db, schema, "messages")
        one_at_a_time(5)
        report(consumer.transport.claim_conn())
    after = table_reads(db, schema, "messages")
    assert after["idx_scan"] > before["idx_scan"], "no statistics of the claims"
    scans = after["seq_scan"] - before["seq_scan"]
    assert scans == 0, f"5 claims and acks scanned messages {scans} times"
