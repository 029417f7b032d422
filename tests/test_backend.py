"""The result backend with real workers: states, canvas, large results, expiry."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from celery import Celery, chain, chord, group
from celery.exceptions import ChordError, TimeoutError

from celery_pgnotify.backend import PgNotifyBackend
from celery_pgnotify.errors import ConfigurationError
from tests.workers import E2E, READY, WorkerProcess, celery_pg_worker, celery_worker, close_app

pytestmark = pytest.mark.e2e

APP = "tests.results_app"


class Results:
    """A sending app with the pgnotify result backend, and its workers."""

    def __init__(self, e2e: E2E, broker_url: str) -> None:
        self.e2e = e2e
        self.app = Celery("sender", broker=broker_url, backend=broker_url)
        self.app.conf.broker_transport_options = e2e.options
        self.app.conf.result_extended = True
        self.workers: list[WorkerProcess] = []

    def start(self, kind: str, concurrency: int = 2, **env: str) -> WorkerProcess:
        environment = dict(self.e2e.env, **env)
        if kind == "celery":
            worker = celery_worker(environment, app=APP, concurrency=concurrency)
        else:
            worker = celery_pg_worker(environment, app=APP, concurrency=concurrency)
        self.workers.append(worker)
        worker.wait_for(READY[kind])
        return worker

    def sig(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.app.signature(f"{APP}.{name}", args=args, kwargs=kwargs)

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"{APP}.{name}", args=args, **options)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.app.backend.close()
        close_app(self.app)


@pytest.fixture(params=["celery", "celery-pg"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def results(e2e: E2E, broker_url: str) -> Iterator[Results]:
    env = Results(e2e, broker_url)
    yield env
    env.close()


def test_states_and_exceptions(results: Results, kind: str, db: psycopg.Connection[Any]) -> None:
    pending = results.send("add", 1, 2, queue="nobody-consumes-this")
    assert pending.state == "PENDING"
    assert not pending.ready()

    results.start(kind)
    ok = results.send("add", 2, 3)
    assert ok.get(timeout=30) == 5
    assert ok.state == "SUCCESS" and ok.ready() and ok.successful()

    from tests.results_app import PaymentDeclined

    failed = results.send("decline", 42)
    with pytest.raises(PaymentDeclined, match="declined: 42"):
        failed.get(timeout=30)
    assert failed.state == "FAILURE" and failed.failed()
    assert "PaymentDeclined" in (failed.traceback or ""), repr(failed._get_task_meta())
    exc = failed.get(timeout=5, propagate=False)
    assert isinstance(exc, PaymentDeclined) and exc.args == ("declined: 42",), repr(exc)

    # Every JSON type comes back as sent.
    value = {"s": "é", "i": 7, "f": 1.5, "b": True, "n": None, "l": [1, "a"], "d": {"x": []}}
    assert results.send("echo", value).get(timeout=30) == value

    # result_extended: the row says what ran, where.
    row = db.execute(
        f"SELECT status, name, args, worker, retries, date_done IS NOT NULL"
        f' FROM "{results.e2e.options["schema"]}".results WHERE task_id = %s',
        (ok.id,),
    ).fetchone()
    assert row is not None
    status, name, args, worker, retries, done = row
    assert (status, name, args, retries, done) == ("SUCCESS", f"{APP}.add", "[2, 3]", 0, True)
    assert worker and worker.startswith("w1@")

    ok.forget()
    assert results.app.AsyncResult(ok.id).state == "PENDING"


def test_started_state_and_revoke(results: Results, kind: str) -> None:
    results.start(kind)
    slow = results.send("sleep_then", 3, 1)
    deadline = time.monotonic() + 20
    while slow.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.state == "STARTED"  # task_track_started
    assert slow.get(timeout=30) == 1

    revoked = results.send("sleep_then", 30, 1)
    deadline = time.monotonic() + 20
    while revoked.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.05)
    revoked.revoke(terminate=True)
    deadline = time.monotonic() + 20
    while revoked.state != "REVOKED" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert revoked.state == "REVOKED"


def test_large_result(results: Results, kind: str) -> None:
    results.start(kind)
    size = 2 * 1024 * 1024  # far beyond NOTIFY's 8000 bytes
    assert results.send("big", size).get(timeout=60) == "x" * size


def test_canvas(results: Results, kind: str) -> None:
    results.start(kind, concurrency=3)
    add, tsum = (lambda *a: results.sig("add", *a)), (lambda *a: results.sig("tsum", *a))
    assert chain(add(1, 2), add(3), add(4)).delay().get(timeout=30) == 10
    assert group(add(i, i) for i in range(10)).delay().get(timeout=30) == [2 * i for i in range(10)]
    assert chord((add(i, 1) for i in range(5)), tsum()).delay().get(timeout=30) == 15
    # A chord of chords: the inner chords' results feed the outer callback.
    inner = [chord([add(i, j) for j in range(3)], tsum()) for i in range(3)]
    assert chord(inner, tsum()).delay().get(timeout=60) == sum(
        i + j for i in range(3) for j in range(3)
    )
    joined = group(add(i, 0) for i in range(4)).delay()
    assert joined.join(timeout=30) == [0, 1, 2, 3]
    saved = group(add(1, 1), add(2, 2)).delay()
    saved.save()
    restored = results.app.GroupResult.restore(saved.id)
    assert restored is not None and restored.get(timeout=30) == [2, 4]


def test_chord_error_and_link_error(results: Results, kind: str) -> None:
    results.start(kind)
    tag = "errors"
    failing = chord(
        [results.sig("add", 1, 1), results.sig("decline", 5)],
        results.sig("record_sum", tag=tag),
    ).delay()
    # get() re-raises the failed header task's error, as on every backend ...
    with pytest.raises(Exception, match="declined: 5"):
        failing.get(timeout=30)
    # ... and the callback itself is marked failed with a ChordError, never run.
    deadline = time.monotonic() + 20
    while failing.state != "FAILURE" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert isinstance(failing.result, ChordError), failing.result
    assert "declined: 5" in str(failing.result)
    assert "callback-" not in " ".join(results.e2e.events(tag))

    broken = results.send(
        "decline", 9, link_error=results.sig("on_error", tag=tag).set(immutable=False)
    )
    with pytest.raises(Exception, match="declined: 9"):
        broken.get(timeout=30)
    assert "errback-PaymentDeclined" in results.e2e.wait_events(tag, ["errback"])


def test_chord_header_tasks_finishing_together(results: Results, kind: str) -> None:
    """Header tasks end at the same instant on 4 processes: one callback, right sum."""
    results.start(kind, concurrency=4)
    tag = "concurrent-chord"
    for round_ in range(3):
        when = time.time() + 1.5
        header = [results.sig("at", when, i) for i in range(12)]
        res = chord(header, results.sig("record_sum", tag=tag)).delay()
        assert res.get(timeout=60) == sum(range(12))
        events = results.e2e.wait_events(tag, ["x"] * (round_ + 1))
        assert events == [f"callback-{sum(range(12))}"] * (round_ + 1)
    time.sleep(1)
    assert len(results.e2e.events(tag)) == 3


def test_sync_subtask_rule_kept(results: Results, kind: str) -> None:
    results.start(kind)
    res = results.send("wait_for_subtask")
    with pytest.raises(RuntimeError, match="Never call result.get"):
        res.get(timeout=30)


def test_expiry_and_cleanup(results: Results, db: psycopg.Connection[Any]) -> None:
    results.app.conf.result_expires = 1
    results.start("celery-pg", PGNOTIFY_RESULT_EXPIRES="1")
    res = results.send("add", 20, 22)
    assert res.get(timeout=30) == 42
    time.sleep(1.5)
    fresh = results.app.AsyncResult(res.id)
    assert fresh.state == "PENDING"  # expired rows are not read back
    schema = results.e2e.options["schema"]
    assert db.execute(f'SELECT count(*) FROM "{schema}".results').fetchone() == (1,)
    results.app.backend.cleanup()
    assert db.execute(f'SELECT count(*) FROM "{schema}".results').fetchone() == (0,)


def test_waiting_is_woken_not_polled(results: Results, db: psycopg.Connection[Any]) -> None:
    """A 3-second wait reads the table a bounded number of times, and survives
    its LISTEN session being terminated midway."""
    results.start("celery-pg")
    backend = results.app.backend
    reads = {"n": 0}
    fetch = backend.fetch_metas
    get = backend.get

    def counted_fetch(ids: Any) -> Any:
        reads["n"] += 1
        return fetch(ids)

    def counted_get(key: Any) -> Any:
        reads["n"] += 1
        return get(key)

    backend.fetch_metas, backend.get = counted_fetch, counted_get
    res = results.send("sleep_then", 3, 7)

    def kill_listener() -> None:
        time.sleep(1)
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'celery-pgnotify-results' AND query LIKE 'LISTEN%%'"
            " AND datname = current_database() AND pid <> pg_backend_pid()"
        )

    killer = threading.Thread(target=kill_listener)
    killer.start()
    assert res.get(timeout=30) == 7
    killer.join()
    # One read when the wait starts, one after the reconnect, one per
    # announcement (STARTED, SUCCESS: a notification only wakes); no loop.
    assert reads["n"] <= 4, reads


def test_get_timeout(results: Results) -> None:
    res = results.send("add", 1, 1, queue="nobody-consumes-this")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        res.get(timeout=1)
    assert time.monotonic() - started < 5


def test_bad_backend_options_name_the_setting(broker_url: str) -> None:
    app = Celery("bad", broker=broker_url, backend=broker_url)
    app.conf.result_backend_transport_options = {"schema": "no-dashes"}
    with pytest.raises(ConfigurationError, match=r"result_backend_transport_options\['schema'\]"):
        PgNotifyBackend(app=app, url=broker_url)
    app.conf.result_backend_transport_options = {"sheme": "typo"}
    with pytest.raises(ConfigurationError, match="sheme"):
        PgNotifyBackend(app=app, url=broker_url)
    app.conf.result_backend_transport_options = {}
    backend = PgNotifyBackend(app=app, url="pgnotify://app:s3cret@db.example:5432/prod")
    assert backend.as_uri() == "pgnotify://app:**@db.example:5432/prod"
    backend.close()
    close_app(app)


def test_results_shared_across_threads(results: Results) -> None:
    """AsyncResults made in one thread are waited on from several at once:
    they share one backend (and its LISTEN session) without losing a wake-up."""
    results.start("celery-pg", concurrency=4)
    sent = [results.send("sleep_then", 0.05 * (i % 5), i) for i in range(24)]
    got: dict[int, Any] = {}
    errors: list[BaseException] = []

    def wait(part: list[Any]) -> None:
        try:
            for r in part:
                got[sent.index(r)] = r.get(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(sent[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert got == {i: i for i in range(24)}


def test_a_task_revoked_while_no_worker_runs_never_runs(
    results: Results, kind: str, db: psycopg.Connection[Any]
) -> None:
    schema = results.e2e.options["schema"]
    doomed = results.send("add", 1, 1)
    later = results.send("add", 2, 2, countdown=600)  # waits in the database
    results.app.control.revoke(doomed.id)  # a broadcast nobody hears
    results.app.control.revoke(later.id)
    # The revoke of a scheduled task outlasts its wait.
    row = db.execute(
        f'SELECT r.expires_at > t.due_at FROM "{schema}".revoked r'
        f' JOIN "{schema}".scheduled t USING (task_id) WHERE r.task_id = %s',
        (later.id,),
    ).fetchone()
    assert row == (True,)
    results.start(kind)
    assert results.send("add", 3, 3).get(timeout=30) == 6
    deadline = time.monotonic() + 15
    while doomed.state != "REVOKED" and time.monotonic() < deadline:
        time.sleep(0.2)
    # Discarded as a revoke the worker heard: REVOKED, never run, acked.
    assert doomed.state == "REVOKED"
    left = db.execute(f'SELECT count(*) FROM "{schema}".messages WHERE task_id = %s', (doomed.id,))
    assert left.fetchone() == (0,)
