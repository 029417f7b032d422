"""From what a child reports to the fate of the task's message.

The pool's results thread queues :class:`~.pool.Event`\\ s; the main thread
applies them here between two ``drain_events`` calls: the message is acked,
requeued or dead-lettered by Celery's rules (``outcomes.py``), the result
backend learns of cancellations and lost children as Celery's worker tells
it, and the task events go out.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from celery import signals
from kombu.message import Message

from celery_pgnotify.deadletters import reject_with_reason
from celery_pgnotify.worker import outcomes
from celery_pgnotify.worker.events import WorkerEvents
from celery_pgnotify.worker.limits import Limits
from celery_pgnotify.worker.pool import Event
from celery_pgnotify.worker.state import Ledger

logger = logging.getLogger(__name__)


def settle(message: Message, action: str, reason: str = "") -> None:
    """ack/requeue/reject (dead-letter, saying ``reason``), tolerating a
    connection lost meanwhile.

    A message of a lost connection was returned to its queue when that
    connection closed (or comes back when its lease runs out).
    """
    try:
        if action == outcomes.ACK:
            message.ack()
        elif action == outcomes.REQUEUE:
            message.requeue()
        elif reason:
            reject_with_reason(message, reason)
        else:
            message.reject(requeue=False)
    except Exception as exc:  # noqa: BLE001 - logged; the lease covers the message
        logger.warning("Could not %s message %s: %s", action, message.delivery_tag, exc)


def refuse(message: Message, reason: str) -> None:
    """Dead-letter a message no worker can run, saying why."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    logger.error(
        "Dead-lettering message %s (task %r, id %r): %s",
        message.delivery_tag,
        headers.get("task"),
        headers.get("id"),
        reason,
    )
    try:
        reject_with_reason(message, reason)
    except Exception as exc:  # noqa: BLE001 - logged; the lease covers the message
        logger.warning("Could not dead-letter message %s: %s", message.delivery_tag, exc)


class Settler:
    """Applies the pool's events to the jobs in the :class:`Ledger`."""

    def __init__(self, ledger: Ledger, limits: Limits, events: WorkerEvents) -> None:
        self._ledger = ledger
        self._limits = limits
        self._events = events

    def apply_all(self, events: collections.deque[Event]) -> None:
        """Apply every queued event; a failure costs its own message only."""
        inflight = self._ledger.inflight
        while events:
            event = events.popleft()
            entry = inflight.get(event.tag)
            if entry is None:
                continue
            try:
                self._apply(event, *entry)
            except Exception as exc:  # noqa: BLE001 - one message, never the pool
                logger.exception("celery-pg worker failed on %s of %s", event.kind, event.task_id)
                inflight.pop(event.tag, None)
                if not entry[0].acknowledged:
                    refuse(entry[0], f"celery-pg worker failed on this message: {exc!r}")

    def _apply(self, event: Event, message: Message, task: Any) -> None:
        tag = event.tag
        if event.kind == "accepted":
            self._limits.started(tag)
            self._events.send("task-started", uuid=event.task_id)
            if not task.acks_late:
                settle(message, outcomes.ACK)
            return
        del self._ledger.inflight[tag]
        if event.kind == "expired":
            self.discard(message, task, event.task_id, "expired")
            return
        started = self._limits.was_started(tag)
        why = self._finished(tag, event.task_id, task)
        if event.kind == "lost" and why is None:
            self._lost(message, task, event, started)
            return
        outcome = event.outcome or "failure"
        if why is not None:  # we cancelled it: revoked, or out of time
            outcome = "revoked" if why == "revoked" else "timeout"
        self._events.ended(event, outcome)
        action = outcomes.settle(outcome, outcomes.AckRules.of(task), requeue=event.requeue)
        if not message.acknowledged:
            settle(message, action, f"task {outcome}: {event.summary or why}"[:2000])
        logger.debug(
            "Finished %s[%s] (%s) in %.4fs", task.name, event.task_id, outcome, event.runtime
        )

    def _finished(self, tag: int, task_id: str, task: Any) -> str | None:
        """Bookkeeping of an ended task; returns why it was cancelled, if it was."""
        self._ledger.total[task.name] += 1
        why = self._limits.ended(tag)
        if why is not None and not task.ignore_result:
            if why == "revoked":
                task.backend.mark_as_revoked(task_id, "terminated")
            else:
                from celery.exceptions import TimeLimitExceeded

                task.backend.mark_as_failure(task_id, TimeLimitExceeded(why))
        return why

    def discard(self, message: Message, task: Any, task_id: str, why: str) -> None:
        """A revoked or expired task is not run: acked, marked REVOKED."""
        logger.info("Discarding %s task %s[%s]", why, task.name, task_id)
        settle(message, outcomes.ACK)
        if not task.ignore_result:
            task.backend.mark_as_revoked(task_id, why)
        self._events.revoked(task_id, expired=why == "expired")
        signals.task_revoked.send(
            sender=task, request=None, terminated=False, signum=None, expired=why == "expired"
        )

    def _lost(self, message: Message, task: Any, event: Event, started: bool) -> None:
        from billiard.exceptions import WorkerLostError

        exc = WorkerLostError(
            f"Worker exited prematurely: exitcode {event.exitcode} Job: {event.task_id}."
        )
        action = outcomes.settle("lost", outcomes.AckRules.of(task), started=started)
        requeued = action == outcomes.REQUEUE and not message.acknowledged
        if not message.acknowledged:
            settle(message, action, f"task lost: {exc}")
        if not requeued:  # as Celery: a requeued task has not failed
            self._events.send("task-failed", uuid=event.task_id, exception=repr(exc), traceback="")
            if not task.ignore_result:
                task.backend.mark_as_failure(event.task_id, exc, request=None)
        logger.error(
            "Task %s[%s] lost with its child (pid %s); %s",
            task.name,
            event.task_id,
            event.pid,
            "requeued" if requeued else "marked failed",
        )
