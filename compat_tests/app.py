"""The Celery project every compatibility scenario runs, on every broker.

Nothing in it knows the broker: the scenarios set ``COMPAT_BROKER_URL``.
Tasks record what they did in a PostgreSQL table (not the broker), so the
same assertions hold on pgnotify, Redis and RabbitMQ.
"""

from __future__ import annotations

import json
import os
import time

import psycopg
from celery import Celery

app = Celery("compat")
app.conf.broker_url = os.environ.get("COMPAT_BROKER_URL", "memory://")
app.conf.broker_transport_options = json.loads(os.environ.get("COMPAT_OPTIONS", "{}"))
PREFIX = os.environ.get("COMPAT_QUEUE_PREFIX", "compat")
app.conf.task_default_queue = f"{PREFIX}-default"
app.conf.task_routes = {"compat_tests.app.routed": {"queue": f"{PREFIX}-other"}}
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True
# Priorities on RabbitMQ need a queue declared with x-max-priority.
app.conf.task_queue_max_priority = 10

LOG_DSN = os.environ.get("COMPAT_LOG_DSN", "")
LOG_TABLE = os.environ.get("COMPAT_LOG_TABLE", "compat_log")


def log(tag: str, event: str, data: object = None) -> None:
    with psycopg.connect(LOG_DSN, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{LOG_TABLE}" (tag, event, data) VALUES (%s, %s, %s)',  # noqa: S608
            (tag, event, json.dumps(data)),
        )


@app.task
def echo(tag: str, *args: object, **kwargs: object) -> None:
    log(tag, "echo", {"args": list(args), "kwargs": kwargs})


@app.task(bind=True, max_retries=3)
def retrying(self, tag: str, failures: int) -> None:  # type: ignore[no-untyped-def]
    log(tag, f"attempt-{self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(countdown=0.2)


@app.task(autoretry_for=(ValueError,), retry_backoff=0.1, retry_jitter=False, max_retries=2)
def autoretried(tag: str) -> None:
    log(tag, "attempt")
    raise ValueError("always")


@app.task
def routed(tag: str) -> None:
    log(tag, "routed")


@app.task
def spawner(tag: str) -> None:
    log(tag, "spawner")
    echo.delay(tag + "-child")


@app.task(acks_late=True)
def sleeper(tag: str, seconds: float) -> None:
    log(tag, "start")
    time.sleep(seconds)
    log(tag, "done")
