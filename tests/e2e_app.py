"""The Celery project the end-to-end tests run in real worker processes.

Configured from the environment by the tests; every task records what it
did in a log table so the tests can count executions.
"""

from __future__ import annotations

import json
import os
import time

import psycopg
from celery import Celery


def configure(app: Celery, results: bool = False) -> Celery:
    """The broker (and, with ``results``, the result backend) the tests chose,
    from the environment (see :mod:`tests.workers`)."""
    app.conf.broker_url = os.environ.get("PGNOTIFY_BROKER_URL", "pgnotify://localhost/postgres")
    app.conf.broker_transport_options = json.loads(os.environ.get("PGNOTIFY_OPTIONS", "{}"))
    if results:
        app.conf.result_backend = app.conf.broker_url
    else:
        app.conf.task_ignore_result = True
    app.conf.worker_hijack_root_logger = True
    app.conf.broker_connection_retry_on_startup = True
    return app


app = configure(Celery("e2e"))

if os.environ.get("PGNOTIFY_E2E_BEAT"):
    app.conf.beat_schedule = {
        "every-second": {"task": "tests.e2e_app.record", "schedule": 1.0, "args": ("beat",)},
    }

app.conf.pgnotify_autoscale_keepalive = float(os.environ.get("PGNOTIFY_E2E_KEEPALIVE", "30"))

LOG_DSN = os.environ.get("PGNOTIFY_LOG_DSN", "")
LOG_TABLE = os.environ.get("PGNOTIFY_LOG_TABLE", "e2e_log")


def log(tag: str, event: str) -> None:
    with psycopg.connect(LOG_DSN, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{LOG_TABLE}" (tag, event, pid) VALUES (%s, %s, %s)',  # noqa: S608
            (tag, event, os.getpid()),
        )


@app.task
def record(tag: str) -> None:
    log(tag, "run")


@app.task(bind=True, max_retries=5)
def flaky(self, tag: str, failures: int) -> None:  # type: ignore[no-untyped-def]
    log(tag, f"attempt-{self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(countdown=0.2)
    log(tag, "done")


@app.task(acks_late=True)
def slow(tag: str, seconds: float) -> None:
    log(tag, "start")
    time.sleep(seconds)
    log(tag, "done")


@app.task
def noop() -> None:
    return None


@app.task(acks_late=True, reject_on_worker_lost=True)
def slow_requeued(tag: str, seconds: float) -> None:
    log(tag, "start")
    time.sleep(seconds)
    log(tag, "done")


@app.task
def whoami(tag: str) -> None:
    log(tag, f"pid-{os.getpid()}")


@app.task
def forked_by(tag: str) -> None:
    """Log the thread of the parent that forked this process (a forked
    child carries on as that thread)."""
    import threading

    log(tag, threading.current_thread().name)


@app.task(time_limit=1)
def overrun(tag: str) -> None:
    log(tag, "start")
    time.sleep(10)
    log(tag, "done")


@app.task(soft_time_limit=1)
def soft(tag: str) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    log(tag, "start")
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        log(tag, "soft-limit")


@app.task(rate_limit="2/s")
def limited(tag: str) -> None:
    log(tag, "run")


@app.task
def check_row(tag: str, table: str, key: str) -> None:
    """Record whether the row the task is about is visible to it."""
    with psycopg.connect(LOG_DSN, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT 1 FROM "{table}" WHERE key = %s',  # noqa: S608
            (key,),
        ).fetchone()
    log(tag, "found" if row else "missing")


MARK_DIR = os.environ.get("PGNOTIFY_MARK_DIR", "")


@app.task(acks_late=True, reject_on_worker_lost=True)
def mark(index: int, seconds: float = 0.0) -> None:
    """Count an execution in a file of this process (no database needed,
    so counting survives the database's own faults)."""
    if seconds:
        time.sleep(seconds)
    with open(os.path.join(MARK_DIR, f"{os.getpid()}.marks"), "a") as f:
        f.write(f"{index}\n")


@app.task
def ignored(tag: str) -> None:
    """Ends with Celery's Ignore: neither a success nor a failure."""
    from celery.exceptions import Ignore

    log(tag, "run")
    raise Ignore()
