"""The Prometheus metrics, read back by prometheus_client's text-format
parser from real scrapes of a schema in known states."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Consumer, Producer, Queue

pytest.importorskip("prometheus_client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from celery_pgnotify import metrics, ops  # noqa: E402
from celery_pgnotify.connect import conninfo_from_url  # noqa: E402
from celery_pgnotify.statements import statements  # noqa: E402
from tests.test_scheduled import task  # noqa: E402
from tests.test_transport import collect, drain_until  # noqa: E402
from tests.workers import close_app  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(broker_url: str, schema: str) -> Samples:
    collector = metrics.Collector(conninfo_from_url(broker_url, None, 10), schema)
    try:
        return parse(generate_latest(metrics.registry(collector)).decode())
    finally:
        collector.close()


def of(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def transport_options(schema: str) -> dict[str, Any]:
    return {"schema": schema, "heartbeat_interval": 0.5}


def test_a_scrape_reads_the_queues_the_consumers_and_the_tables(
    make_connection: Any, db: psycopg.Connection[Any], broker_url: str, schema: str
) -> None:
    producer, worker = make_connection(), make_connection()
    work, held = Queue(f"w{uuid.uuid4().hex[:8]}"), Queue(f"h{uuid.uuid4().hex[:8]}")
    for _ in range(7):
        task(producer, work, None)
    task(producer, work, 3600.0)  # scheduled
    task(producer, held, None)
    ops.pause(db, statements(schema), held.name)
    received: list[Any] = []
    with Consumer(
        worker.default_channel, [work], callbacks=[collect(received, ack=False)], prefetch_count=3
    ):
        drain_until(worker, received, 3)
        received[0][1].reject(requeue=False)  # dead-lettered
        deadline = time.monotonic() + 10
        while True:  # until a heartbeat has carried the claim's time
            got = scrape(broker_url, schema)
            keys = [k for k in got if k[0] == "pgnotify_consumer_claim_seconds_count"]
            if (keys and got[keys[0]] >= 1) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    (key,) = keys
    assert of(got, "pgnotify_up") == 1
    assert of(got, "pgnotify_queue_ready_messages", queue=work.name) == 4
    assert of(got, "pgnotify_queue_leased_messages", queue=work.name) == 2
    assert of(got, "pgnotify_queue_scheduled_messages", queue=work.name) == 1
    assert of(got, "pgnotify_queue_dead_letters", queue=work.name) == 1
    assert of(got, "pgnotify_queue_oldest_ready_age_seconds", queue=work.name) > 0
    assert of(got, "pgnotify_queue_paused", queue=held.name) == 1
    assert of(got, "pgnotify_queue_paused", queue=work.name) == 0
    assert of(got, "pgnotify_queue_estimated", queue=work.name) == 0
    assert of(got, "pgnotify_consumers") == 1
    assert got[key] >= 1  # the claim, timed by the consumer, reported by its heartbeat
    labels = dict(key[1])
    assert labels["pid"] == str(os.getpid())
    assert of(got, "pgnotify_consumer_claim_seconds_bucket", **labels, le="+Inf") == got[key]
    assert of(got, "pgnotify_rows_stored_total", table="messages") == 8
    assert of(got, "pgnotify_rows_stored_total", table="scheduled") == 1
    assert of(got, "pgnotify_rows_stored_total", table="dead_letters") == 1
    assert of(got, "pgnotify_table_size_bytes", table="messages") > 0
    assert 0 <= of(got, "pgnotify_notification_queue_usage_ratio") < 1


def test_counts_over_the_cap_are_estimated_from_a_sample(
    connection: Connection, db: psycopg.Connection[Any], schema: str
) -> None:
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    producer = Producer(connection.default_channel)
    for _ in range(400):  # stored as about 1.6 kB, incompressible: a few per page, none in TOAST
        producer.publish(
            base64.b64encode(os.urandom(700)).decode(), routing_key=queue.name, declare=[queue]
        )
    stmts = statements(schema)
    exact = metrics.snapshot(db, stmts)
    (q,) = [q for q in exact.queues if q.name == queue.name]
    assert (q.ready, q.estimated) == (400, False)
    whole = metrics.snapshot(db, stmts, cap=10)  # every page sampled: the true count
    (q,) = [q for q in whole.queues if q.name == queue.name]
    assert (q.ready, q.estimated) == (400, True)
    pages = db.execute(f"SELECT pg_relation_size('\"{schema}\".messages') / 8192").fetchone()
    assert pages is not None and pages[0] > 50
    part = metrics.snapshot(db, stmts, cap=10, sample_pages=pages[0] // 2)  # about half
    (q,) = [q for q in part.queues if q.name == queue.name]
    assert q.estimated and 200 <= q.ready <= 600, q.ready


_KILLED = """
import os, sys
from kombu import Connection, Consumer, Queue
conn = Connection(sys.argv[1], transport_options={"schema": sys.argv[2]})
got = []
with Consumer(conn.default_channel, [Queue(sys.argv[3])], callbacks=[lambda b, m: got.append(m)]):
    while len(got) < 3:
        conn.drain_events(timeout=10)
os.kill(os.getpid(), 9)
"""


def test_the_reaper_counts_the_consumers_and_messages_it_releases(
    make_connection: Any, broker_url: str, schema: str
) -> None:
    producer = make_connection()
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    for _ in range(3):
        task(producer, queue, None)
    killed = subprocess.Popen([sys.executable, "-c", _KILLED, broker_url, schema, queue.name])
    assert killed.wait(timeout=60) == -signal.SIGKILL
    survivor = make_connection()  # its listener reaps the dead consumer
    received: list[Any] = []
    with Consumer(survivor.default_channel, [queue], callbacks=[collect(received)]):
        drain_until(survivor, received, 3, timeout=30)
    got = scrape(broker_url, schema)
    assert of(got, "pgnotify_reaper_dead_consumers_total") == 1
    assert of(got, "pgnotify_reaper_released_messages_total") == 3


def test_an_unreachable_database_scrapes_as_down() -> None:
    collector = metrics.Collector("host=127.0.0.1 port=1 dbname=none connect_timeout=2", "x")
    got = parse(generate_latest(metrics.registry(collector)).decode())
    assert of(got, "pgnotify_up") == 0
    assert not [k for k in got if k[0].startswith("pgnotify_queue_")]


@pytest.fixture
def app(broker_url: str, schema: str) -> Iterator[Celery]:
    app = Celery("scraped", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    yield app
    close_app(app)


def test_the_wsgi_app_and_the_command_serve_the_same_metrics(
    app: Celery, connection: Connection, broker_url: str, schema: str
) -> None:
    task(connection, Queue("celery"), None)
    body: list[bytes] = []
    status: list[str] = []
    wsgi = metrics.wsgi_app(app)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    body += wsgi(environ, lambda s, headers: status.append(s))
    assert status == ["200 OK"]
    assert of(parse(b"".join(body).decode()), "pgnotify_queue_ready_messages", queue="celery") == 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "celery_pgnotify.cli", "metrics", "--url", broker_url]
    with subprocess.Popen(
        [*command, "--schema", schema, "--port", str(port), "--addr", "127.0.0.1"],
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stdout is not None and "serving" in server.stdout.readline()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=10)
    assert of(parse(text), "pgnotify_queue_ready_messages", queue="celery") == 1
