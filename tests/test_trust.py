"""Nothing forged, nothing silently changed: notifications, declarations,
publish durability and the secrets a URL shows."""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu import Connection, Exchange, Producer, Queue

from celery_pgnotify import enqueue_in
from celery_pgnotify.connect import mask_url
from celery_pgnotify.errors import PreconditionFailed
from celery_pgnotify.statements import statements
from tests.workers import close_app


@pytest.fixture
def results_app(broker_url: str, schema: str) -> Iterator[Celery]:
    app = Celery("trust", broker=broker_url, backend=broker_url)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.result_serializer = "pickle"
    app.conf.accept_content = ["json", "pickle"]
    app.conf.result_accept_content = ["json", "pickle"]
    yield app
    app.backend.close()
    close_app(app)


class Boom:
    """Unpickling this runs code in the waiting process."""

    ran = False

    def __reduce__(self) -> Any:
        return (_mark_ran, ())


def _mark_ran() -> str:
    Boom.ran = True
    return "forged"


def test_a_forged_notification_never_becomes_a_result(
    results_app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    result = results_app.send_task("nobody.runs.this", task_id=str(uuid.uuid4()))
    channel = statements(schema).result_channel(result.id)
    forged_json = json.dumps({"status": "SUCCESS", "result": "forged", "task_id": result.id})
    forged_pickle = base64.b64encode(
        pickle.dumps({"status": "SUCCESS", "result": Boom(), "task_id": result.id})
    ).decode()
    for payload in (forged_json, forged_pickle, pickle.dumps(Boom()).hex()):
        db.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    with pytest.raises(CeleryTimeoutError):
        result.get(timeout=2)
    assert result.state == "PENDING"
    assert not Boom.ran


def _chord_request(task_id: str, group_id: str) -> Any:
    from celery import signature
    from celery.app.task import Context

    callback = signature("nobody.callback")
    callback["chord_size"] = 3
    return Context(id=task_id, group=group_id, chord=callback, group_index=0)


def test_a_chord_header_task_counts_once(
    results_app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    """Celery's chord logic increments the counter by key; the same header
    task reporting again (a retried statement, a redelivery) counts once."""
    from celery.result import AsyncResult, GroupResult

    backend = results_app.backend
    group_id = str(uuid.uuid4())
    members = [str(uuid.uuid4()) for _ in range(3)]
    GroupResult(group_id, [AsyncResult(m, app=results_app) for m in members]).save(backend)

    def counter() -> Any:
        row = db.execute(
            f'SELECT counter FROM "{schema}".chord_counters WHERE group_id = %s', (group_id,)
        ).fetchone()
        return row[0] if row else None

    backend.on_chord_part_return(_chord_request(members[0], group_id), "SUCCESS", 1)
    backend.on_chord_part_return(_chord_request(members[0], group_id), "SUCCESS", 1)
    assert counter() == 1
    backend.on_chord_part_return(_chord_request(members[1], group_id), "SUCCESS", 1)
    assert counter() == 2


def test_an_incompatible_redeclaration_is_refused(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    channel = connection.default_channel
    exchange = Exchange("shared")
    Queue("shared", exchange, "shared", durable=True)(channel).declare()
    Queue("shared", exchange, "shared", durable=True)(channel).declare()  # the same: fine
    with pytest.raises(PreconditionFailed, match="auto_delete"):
        Queue("shared", exchange, "shared", auto_delete=True, expires=1)(channel).declare()
    row = db.execute(
        f'SELECT auto_delete, expires_ms FROM "{schema}".queues WHERE name = %s', ("shared",)
    ).fetchone()
    assert row == (False, None), "the queue keeps the settings it was created with"
    # A channel error, as RabbitMQ's 406: Celery treats it as such.
    assert isinstance(PreconditionFailed("x"), connection.channel_errors)


def test_a_publish_is_durable_whatever_the_session_says(
    connection: Connection, pg_dsn: str
) -> None:
    """Publishing raises the transaction's synchronous_commit from off: the
    message's COMMIT waits for the WAL flush."""
    queue = Queue("durable", Exchange("durable"), "durable")
    Producer(connection.default_channel).publish("warm", declare=[queue], routing_key="durable")
    with psycopg.connect(pg_dsn) as conn, conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        with enqueue_in(conn):
            Producer(connection.default_channel).publish("x", routing_key="durable", exchange="")
        row = conn.execute("SHOW synchronous_commit").fetchone()
    assert row == ("on",)


@pytest.mark.parametrize("durable", [True, False])
def test_durable_publish_decides_whether_a_publish_waits_for_the_flush(
    make_connection: Any, db: psycopg.Connection[Any], pg_dsn: str, durable: bool
) -> None:
    """durable_publish: False commits a publish without waiting for the WAL
    flush, and that statement only; inside enqueue_in(conn) a publish never
    makes the caller's transaction less durable."""
    connection = make_connection(durable_publish=durable)
    with connection:
        channel = connection.default_channel
        queue = Queue("flushed", Exchange("flushed"), "flushed")
        Producer(channel).publish("warm", declare=[queue], routing_key="flushed")
        publishes = channel._publishes
        params = {
            "queue": "flushed",
            "exchange": "flushed",
            "rk": "flushed",
            "rank": 0,
            "payload": "{}",
            "ttl": None,
            "prefix": channel._stmts.channel_prefix,
            "fresh": 3.0,
            "task_id": None,
            "wake_all": False,
        }
        for name in ("publish_direct", "publish_routed"):
            with db.transaction(force_rollback=True):
                db.execute(getattr(publishes, name), params)
                row = db.execute("SHOW synchronous_commit").fetchone()
            assert row == ("on" if durable else "off",), name
        work = connection.transport.work_conn()
        Producer(channel).publish("x", routing_key="flushed", exchange="")
        assert work.execute("SHOW synchronous_commit").fetchone() == ("on",)
        with psycopg.connect(pg_dsn) as conn, conn.transaction():
            with enqueue_in(conn):
                Producer(channel).publish("y", routing_key="flushed", exchange="")
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        got = [channel.basic_get("flushed", no_ack=True) for _ in range(3)]
        assert sorted(m.payload for m in got if m is not None) == ["warm", "x", "y"]


def test_an_extra_property_json_cannot_carry_is_left_out(connection: Connection) -> None:
    queue = Queue("extras", Exchange("extras"), "extras")
    producer = Producer(connection.default_channel)
    producer.publish(
        {"n": 1}, declare=[queue], routing_key="extras", forwarded=object(), plain="kept"
    )
    message = connection.default_channel.basic_get("extras")
    assert message is not None and message.payload == {"n": 1}
    assert message.properties.get("plain") == "kept"
    assert "forwarded" not in message.properties
    message.ack()


@pytest.mark.parametrize(
    "url",
    [
        "pgnotify://app:s3cret@db:5432/app",
        "pgnotify://app@db/app?sslmode=require&password=s3cret",
        "pgnotify://app@db/app?sslpassword=s3cret&sslmode=verify-full",
        "pgnotify://app@db/app?PASSWORD=s3cret",
    ],
)
def test_mask_url_hides_every_password(url: str) -> None:
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert masked.startswith("pgnotify://app")


def test_send_task_ignores_the_callers_search_path(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    connection.default_channel.basic_get("celery")  # creates the schema
    evil = f"{schema}_evil"
    db.execute(f'CREATE SCHEMA "{evil}"')
    try:
        db.execute(
            f'CREATE FUNCTION "{evil}".gen_random_uuid() RETURNS uuid LANGUAGE sql'
            " AS $$ SELECT '00000000-0000-0000-0000-000000000000'::uuid $$"
        )
        with psycopg.connect(db.info.dsn, autocommit=True) as caller:
            caller.execute(f'SET search_path = "{evil}", pg_catalog')
            ids = {
                caller.execute(f'SELECT "{schema}".send_task(%s)', ("t.x",)).fetchone()
                for _ in range(2)
            }
        assert len(ids) == 2, "the caller's functions never replace the built-ins"
    finally:
        db.execute(f'DROP SCHEMA "{evil}" CASCADE')


def test_an_unroutable_publish_is_logged_as_a_warning(
    connection: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    exchange = Exchange("nowhere", type="direct")
    producer = Producer(connection.default_channel, exchange=exchange)
    exchange(connection.default_channel).declare()
    with caplog.at_level("WARNING", logger="celery_pgnotify.transport"):
        producer.publish({"lost": True}, routing_key="no-queue-bound")
    assert any("matched no queue" in r.getMessage() for r in caplog.records)
