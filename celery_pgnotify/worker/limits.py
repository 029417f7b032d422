"""Hard time limits and cancellation of running tasks.

A task is cancelled (its hard time limit passed, or it was revoked with
``terminate``) by SIGUSR1 to its child, which raises in the task; a child
that ignores it for ``pgnotify_cancel_grace`` seconds is killed. Soft time
limits are the child's own (see ``child.py``).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping
from typing import Any

from kombu.message import Message

from celery_pgnotify.worker.pool import Pool

logger = logging.getLogger(__name__)


class Limits:
    """When each running task started, and the ones being cancelled."""

    def __init__(self, app: Any, pool: Pool, grace: float) -> None:
        self._default_limit = app.conf.task_time_limit  # read once, as Celery's worker does
        self._pool = pool
        self._grace = grace  # SIGUSR1 to SIGKILL
        self._started: dict[int, float] = {}  # delivery tag -> monotonic start
        #: delivery tag -> (why, monotonic time to SIGKILL if still running)
        self._cancelling: dict[int, tuple[str, float]] = {}

    def started(self, tag: int) -> None:
        self._started[tag] = time.monotonic()

    def was_started(self, tag: int) -> bool:
        return tag in self._started

    def ended(self, tag: int) -> str | None:
        """Forget an ended task; returns why it was cancelled, if it was."""
        self._started.pop(tag, None)
        cancelled = self._cancelling.pop(tag, None)
        return None if cancelled is None else cancelled[0]

    def cancel(self, tag: int, task_id: str, why: str) -> None:
        if tag in self._cancelling:
            return
        logger.warning("Cancelling %s (%s): SIGUSR1 to its child", task_id, why)
        self._cancelling[tag] = (why, time.monotonic() + self._grace)
        self._pool.cancel(tag, signal.SIGUSR1)

    def enforce(self, inflight: Mapping[int, tuple[Message, Any]]) -> None:
        """Cancel tasks past their hard time limit; kill those that ignore it."""
        now = time.monotonic()
        running = self._pool.running()
        for tag, (_why, kill_at) in list(self._cancelling.items()):
            if now >= kill_at and tag in running:
                logger.error("Task %s ignored SIGUSR1; killing its child", running[tag][2].task_id)
                self._pool.cancel(tag, signal.SIGKILL)
        for tag, started in list(self._started.items()):
            entry = inflight.get(tag)
            if entry is None:
                continue
            limit = self._hard_limit(*entry)
            if limit and now - started > limit:
                self.cancel(tag, entry[0].headers["id"], f"hard time limit ({limit}s) exceeded")

    def _hard_limit(self, message: Message, task: Any) -> float | None:
        limits = (message.headers or {}).get("timelimit") or (None, None)
        limit = limits[0] or task.time_limit or self._default_limit
        return float(limit) if limit else None
