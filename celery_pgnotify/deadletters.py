"""Dead letters: messages no consumer can or will process, kept with the reason.

A message lands in ``<schema>.dead_letters`` when

* its stored text is not a kombu message (written by hand, or by SQL gone
  wrong; see :mod:`celery_pgnotify.envelope`), or it is larger than
  ``max_message_size``: the transport moves it as it claims it, before any
  consumer sees it;
* a consumer's callback raised on it: it costs that message, not the worker;
* a consumer rejects it without requeue (``dead_letter_rejected``, on by
  default): ``celery-pg worker`` says why (unregistered task, a content type
  the app does not accept, a malformed body, an invalid header); the stock
  ``celery worker`` rejects unregistered tasks and invalid messages, and its
  ``task_unknown``/``task_rejected`` signals fill in the reason.

``celery-pg dead-letters list|retry|drop`` shows, requeues or deletes them.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

logger = logging.getLogger(__name__)

#: The reason recorded when a consumer rejects a message without saying why.
REJECTED = "rejected by the consumer (requeue=False)"


def reject_with_reason(message: Any, reason: str) -> None:
    """Reject ``message`` without requeue; on pgnotify it is dead-lettered
    with ``reason`` (on other transports it is simply rejected)."""
    channel = getattr(message, "channel", None)
    note = getattr(channel, "note_reject_reason", None)
    if note is not None:
        note(message.delivery_tag, reason)
    message.reject(requeue=False)


def _record_reason(reason: str, message: Any) -> None:
    channel = getattr(message, "channel", None)
    opts = getattr(channel, "_opts", None)
    if channel is None or not getattr(opts, "dead_letter_rejected", False):
        return
    try:
        channel._execute(
            channel._stmts.dead_letter_reason,
            {"id": message.delivery_tag, "reason": reason[:2000]},
        )
    except psycopg.Error as exc:  # the row keeps the generic reason
        logger.debug("Could not record the reject reason: %s", exc)


def _on_task_unknown(sender: Any = None, message: Any = None, name: Any = None, **_: Any) -> None:
    if not getattr(sender, "gives_reject_reasons", False):  # celery-pg worker already did
        _record_reason(f"unregistered task {name!r}", message)


def _on_task_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    if not getattr(sender, "gives_reject_reasons", False):
        _record_reason(f"invalid task message: {exc!r}" if exc else "unknown message type", message)


def connect_celery_signals() -> None:
    """The stock worker rejects first and says why in a signal afterwards;
    the signal fills in the dead letter's reason."""
    try:
        from celery import signals
    except ImportError:  # kombu without Celery
        return
    signals.task_unknown.connect(_on_task_unknown, weak=False, dispatch_uid="pgnotify-unknown")
    signals.task_rejected.connect(_on_task_rejected, weak=False, dispatch_uid="pgnotify-rejected")
