"""Ordinary Celery tasks: nothing here knows which broker carries them."""

import logging
import random

from proj.celery import app

logger = logging.getLogger(__name__)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task(bind=True, max_retries=3)
def flaky(self, value: str) -> str:  # type: ignore[no-untyped-def]
    # Fails its first attempt, then succeeds: shows Celery's retry machinery.
    if self.request.retries == 0:
        raise self.retry(countdown=0.5)
    return f"{value} after {self.request.retries} retry"


@app.task(priority=9)
def urgent() -> str:
    return "urgent"


@app.task
def heartbeat() -> str:
    return f"beat {random.randint(0, 999)}"
