"""``celery-pg explain TASK_ID``: one test per answer it gives, each state
reached the way it is in production (a worker's claim, a reject, a revoke,
a stored result, a consumer process killed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from celery import Celery, states
from click.testing import CliRunner
from kombu import Connection, Consumer, Producer, Queue

from celery_pgnotify import ops
from celery_pgnotify.cli import main
from celery_pgnotify.explain import explain
from celery_pgnotify.statements import statements
from tests.test_scheduled import task
from tests.test_transport import collect, drain_until
from tests.workers import close_app


@pytest.fixture
def queue() -> Queue:
    return Queue(f"q{uuid.uuid4().hex[:8]}", max_priority=9)


@pytest.fixture
def app(broker_url: str, schema: str) -> Iterator[Celery]:
    app = Celery("explained", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.result_backend_transport_options = {"schema": schema}
    yield app
    close_app(app)


def answer(db: psycopg.Connection[Any], schema: str, task_id: str) -> dict[str, Any]:
    return explain(db, statements(schema), task_id)


def leased(conn: Connection, queue: Queue) -> list[Any]:
    """Claim what ``queue`` holds, without acking."""
    received: list[Any] = []
    consumer = Consumer(conn.default_channel, [queue], callbacks=[collect(received, ack=False)])
    consumer.consume()
    drain_until(conn, received, 1)
    return received


def test_waiting_counts_the_tasks_ahead_in_claim_order(
    connection: Connection, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    task(connection, queue, None, priority=5)  # ahead: higher priority
    task(connection, queue, None, priority=0)  # ahead: same priority, earlier
    task_id, _ = task(connection, queue, None, priority=0, name="proj.add")
    task(connection, queue, None, priority=0)  # behind
    got = answer(db, schema, task_id)
    assert got["state"] == "waiting"
    assert f"waiting on queue {queue.name!r} behind 2 other(s) (priority 0)" in got["summary"]
    assert "no worker consumes" in got["summary"]
    assert got["messages"][0]["task"] == "proj.add"


def test_waiting_on_a_paused_queue_says_how_to_resume(
    connection: Connection, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    task_id, _ = task(connection, queue, None)
    ops.pause(db, statements(schema), queue.name)
    got = answer(db, schema, task_id)
    assert got["state"] == "waiting"
    assert f"is paused: `celery-pg resume {queue.name}`" in got["summary"]


def test_leased_by_a_live_consumer_names_its_host_and_pid(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    producer, worker = make_connection(), make_connection()
    task_id, _ = task(producer, queue, None)
    leased(worker, queue)
    got = answer(db, schema, task_id)
    assert got["state"] == "leased", got
    assert f"pid {os.getpid()}" in got["summary"] and ", alive" in got["summary"]


def test_held_for_its_eta_is_delayed(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    producer = make_connection(broker_eta_threshold=60.0)  # held by a worker, not scheduled
    worker = make_connection()
    task_id, eta = task(producer, queue, 30.0)
    leased(worker, queue)
    got = answer(db, schema, task_id)
    assert got["state"] == "delayed", got
    assert eta is not None and f"until its ETA {eta.isoformat()}" in got["summary"]


_KILLED_CONSUMER = """
import os, sys
from kombu import Connection, Consumer, Producer, Queue
conn = Connection(sys.argv[1], transport_options={"schema": sys.argv[2]})
got = []
with Consumer(conn.default_channel, [Queue(sys.argv[3])], callbacks=[lambda b, m: got.append(m)]):
    while not got:
        conn.drain_events(timeout=10)
