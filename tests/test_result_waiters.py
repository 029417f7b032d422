"""A stored result notifies only when someone waits for it, and a waiter
never misses the result it waits for."""

from __future__ import annotations

import select
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, states

from celery_pgnotify import waiting
from celery_pgnotify.connect import received_notifies
from tests.tablestats import report, table_reads
from tests.workers import close_app


@pytest.fixture
def app(broker_url: str, schema: str) -> Iterator[Celery]:
    app = Celery("waiters", broker=broker_url, backend=broker_url)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.result_backend_transport_options = {"schema": schema}
    yield app
    close_app(app)


@pytest.fixture
def worker_side(broker_url: str, schema: str) -> Iterator[Any]:
    """Another process's backend, storing results as a worker does."""
    other = Celery("worker-side", broker=broker_url, backend=broker_url)
    other.conf.result_backend_transport_options = {"schema": schema}
    yield other.backend
    close_app(other)


def _listening(pg_dsn: str, channel: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(pg_dsn, autocommit=True)
    conn.execute(f'LISTEN "{channel}"')
    return conn


def _notified(conn: psycopg.Connection[Any], timeout: float) -> int:
    """Notifications received within ``timeout`` seconds (any psycopg 3)."""
    select.select([conn.fileno()], [], [], timeout)
    time.sleep(0.05)  # a notification sent with another lands too
    return sum(1 for _ in received_notifies(conn))


def test_a_result_nobody_waits_for_notifies_nobody(
    app: Celery, worker_side: Any, pg_dsn: str
) -> None:
    unwatched, watched = str(uuid.uuid4()), str(uuid.uuid4())
    stmts = app.backend.stmts
    ear_unwatched = _listening(pg_dsn, stmts.result_channel(unwatched))
    ear_watched = _listening(pg_dsn, stmts.result_channel(watched))
    with ear_unwatched, ear_watched:
        worker_side.store_result(unwatched, 1, states.SUCCESS)
        assert _notified(ear_unwatched, 0.3) == 0
        app.backend.await_results([watched])
        assert app.AsyncResult(watched).state == states.PENDING  # the mark is no result
        worker_side.store_result(watched, 2, states.STARTED)
        worker_side.store_result(watched, 3, states.SUCCESS)
        assert _notified(ear_watched, 2.0) >= 1
    assert app.AsyncResult(watched).get(timeout=5) == 3
    # Marking a result already stored leaves it as it is.
    app.backend.await_results([unwatched, unwatched])
    assert app.AsyncResult(unwatched).get(timeout=5) == 1


def test_a_mark_made_while_a_store_commits_waits_for_it_and_sees_it(
    app: Celery, worker_side: Any, pg_dsn: str
) -> None:
    task_id = str(uuid.uuid4())
    backend = app.backend
    meta = backend.encode({"status": states.SUCCESS, "result": 5, "task_id": task_id})
    store = {
        "id": task_id,
        "status": states.SUCCESS,
        "meta": meta.encode() if isinstance(meta, str) else meta,
        "name": None,
        "args": None,
        "kwargs": None,
        "worker": None,
        "retries": None,
        "queue": None,
        "traceback": None,
        "ready": True,
        "expires": None,
        "channel": backend.stmts.result_channel(task_id),
    }
    backend.fetch_metas([task_id])  # the schema exists before the store
    marked = threading.Event()
    with psycopg.connect(pg_dsn) as storer:
        storer.execute(backend.stmts.store_result, store)  # not committed yet
        marker = threading.Thread(
            target=lambda: (worker_side.await_results([task_id]), marked.set())
        )
        marker.start()
        assert not marked.wait(0.5), "the mark must wait for the store in flight"
        storer.commit()
        marker.join(10)
    assert marked.is_set()
    assert [m["status"] for m in worker_side.fetch_metas([task_id])] == [states.SUCCESS]


def test_get_is_woken_by_the_store_it_waits_for(
    app: Celery, worker_side: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No re-read helps within the timeout: only the notification the mark
    asked for can end the wait."""
    monkeypatch.setattr(waiting, "REREAD_INTERVAL", 600.0)
    task_id = str(uuid.uuid4())
    result = app.AsyncResult(task_id)
    app.backend.on_task_call(None, task_id)  # listening, as after .delay()
    storer = threading.Timer(0.5, worker_side.store_result, (task_id, 42, states.SUCCESS))
    storer.start()
    try:
        assert result.get(timeout=20) == 42
    finally:
        storer.join()


def test_reading_results_after_a_burst_reads_none_but_those_asked_for(
    app: Celery, db: psycopg.Connection[Any], schema: str
) -> None:
    """A session keeps a prepared statement's plan: made while ``results`` was
    empty and vacuumed, reading one result read the whole table once it had
    filled, until the table was next analysed."""
    backend = app.backend

    def store_and_read(rounds: int) -> None:
        for i in range(rounds):
            task_id = str(uuid.uuid4())
            backend.store_result(task_id, i, states.SUCCESS)
            assert backend.get_task_meta(task_id)["result"] == i
            backend._cache.pop(task_id, None)  # read it from the table each time

    def seq_scans() -> int:
        return table_reads(db, schema, "results")["seq_scan"]

    store_and_read(1)
    db.execute(f'DELETE FROM "{schema}".results')
    db.execute(f'VACUUM "{schema}".results')  # empty, and known to be
    store_and_read(12)  # the plans are made and kept, where they are kept
    db.execute(
        f'INSERT INTO "{schema}".results (task_id, status, meta, expires_at)'
        " SELECT 'x' || g, 'SUCCESS', ''::bytea, now() + interval '1 day'"
        " FROM generate_series(1, 100000) AS g"
    )
    report(backend._connection())
    before = seq_scans()
    store_and_read(5)
    report(backend._connection())
    assert seq_scans() == before, "reading 5 results scanned the whole table"
