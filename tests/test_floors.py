"""The queues' floors (floors.py): they rise as queues drain, and no message
that is, or becomes, ready is ever left below one: requeued, released by the
reaper, or published by a transaction that commits late."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Producer, Queue

from celery_pgnotify.floors import FloorRaiser
from celery_pgnotify.statements import statements
from tests.test_transport import collect, drain_for, drain_until


@pytest.fixture
def transport_options(schema: str) -> dict[str, Any]:
    # Heartbeats (and so reaps and raises) every 0.3 s.
    return {"schema": schema, "heartbeat_interval": 0.3}


def floor_of(db: psycopg.Connection[Any], schema: str, queue: str) -> int:
    row = db.execute(
        f'SELECT floor FROM "{schema}".queue_floors WHERE queue = %s', (queue,)
    ).fetchone()
    return int(row[0]) if row else 0


def ids_of(db: psycopg.Connection[Any], schema: str, queue: str) -> list[int]:
    rows = db.execute(
        f'SELECT id FROM "{schema}".messages WHERE queue = %s ORDER BY id', (queue,)
    ).fetchall()
    return [int(r[0]) for r in rows]


def wait_for(condition: Any, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def publish(conn: Connection, queue: Queue, *bodies: Any) -> None:
    producer = Producer(conn.default_channel)
    for body in bodies:
        producer.publish(body, routing_key=queue.name, declare=[queue])


def test_the_floor_rises_as_a_queue_drains_and_new_messages_are_above_it(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    producer, consumer = make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    publish(producer, queue, *range(20))
    received: list[Any] = []
    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        drain_until(consumer, received, 20)
        last = max(m.delivery_tag for _b, m in received)
        assert wait_for(lambda: (drain_for(consumer, 0.2), floor_of(db, schema, queue.name))[1] > 0)
        publish(producer, queue, "after")
        drain_until(consumer, received, 21)
    assert received[-1][0] == "after"
    assert floor_of(db, schema, queue.name) <= int(last) + 1 + 1  # never past an id not acked


@contextlib.contextmanager
def held_below_the_floor(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> Iterator[tuple[Queue, list[Any], int, Connection, list[Any]]]:
    """A message leased by a holder while ten more are consumed by another
    consumer, until the queue's floor has risen past it. Yields the queue,
    the holder's message, its id, the other consumer and what it received."""
    producer, holder, other = make_connection(), make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    publish(producer, queue, "held")
    held: list[Any] = []
    with Consumer(holder.default_channel, [queue], callbacks=[collect(held, ack=False)]):
        drain_until(holder, held, 1)
        (held_id,) = ids_of(db, schema, queue.name)
        # The queue moves on: the floor rises past the message held (leased, not ready).
        publish(producer, queue, *range(10))
        received: list[Any] = []
        with Consumer(other.default_channel, [queue], callbacks=[collect(received)]):
            drain_until(other, received, 10)
            assert wait_for(
                lambda: (drain_for(other, 0.2), floor_of(db, schema, queue.name))[1] > held_id
            ), "the floor never rose past the leased message"
            yield queue, held, held_id, other, received


