"""A publish wakes one consumer that has room, not every consumer of the queue."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_pgnotify import ops
from celery_pgnotify.statements import statements
from celery_pgnotify.transport import Channel

QUEUE = Queue("wq", Exchange("wq"), routing_key="wq")


class Fleet:
    """``n`` consumers of ``wq``, each a connection of its own draining on a
    thread; records who received what, and every claim made on ``wq``."""

    def __init__(
        self,
        make_connection: Callable[..., Connection],
        n: int,
        prefetch: int,
        claims: Counter[int],
    ) -> None:
        self.received: list[tuple[int, Any]] = []
        self.claims = claims
        self.held = [threading.Event() for _ in range(n)]  # set: that one's loop is held up
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.conns = [make_connection(polling_interval=60) for _ in range(n)]
        for i, conn in enumerate(self.conns):
            consumer = Consumer(
                conn.channel(), [QUEUE], callbacks=[self._on_message(i)], accept=["json"]
            )
            consumer.qos(prefetch_count=prefetch)
            consumer.consume()
            thread = threading.Thread(target=self._drain, args=(conn, i), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _on_message(self, i: int) -> Callable[[Any, Any], None]:
        def on_message(body: Any, message: Any) -> None:
            self.received.append((i, body))
            message.ack()

        return on_message

    def _drain(self, conn: Connection, i: int) -> None:
        while not self._stop.is_set():
            if self.held[i].is_set():
                time.sleep(0.01)
                continue
            try:
                conn.drain_events(timeout=0.1)
            except TimeoutError:
                pass

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.received) >= count, f"got {len(self.received)} of {count}"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def fleet(make_connection: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []
    claims: Counter[int] = Counter()
    claim = Channel.claim

    def counted(self: Channel, queue: str, limit: int) -> list[dict[str, Any]]:
        if queue == "wq":
            claims[id(self)] += 1
        return claim(self, queue, limit)

    monkeypatch.setattr(Channel, "claim", counted)

    def make(n: int, prefetch: int = 4) -> Fleet:
        made.append(Fleet(make_connection, n, prefetch, claims))
        return made[-1]

    yield make
    for f in made:
        f.stop()


def _hungry(db: psycopg.Connection[Any], schema: str, n: int) -> None:
    """Wait until ``n`` consumers of wq have claimed and found it empty."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = db.execute(
            f"SELECT count(*) FROM \"{schema}\".consumers WHERE hungry AND 'wq' = ANY(queues)"
        ).fetchone()
        if row and row[0] >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} consumers became hungry")


