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


# -- results (scenarios that run with a result backend) ----------------------------
if os.environ.get("COMPAT_RESULT_BACKEND"):
    app.conf.result_backend = os.environ["COMPAT_RESULT_BACKEND"]
    app.conf.result_backend_transport_options = json.loads(
        os.environ.get("COMPAT_RESULT_OPTIONS", "{}")
    )
    # Read back at once: not kept in the shared reference Redis for a day.
    app.conf.result_expires = 600


@app.task(ignore_result=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(ignore_result=False)
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task(ignore_result=False)
def fails(message: str) -> None:
    raise ValueError(message)


# -- time limits -------------------------------------------------------------------
@app.task(time_limit=1)
def overruns(tag: str) -> None:
    log(tag, "start")
    time.sleep(5)
    log(tag, "done")


@app.task(soft_time_limit=1)
def overruns_softly(tag: str) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    log(tag, "start")
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        log(tag, "soft-limit")


# -- priorities --------------------------------------------------------------------
@app.task
def ordered(tag: str, label: str) -> None:
    log(tag, label)


# -- beat --------------------------------------------------------------------------
if os.environ.get("COMPAT_BEAT"):
    app.conf.beat_schedule = {
        "every-second": {"task": "compat_tests.app.echo", "schedule": 1.0, "args": ("beat",)}
    }


# -- signals: the worker fires Celery's own, at the same moments ----------------------
@app.task
def signalled(tag: str, fail: bool = False) -> None:
    if fail:
        raise KeyError(tag)


def _tag_of(task_name: str | None, args: object) -> str | None:
    if task_name != "compat_tests.app.signalled" or not isinstance(args, (list, tuple)):
        return None
    return str(args[0]) if args else None


def _connect_signals() -> None:
    from celery import signals

    def received(sender: object = None, request: object = None, **_: object) -> None:
        tag = _tag_of(getattr(request, "name", None), getattr(request, "args", None))
        if tag:
            log(tag, "task_received")

    def by_task(name: str) -> object:
        def handler(sender: object = None, args: object = None, **kwargs: object) -> None:
            request = kwargs.get("request")
            args = args if args is not None else getattr(request, "args", None)
            if args is None and getattr(sender, "request", None) is not None:
                args = sender.request.args  # type: ignore[union-attr]
            tag = _tag_of(getattr(sender, "name", None), args)
            if tag:
                log(tag, name)

        return handler

    signals.task_received.connect(received, weak=False)
    for name in ("task_prerun", "task_success", "task_failure", "task_postrun"):
        getattr(signals, name).connect(by_task(name), weak=False)


_connect_signals()