def test_a_message_requeued_below_the_floor_is_delivered_again(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    with held_below_the_floor(make_connection, db, schema) as (_, held, _, other, received):
        held[0][1].reject(requeue=True)  # ready again, below the floor
        drain_until(other, received, 11)
    assert received[-1][0] == "held"


_KILLED = """
import os, sys
from kombu import Connection, Consumer, Queue
conn = Connection(sys.argv[1], transport_options={"schema": sys.argv[2], "heartbeat_interval": 0.3})
got = []
with Consumer(conn.default_channel, [Queue(sys.argv[3])], callbacks=[lambda b, m: got.append(m)]):
    while not got:
        conn.drain_events(timeout=10)
    print("holding", flush=True)
    sys.stdin.readline()
os.kill(os.getpid(), 9)
"""


def test_a_message_the_reaper_releases_below_the_floor_is_delivered(
    make_connection: Any, broker_url: str, db: psycopg.Connection[Any], schema: str
) -> None:
    producer, other = make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    publish(producer, queue, "held")
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED, broker_url, schema, queue.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as killed:
        assert killed.stdout is not None and killed.stdout.readline() == "holding\n"
        (held_id,) = ids_of(db, schema, queue.name)
        publish(producer, queue, *range(10))
        received: list[Any] = []
        with Consumer(other.default_channel, [queue], callbacks=[collect(received)]):
            drain_until(other, received, 10)
            assert wait_for(
                lambda: (drain_for(other, 0.2), floor_of(db, schema, queue.name))[1] > held_id
            )
            assert killed.stdin is not None
            killed.stdin.write("\n")
            killed.stdin.flush()
            assert killed.wait(timeout=30) == -9
            drain_until(other, received, 11, timeout=30)  # released by the reaper
    assert received[-1][0] == "held"


def test_a_publish_that_commits_late_is_never_left_below_the_floor(
    make_connection: Any, pg_dsn: str, db: psycopg.Connection[Any], schema: str
) -> None:
    producer, consumer = make_connection(), make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    publish(producer, queue, "first")  # creates the schema and the queue
    received: list[Any] = []
    with Consumer(consumer.default_channel, [queue], callbacks=[collect(received)]):
        drain_until(consumer, received, 1)
        assert wait_for(
            lambda: (drain_for(consumer, 0.2), floor_of(db, schema, queue.name))[1] > 0
        ), "the floor never rose"
        with psycopg.connect(pg_dsn) as late:  # a transaction: its id is taken now
            row = late.execute(
                f'SELECT "{schema}".send_task(%s, queue => %s)', ("t.late", queue.name)
            ).fetchone()
            assert row is not None
            task_id = str(row[0])
            late_id = ids_of(late, schema, queue.name)[-1]
            # Later messages published and consumed meanwhile: the floor may
            # rise to them only once the late transaction has ended.
            for round_ in range(3):
                publish(producer, queue, *[f"r{round_}-{i}" for i in range(5)])
                drain_until(consumer, received, 1 + 5 * (round_ + 1))
                drain_for(consumer, 1.0)  # several raises
            assert floor_of(db, schema, queue.name) <= late_id
            late.commit()  # notifies the queue's consumers
        drain_until(consumer, received, 17, timeout=15)
        assert received[-1][1].headers["id"] == task_id
        # And once it has ended, the floors rise past it.
        assert wait_for(
            lambda: (drain_for(consumer, 0.2), floor_of(db, schema, queue.name))[1] > late_id
        )


def test_a_message_made_ready_below_the_floor_by_an_older_worker_is_found(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    with held_below_the_floor(make_connection, db, schema) as (queue, _, held_id, other, received):
        # A worker older than the floors registers as it did (no floors
        # column: false), and requeues as it did: no floor lowered.
        row = db.execute(
            f'INSERT INTO "{schema}".consumers (hostname, pid, queues)'
            " VALUES ('older', 1, ARRAY[%s]) RETURNING id",
            (queue.name,),
        ).fetchone()
        assert row is not None
        older = row[0]
        db.execute(
            f'UPDATE "{schema}".messages SET consumer_id = NULL, leased_at = NULL,'
            " redelivered = true WHERE id = %s",
            (held_id,),
        )
        db.execute(f'NOTIFY "{statements(schema).channel(queue.name)}"')

        def found() -> bool:  # the older worker stays alive meanwhile
            db.execute(
                f'UPDATE "{schema}".consumers SET heartbeat_at = now() WHERE id = %s',
                (older,),
            )
            drain_for(other, 0.2)
            return len(received) == 11

        assert wait_for(found, timeout=30), "never found below the floor"
    assert received[-1][0] == "held"


def test_a_fleet_raises_the_floors_about_once_per_heartbeat_whatever_its_size(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """Each consumer reaps after every heartbeat; were each to raise the
    floors then too, every raise probing each queue's index, a fleet of idle
    consumers would cost the database more per task the larger it is."""
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    fleet = [make_connection() for _ in range(8)]
    publish(fleet[0], queue, "first")
    consumers = [Consumer(conn, [queue], callbacks=[collect([])]) for conn in fleet]
    for consumer in consumers:
        consumer.consume()
        time.sleep(0.3 / 8)  # their heartbeats spread over the interval, as in a fleet
    rounds = (
        "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables"
        f" WHERE relid = '\"{schema}\".floor_mark'::regclass"
    )
    try:
        assert wait_for(
            lambda: db.execute(f'SELECT count(*) FROM "{schema}".consumers').fetchone() == (8,)
        )
        time.sleep(3)  # 10 heartbeats of 8 consumers: 80 reaps
    finally:
        for consumer in consumers:
            consumer.cancel()
        for conn in fleet:
            conn.close()  # their sessions end: their statistics reach the server
    assert wait_for(
        lambda: (
            db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'celery-pgnotify%%'"
            ).fetchone()
            == (0,)
        )
    )
    db.execute("SELECT pg_stat_clear_snapshot()")
    done = db.execute(rounds).fetchone()
    # About 10 (one per heartbeat), plus each consumer's first round, taken
    # before it knew the fleet; one per reap would be about 80.
    assert done is not None and 1 <= done[0] <= 40, done


def test_taking_turns_leaves_the_applications_random_state_alone(
    make_connection: Any, db: psycopg.Connection[Any], schema: str
) -> None:
    """The module-level generator is the application's: a test seeds it,
    Hypothesis watches it. The raiser's turns must not draw from it."""
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    conn = make_connection()
    before = random.getstate()
    with conn, Consumer(conn, [queue], callbacks=[collect([])]):
        rows = f'SELECT count(*) FROM "{schema}".floor_mark'
        assert wait_for(lambda: db.execute(rows).fetchone() == (1,))  # a raise went
        time.sleep(1)  # three more heartbeats, reaps and turns
    assert random.getstate() == before


def test_a_raiser_stalled_inside_its_round_holds_no_requeue_up_for_long(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, pg_dsn: str
) -> None:
    """The raiser holds every floor row, which every requeue writes. A raiser
    whose process stalls in the middle of its round (frozen, swapped out)
    must not stall the fleet's requeues for as long as it does."""
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    publish(make_connection(), queue, "one")  # the schema and the queue
    db.execute(
        f'INSERT INTO "{schema}".consumers (hostname, pid, queues, floors)'
        " VALUES ('stalled', 1, ARRAY[%s], true)",
        (queue.name,),
    )
    stmts = statements(schema)

    class Stalling:
        """The raiser's connection, its process stalling once it holds the rows."""

        def __init__(self, conn: psycopg.Connection[Any]) -> None:
            self.conn = conn
            self.holding = threading.Event()

        def transaction(self) -> Any:
            return self.conn.transaction()

        def execute(self, query: str, params: Any = None) -> Any:
            cursor = self.conn.execute(query, params)
            if query == stmts.floors_hold:
                cursor.fetchall()
                self.holding.set()
                time.sleep(8)
            return cursor

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        stalling = Stalling(conn)

        def run() -> None:
            # The round is lost (logged), or the lost session raised: either way it ends.
            with contextlib.suppress(psycopg.OperationalError):
                FloorRaiser(stmts, idle_timeout=0.5).raise_floors(stalling)  # type: ignore[arg-type]

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert stalling.holding.wait(10)
            started = time.monotonic()
            # What every requeue does to its queue's floor (fragments.lower_floors).
            db.execute(
                f'INSERT INTO "{schema}".queue_floors AS f (queue, floor) VALUES (%s, 0)'
                " ON CONFLICT (queue) DO UPDATE SET floor = LEAST(f.floor, 0)",
                (queue.name,),
            )
            waited = time.monotonic() - started
        finally:
            thread.join(15)
        ended = conn.closed or conn.broken
    assert waited < 4, f"a requeue waited {waited:.1f} s on a stalled raiser"
    assert ended, "the stalled raiser's session should have been ended"