os.kill(os.getpid(), 9)
"""


def test_leased_by_a_killed_worker_is_presumed_dead(
    connection: Connection,
    broker_url: str,
    db: psycopg.Connection[Any],
    schema: str,
    queue: Queue,
) -> None:
    task_id, _ = task(connection, queue, None)
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CONSUMER, broker_url, schema, queue.name]
    )
    assert killed.wait(timeout=60) == -9
    got = answer(db, schema, task_id)
    assert got["state"] == "leased", got
    assert f"pid {killed.pid}" in got["summary"]
    assert "presumed dead (its session is gone" in got["summary"]


def test_leased_by_a_consumer_whose_row_is_gone(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    producer, worker = make_connection(), make_connection()
    task_id, _ = task(producer, queue, None)
    leased(worker, queue)
    db.execute(f'DELETE FROM "{schema}".consumers')  # by hand, as an operator might
    got = answer(db, schema, task_id)
    assert got["state"] == "leased"
    assert "which is gone: the reaper puts the message back" in got["summary"]


def test_scheduled_says_when_it_is_due(
    connection: Connection, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    task_id, eta = task(connection, queue, 3600.0)
    got = answer(db, schema, task_id)
    assert got["state"] == "scheduled"
    assert f"on queue {queue.name!r} (priority 0)" in got["summary"]
    assert "(in 3599 s)" in got["summary"] or "(in 3600 s)" in got["summary"]


def test_a_dead_letter_gives_its_reason_and_how_to_retry(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    producer, worker = make_connection(), make_connection()
    task_id, _ = task(producer, queue, None)
    other_id, _ = task(producer, queue, None)
    for _body, message in leased(worker, queue)[:1]:
        message.reject(requeue=False)  # dead-lettered, with the reason
    got = answer(db, schema, task_id)
    assert got["state"] == "dead_letter", got
    dead_id = got["dead_letters"][0]["id"]
    assert f"`celery-pg dead-letters retry {dead_id}`" in got["summary"]
    assert "rejected" in got["summary"]
    assert answer(db, schema, other_id)["state"] == "leased"  # the id is matched exactly


def test_a_finished_task_gives_its_state_and_error(
    app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    done, failed, started = (str(uuid.uuid4()) for _ in range(3))
    app.backend.store_result(done, 42, states.SUCCESS)
    app.backend.store_result(failed, ValueError("no such user"), states.FAILURE, traceback="T")
    app.backend.store_result(started, {"pid": 1}, states.STARTED)
    assert answer(db, schema, done)["summary"].startswith("finished: SUCCESS")
    got = answer(db, schema, failed)
    assert got["state"] == "finished" and got["result"]["status"] == "FAILURE"
    got = answer(db, schema, started)
    assert got["state"] == "started" and "acknowledged at start" in got["summary"]


def test_revoked_is_said_alone_and_beside_a_waiting_message(
    app: Celery, connection: Connection, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    gone = str(uuid.uuid4())
    app.control.revoke(gone)
    got = answer(db, schema, gone)
    assert got["state"] == "revoked" and "still in force" in got["summary"]
    task_id, _ = task(connection, queue, None)
    app.control.revoke(task_id)
    got = answer(db, schema, task_id)
    assert got["state"] == "waiting"
    assert "revoked at" in got["summary"] and "a worker discards it" in got["summary"]


def test_an_expired_message_is_said_expired(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    queue = Queue(f"q{uuid.uuid4().hex[:8]}", message_ttl=0.05)
    task_id, _ = task(connection, queue, None)
    db.execute("SELECT pg_sleep(0.2)")
    got = answer(db, schema, task_id)
    assert got["state"] == "expired" and "never run" in got["summary"]


def test_never_seen_and_the_command_line(
    app: Celery, broker_url: str, db: psycopg.Connection[Any], schema: str
) -> None:
    unknown, other = str(uuid.uuid4()), str(uuid.uuid4())
    app.backend.store_result(other, 7, states.SUCCESS)  # creates the schema
    assert answer(db, schema, unknown)["state"] == "unknown"
    app.backend.store_result(unknown, 7, states.SUCCESS)
    runner = CliRunner()
    out = runner.invoke(main, ["explain", unknown, "--url", broker_url, "--schema", schema])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"{unknown}: finished: SUCCESS")
    out = runner.invoke(
        main, ["explain", "nope", "--url", broker_url, "--schema", schema, "--json"]
    )
    data = json.loads(out.output)
    assert data["state"] == "unknown" and data["messages"] == [] and data["result"] is None


def test_a_waiting_task_past_its_expires_time_says_it_will_be_discarded(
    connection: Connection, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    task_id = str(uuid.uuid4())
    expired = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
    headers = {"task": "proj.add", "id": task_id, "eta": None, "expires": expired}
    Producer(connection.default_channel).publish(
        {}, routing_key=queue.name, declare=[queue], headers=headers
    )
    got = answer(db, schema, task_id)
    assert got["state"] == "waiting"
    assert f"its expires time {expired} has passed" in got["summary"]


def test_a_task_with_a_large_body_is_explained_all_the_same(
    make_connection: Any, db: psycopg.Connection[Any], schema: str, queue: Queue
) -> None:
    """A stored message's body comes before its headers: a body of more than
    8,000 characters hid the task's name, ETA and expiry from explain."""
    producer = make_connection(broker_eta_threshold=60.0)  # held by a worker, not scheduled
    worker = make_connection()
    task_id = str(uuid.uuid4())
    eta = datetime.now(timezone.utc) + timedelta(seconds=30)
    headers = {"task": "proj.big", "id": task_id, "eta": eta.isoformat()}
    Producer(producer.default_channel).publish(
        {"blob": "x" * 20_000}, routing_key=queue.name, declare=[queue], headers=headers
    )
    leased(worker, queue)
    got = answer(db, schema, task_id)
    assert got["messages"][0]["task"] == "proj.big", got["messages"]
    assert got["state"] == "delayed", got
    assert f"until its ETA {eta.isoformat()}" in got["summary"]
