"""No stored row can break a claim: it is delivered as a valid message or
dead-lettered with its reason, and the rest of its batch is unaffected."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from kombu import Connection

from celery_pgnotify.envelope import check_task_headers
from tests import poison
from tests.workers import E2E

QUEUE = "poison"


def _insert(db: psycopg.Connection[Any], schema: str, payload: str) -> int:
    row = db.execute(
        f'INSERT INTO "{schema}".messages (queue, payload) VALUES (%s, %s) RETURNING id',
        (QUEUE, payload),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _storable(payload: str) -> bool:
    """What a text column can hold at all (anyone's INSERT fails otherwise)."""
    try:
        payload.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in payload


def _check_delivered(message: Any) -> None:
    """What both workers read first must be there, with the right types."""
    assert isinstance(message.headers, dict)
    assert isinstance(message.properties, dict)
    assert isinstance(message.delivery_info, dict)
    assert isinstance(message.body, (bytes, str))
    if "task" in message.headers:
        check_task_headers(message.headers)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=poison.rows())
@example(payload=poison.regression_rows()[0])
def test_every_row_is_delivered_or_dead_lettered(
    payload: str, connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    if not _storable(payload):
        return
    channel = connection.default_channel
    channel.basic_get(QUEUE)  # the schema exists from here on
    # Examples share this test's schema: each starts from empty tables.
    db.execute(f'DELETE FROM "{schema}".messages; DELETE FROM "{schema}".dead_letters')
    good = json.dumps(poison.envelope())
    # The hostile row between two valid ones.
    first, bad, last = (_insert(db, schema, p) for p in (good, payload, good))
    delivered = {}
    for _ in range(4):
        message = channel.basic_get(QUEUE)  # never raises for what a row holds
        if message is None:
            break
        _check_delivered(message)
        delivered[message.delivery_tag] = message
        message.ack()
    assert first in delivered and last in delivered, "a valid neighbour was not delivered"
    dead = db.execute(
        f'SELECT reason FROM "{schema}".dead_letters WHERE message_id = %s', (bad,)
    ).fetchall()
    if bad in delivered:
        assert not dead
    else:
        assert len(dead) == 1 and dead[0][0], "a refused row must be dead-lettered with a reason"
    left = db.execute(f'SELECT count(*) FROM "{schema}".messages').fetchone()
    assert left == (0,), "every row was either delivered or dead-lettered"


def test_every_regression_row_is_refused_in_one_claim(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    channel = connection.default_channel
    channel.basic_get(QUEUE)  # creates the schema
    rows = poison.regression_rows()
    ids = [_insert(db, schema, payload) for payload in rows]
    good = _insert(db, schema, json.dumps(poison.envelope()))
    message = channel.basic_get(QUEUE)
    while message is not None and message.delivery_tag != good:
        message.ack()
        message = channel.basic_get(QUEUE)
    assert message is not None and message.delivery_tag == good
    message.ack()
    dead = dict(db.execute(f'SELECT message_id, reason FROM "{schema}".dead_letters').fetchall())
    assert sorted(dead) == ids, "every regression row is dead-lettered, none delivered"
    assert all(dead.values())


def _serves(e2e: E2E, tag: str, timeout: float = 30) -> bool:
    e2e.send("record", tag, queue=QUEUE)
    return e2e.wait_events(tag, ["run"], timeout=timeout) == ["run"]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_workers_keep_serving_through_poison(
    e2e: E2E, db: psycopg.Connection[Any], kind: str
) -> None:
    """Every regression row and a sample of generated ones reach real workers:
    each ends dead-lettered or run, and the worker goes on serving."""
    start = e2e.worker if kind == "celery" else e2e.pg_worker
    worker = start("-Q", QUEUE, "-c", "1")
    schema = e2e.options["schema"]
    regression = poison.regression_rows()
    rows = [r for r in regression + poison.sample(60, seed=12) if _storable(r)]
    with psycopg.connect(e2e.dsn, autocommit=True) as conn, conn.transaction():
        ids = [_insert(conn, schema, payload) for payload in rows]
        conn.execute("SELECT pg_notify(%s, '')", (_channel(schema, QUEUE),))
    assert _serves(e2e, "after-poison"), worker.output()[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = db.execute(
            f'SELECT count(*) FROM "{schema}".messages WHERE id = ANY(%s)', (ids,)
        ).fetchone()
        if left == (0,):
            break
        time.sleep(0.2)
    assert left == (0,), db.execute(
        f'SELECT id, consumer_id, left(payload, 300) FROM "{schema}".messages WHERE id = ANY(%s)',
        (ids,),
    ).fetchall()
    assert worker.proc.poll() is None, worker.output()[-3000:]
    assert "Unrecoverable error" not in worker.output()
    dead = db.execute(
        f'SELECT count(*) FROM "{schema}".dead_letters WHERE message_id = ANY(%s)',
        (ids[: len(regression)],),
    ).fetchone()
    assert dead == (len(regression),), "every regression row is dead-lettered"


def _channel(schema: str, queue: str) -> str:
    from celery_pgnotify.statements import statements

    return statements(schema).channel(queue)
