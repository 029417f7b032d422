"""Celery's monitoring events (``-E``) sent by ``celery-pg worker``: the
worker's online/heartbeat/offline and each task's received/started/ended, in
the fields Flower and ``celery events`` read. Best effort, as in Celery: a
failed send is logged and never costs a task."""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

from celery_pgnotify.worker.pool import Event, Pool

logger = logging.getLogger(__name__)

#: Seconds between worker-heartbeat events (Celery's default frequency).
HEARTBEAT_FREQ = 2.0


class WorkerEvents:
    def __init__(self, app: Any, hostname: str, enabled: bool, pool: Pool, processed: Any) -> None:
        self._app = app
        self._hostname = hostname
        self.enabled = enabled
        self._pool = pool
        self._processed = processed  # () -> tasks finished so far
        self._dispatcher: Any = None
        self._next_heartbeat = 0.0

    def open(self, connection: Any) -> None:
        """Start sending on ``connection`` (with ``-E``): worker-online."""
        if not self.enabled:
            return
        self._dispatcher = self._app.events.Dispatcher(
            connection, hostname=self._hostname, enabled=True, groups=["worker", "task"]
        )
        self.send("worker-online", **self._worker_info())

    def close(self, offline: bool) -> None:
        if offline:
            self.send("worker-offline", **self._worker_info())
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None

    def tick(self) -> None:
        """A worker-heartbeat every :data:`HEARTBEAT_FREQ` seconds."""
        if self._dispatcher is not None and time.monotonic() >= self._next_heartbeat:
            self._next_heartbeat = time.monotonic() + HEARTBEAT_FREQ
            self.send("worker-heartbeat", **self._worker_info())

    def send(self, type_: str, **fields: Any) -> None:
        if self._dispatcher is None:
            return
        try:
            self._dispatcher.send(type_, **fields)
        except Exception as exc:  # noqa: BLE001 - events are best effort, as in Celery
            logger.warning("Could not send %s event: %s", type_, exc)

    def received(self, task_id: str, name: str, headers: dict[str, Any]) -> None:
        self.send(
            "task-received",
            uuid=task_id,
            name=name,
            args=headers.get("argsrepr"),
            kwargs=headers.get("kwargsrepr"),
            root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"),
            retries=headers.get("retries", 0),
            eta=headers.get("eta"),
            expires=headers.get("expires"),
        )

    def ended(self, event: Event, outcome: str) -> None:
        uuid = event.task_id
        if outcome == "success":
            self.send("task-succeeded", uuid=uuid, result=event.summary, runtime=event.runtime)
        elif outcome == "retry":  # a new message carries the retry
            self.send("task-retried", uuid=uuid, exception=event.summary, traceback="")
        elif outcome == "reject":
            self.send("task-rejected", uuid=uuid, requeue=event.requeue)
            if not event.requeue:
                self.send("task-failed", uuid=uuid, exception=event.summary, traceback="")
        elif outcome in ("failure", "timeout"):
            self.send("task-failed", uuid=uuid, exception=event.summary, traceback="")

    def revoked(self, task_id: str, expired: bool) -> None:
        self.send("task-revoked", uuid=task_id, terminated=False, signum=None, expired=expired)

    def _worker_info(self) -> dict[str, Any]:
        from celery import __version__

        return {
            "freq": HEARTBEAT_FREQ,
            "sw_ident": "celery-pg",
            "sw_ver": __version__,
            "sw_sys": platform.system(),
            "active": len(self._pool.running()),
            "processed": self._processed(),
        }