def test_a_publish_wakes_one_consumer_and_they_take_turns(
    fleet: Callable[..., Fleet], connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    consumers = fleet(4)
    _hungry(db, schema, 4)
    consumers.claims.clear()
    producer = Producer(connection.channel())
    for n in range(12):
        producer.publish(n, exchange=QUEUE.exchange, routing_key="wq", declare=[QUEUE])
        consumers.wait_for(n + 1, 10)
        time.sleep(0.03)
    claims = sum(consumers.claims.values())
    # Woken all at once, four consumers would make 48 claims.
    assert claims <= 18, consumers.claims
    by_consumer = Counter(i for i, _ in consumers.received)
    assert len(by_consumer) == 4 and min(by_consumer.values()) >= 2, by_consumer
    # celery-pg status shows who has room and when each was last fed.
    shown = ops.status(db, statements(schema))["consumers"]
    assert len(shown) == 4 and all(c["hungry"] for c in shown), shown
    assert all(0 <= c["last_fed_s"] < 60 for c in shown), shown


def test_a_consumer_silent_for_a_while_is_not_woken_alone(
    fleet: Callable[..., Fleet],
    connection: Connection,
    db: psycopg.Connection[Any],
    schema: str,
) -> None:
    """A consumer whose heartbeat is late may be gone: the publish wakes a
    live one, not a message-less wait for the fallback re-read."""
    consumers = fleet(1)
    _hungry(db, schema, 1)
    # A ghost: hungry, fed longest ago, its session lock held (so it is not
    # reaped yet), its heartbeat 5 s old.
    ghost = db.execute(
        f'INSERT INTO "{schema}".consumers (hostname, pid, queues, hungry, fed_at, heartbeat_at)'
        " VALUES ('ghost', 1, '{wq}', true, now() - interval '1 day', now() - interval '5 s')"
        " RETURNING id"
    ).fetchone()
    assert ghost is not None
    lock = statements(schema).lock_namespace
    db.execute("SELECT pg_advisory_lock(%s, %s)", (lock, ghost[0]))
    try:
        Producer(connection.channel()).publish(
            {"for": "the living"}, exchange=QUEUE.exchange, routing_key="wq", declare=[QUEUE]
        )
        consumers.wait_for(1, 2.5)
    finally:
        db.execute("SELECT pg_advisory_unlock(%s, %s)", (lock, ghost[0]))


def test_a_group_wakes_as_many_consumers_as_it_has_messages(
    fleet: Callable[..., Fleet], broker_url: str, schema: str, db: psycopg.Connection[Any]
) -> None:
    from celery import Celery, group

    consumers = fleet(3, prefetch=1)
    _hungry(db, schema, 3)
    app = Celery("wakes", broker=broker_url)
    app.conf.broker_transport_options = {"schema": schema}
    try:
        with app.connection_for_write() as conn:
            producer = Producer(conn.channel())
            g = group(app.signature("tests.noop", queue=QUEUE) for _ in range(6))
            g.apply_async(producer=producer)
        consumers.wait_for(6, 10)
    finally:
        app.close()
    assert len({i for i, _ in consumers.received}) >= 2


def test_a_consumer_whose_loop_is_held_up_steps_aside(
    fleet: Callable[..., Fleet], connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    """Its loop running a long task (-P solo), a consumer still looks hungry:
    it passes on what it cannot take, and the others are woken instead."""
    consumers = fleet(2)
    _hungry(db, schema, 2)
    consumers.held[0].set()
    time.sleep(0.2)  # out of its last drain
    held = consumers.conns[0].transport.consumer_id()
    # The two take turns: of three publishes, the held one is chosen once at least.
    producer = Producer(connection.channel())
    for n in range(3):
        producer.publish(n, exchange=QUEUE.exchange, routing_key="wq", declare=[QUEUE])
        consumers.wait_for(n + 1, 3)
    assert {i for i, _ in consumers.received} == {1}
    hungry = db.execute(
        f'SELECT hungry FROM "{schema}".consumers WHERE id = %s', (held,)
    ).fetchone()
    assert hungry == (False,)


def test_a_claim_that_gets_messages_leaves_when_it_was_fed_to_the_heartbeat(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """Every row version a claim writes stays while vacuum is held back, and
    every publish reads them all to choose whom to wake: a claim that got
    messages wrote when its consumer was last fed, once a second. That goes
    with the heartbeat now, which writes the row anyway; a claim writes the
    row only when its room changes (or when a wake-up it did not take in
    time made its listener step aside, which a loaded machine can cause)."""
    name = f"fed{time.monotonic_ns()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    # No heartbeat while the test runs (the first is at registration).
    quiet = make_connection(heartbeat_interval=10.0, lease_timeout=20.0, broker_eta_threshold=25.0)
    producer = make_connection()
    received: list[Any] = []

    def fed_at() -> Any:
        got = db.execute(f'SELECT fed_at FROM "{schema}".consumers').fetchone()
        assert got is not None
        return got[0]

    def on_message(body: Any, message: Any) -> None:
        received.append(body)
        message.ack()

    with Consumer(quiet.default_channel, [queue], callbacks=[on_message]):
        for n in range(4):
            Producer(producer.default_channel).publish(
                n, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
            deadline = time.monotonic() + 10
            while len(received) <= n and time.monotonic() < deadline:
                try:
                    quiet.drain_events(timeout=1)
                except TimeoutError:
                    pass
            if n == 0:
                first = fed_at()
            time.sleep(1.1)  # the claims wrote it once a second
        last = fed_at()
    assert received == [0, 1, 2, 3]
    assert last == first


def test_the_heartbeat_says_when_the_consumer_was_last_fed(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    name = f"fed{time.monotonic_ns()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    consumer = make_connection(heartbeat_interval=0.2, lease_timeout=1.0)
    with Consumer(consumer.default_channel, [queue], callbacks=[lambda b, m: m.ack()]):
        time.sleep(1.5)  # registered (fed_at starts there) well before the message
        Producer(consumer.default_channel).publish(
            1, exchange=queue.exchange, routing_key=name, declare=[queue]
        )
        deadline = time.monotonic() + 10
        fed = None
        while fed is None and time.monotonic() < deadline:
            try:
                consumer.drain_events(timeout=0.2)
            except TimeoutError:
                pass
            got = db.execute(
                "SELECT extract(epoch FROM now() - fed_at), extract(epoch FROM now() - started_at)"
                f' FROM "{schema}".consumers'
            ).fetchone()
            if got is not None and float(got[0]) < float(got[1]) - 1.0:
                fed = float(got[0])
    assert fed is not None and fed < 1.0


def test_a_transactional_enqueue_wakes_a_consumer_that_came_during_its_transaction(
    broker_url: str, pg_dsn: str, schema: str, make_connection: Any
) -> None:
    """A publish judges as its statement runs whether any consumer reads the
    queue. Inside ``enqueue_in`` it commits later: a consumer that came in
    between had looked at its queues already, was not notified, and took the
    task only at its fallback re-read (here 120 s; 5 s by default)."""
    from celery import Celery

    from celery_pgnotify import enqueue_in
    from tests.test_transport import collect, drain_for, drain_until
    from tests.workers import close_app

    name = f"tx{time.monotonic_ns()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    app = Celery("tx", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema, "polling_interval": 120.0}
    consumer = make_connection(polling_interval=120.0)
    received: list[Any] = []
    user = psycopg.connect(pg_dsn)  # its transaction stays open until commit()
    try:
        with app.connection_for_write() as conn:
            queue(conn.default_channel).declare()  # the schema and the queue exist
        with enqueue_in(user):
            app.send_task("t.noop", exchange=name, routing_key=name)  # no consumer yet
        with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
            drain_for(consumer, 1)  # registered, and it has looked at its queues
            assert received == []  # not committed yet
            user.commit()
            drain_until(consumer, received, 1, timeout=10)  # within 10 s of the commit
    finally:
        user.close()
        close_app(app)
    assert len(received) == 1


def test_a_publish_whose_commit_is_held_up_reaches_a_consumer_that_came_meanwhile(
    make_connection: Any, db: psycopg.Connection[Any], pg_dsn: str, schema: str
) -> None:
    """A publish judges as its statement runs whether any consumer reads its
    queue. One that judged "nobody" just before a consumer came, and whose
    commit was then held up (a slow WAL flush) past the consumer's first look
    at its queues, notified nobody: the task waited for the fallback re-read
    (here 120 s; 5 s by default). The consumer looks again a moment later."""
    from tests.test_transport import collect, drain_for, drain_until

    name = f"held{time.monotonic_ns()}"
    queue = Queue(name, Exchange(name), routing_key=name)
    with make_connection() as producer:
        channel = producer.default_channel
        Producer(channel).publish({"n": 1}, declare=[queue], routing_key=name, exchange=name)
        publishes = channel._publishes
    # The stored message, to be published again by hand with its commit held.
    row = db.execute(
        f'DELETE FROM "{schema}".messages WHERE queue = %s RETURNING payload', (name,)
    ).fetchone()
    assert row is not None
    params = {
        "queue": name,
        "rank": 0,
        "payload": row[0],
        "ttl": None,
        "prefix": statements(schema).channel_prefix,
        "fresh": 3.0,
        "task_id": None,
        "wake_all": False,  # a plain publish, whose statement and commit are one
    }
    consumer = make_connection(polling_interval=120.0)
    received: list[Any] = []
    slow = psycopg.connect(pg_dsn)
    try:
        slow.execute(publishes.publish_direct, params)  # no consumer yet: no NOTIFY
        with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
            drain_for(consumer, 0.3)  # registered, and it has looked at its queues
            assert received == []  # not committed yet
            slow.commit()  # the commit, held up till now
            drain_until(consumer, received, 1, timeout=5)  # within 5 s of the commit
    finally:
        slow.close()
    assert len(received) == 1
