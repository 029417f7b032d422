"""The Celery project the result backend tests run in real worker processes.

Broker and result backend are both pgnotify, configured from the environment
(see :mod:`tests.workers`); the backend follows the broker's schema.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from tests.e2e_app import configure, log

app = configure(Celery("results"), results=True)
app.conf.result_extended = True
app.conf.task_track_started = True
if os.environ.get("PGNOTIFY_RESULT_EXPIRES"):
    app.conf.result_expires = float(os.environ["PGNOTIFY_RESULT_EXPIRES"])


class PaymentDeclined(Exception):
    """An application exception that must come back to the caller as itself."""


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task
def echo(value: object) -> object:
    return value


@app.task
def big(size: int) -> str:
    return "x" * size


@app.task
def decline(amount: int) -> None:
    raise PaymentDeclined(f"declined: {amount}")


@app.task
def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


@app.task
def at(when: float, value: int) -> int:
    """Finish at the wall-clock time ``when``: header tasks end together."""
    time.sleep(max(0.0, when - time.time()))
    return value


@app.task
def record_sum(values: list[int], tag: str) -> int:
    log(tag, f"callback-{sum(values)}")
    return sum(values)


@app.task
def on_error(request: object, exc: object, traceback: object, tag: str) -> None:
    log(tag, f"errback-{type(exc).__name__}")


@app.task
def wait_for_subtask() -> int:
    # Forbidden by Celery (disable_sync_subtasks): must fail, not deadlock.
    return int(add.delay(1, 1).get(timeout=5))
