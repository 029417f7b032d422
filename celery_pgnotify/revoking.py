"""Revokes that outlive the workers.

Celery's ``revoke()`` is a broadcast to the workers online at that moment;
each keeps the ids in memory (``celery.worker.state.revoked``). A task
revoked while no worker runs, or while its worker restarts, runs anyway.

On pgnotify the broadcast is also recorded: when this process publishes a
``revoke`` remote-control command, its task ids go to ``<schema>.revoked``
with an expiry (Celery's ``CELERY_WORKER_REVOKE_EXPIRES``, 3 hours by
default; later for a task still scheduled beyond that). Every claim says
whether a message's task is recorded there, and the transport adds such an
id to the worker's revoked set before the worker sees the message: the
worker then treats it as it treats any revoked task (not run, acked, and
REVOKED in the result backend), on both workers.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.serialization import loads

logger = logging.getLogger(__name__)


def _revoke_expires() -> float:
    try:
        from celery.worker.state import REVOKE_EXPIRES as expires
    except ImportError:  # kombu without Celery
        return 10800.0
    return float(expires)


#: Seconds a revoke is remembered: Celery's own worker setting.
REVOKE_EXPIRES = _revoke_expires()


def revoked_by(message: dict[str, Any], exchange: str) -> list[str]:
    """The task ids a remote-control message published by this process
    revokes (none for any other message). Its body is decoded with its own
    content type: this process serialised it a moment ago."""
    if not exchange.endswith(".pidbox"):
        return []
    content_type = message.get("content-type") or "application/json"
    try:
        command = loads(  # type: ignore[no-untyped-call]
            message["body"],
            content_type,
            message.get("content-encoding") or "utf-8",
            accept=[content_type],
        )
    except Exception as exc:  # noqa: BLE001 - not a command we can read: broadcast only
        logger.debug("Remote-control message not read (%s)", exc)
        return []
    if not isinstance(command, dict) or command.get("method") != "revoke":
        return []
    ids = (command.get("arguments") or {}).get("task_id")
    if isinstance(ids, str):
        return [ids]
    if isinstance(ids, list | tuple):
        return [str(i) for i in ids if i is not None]
    return []


def remember_revoked(task_id: Any) -> None:
    """Add ``task_id`` to this worker's revoked set (Celery's own), so the
    worker discards it as a revoke it heard."""
    if not isinstance(task_id, str):
        return
    try:
        from celery.worker import state
    except ImportError:
        return
    state.revoked.add(task_id)
