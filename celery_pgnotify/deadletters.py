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

import weakref
from typing import Any, Protocol, runtime_checkable

#: The reason recorded when a consumer rejects a message without saying why.
REJECTED = "rejected by the consumer (requeue=False)"

#: Senders of Celery's ``task_unknown`` / ``task_rejected`` signals that
#: dead-letter with a reason of their own (``celery-pg worker``'s manager).
_OWN_REASONS: weakref.WeakSet[Any] = weakref.WeakSet()


def gives_own_reasons(sender: Any) -> None:
    """``sender`` dead-letters the messages it rejects with their reason
    already: its signals must not overwrite it."""
    _OWN_REASONS.add(sender)


@runtime_checkable
class KeepsReasons(Protocol):
    """A channel that dead-letters rejected messages with a reason (the
    pgnotify transport's; other transports' channels just reject)."""

    def note_reject_reason(self, delivery_tag: int, reason: str) -> None:
        """Say why the next ``reject(requeue=False)`` of the message happens."""

    def record_reject_reason(self, delivery_tag: int, reason: str) -> None:
        """Replace the reason of a message dead-lettered already."""


def reject_with_reason(message: Any, reason: str) -> None:
    """Reject ``message`` without requeue; on pgnotify it is dead-lettered
    with ``reason`` (on other transports it is simply rejected)."""
    if isinstance(message.channel, KeepsReasons):
        message.channel.note_reject_reason(message.delivery_tag, reason)
    message.reject(requeue=False)


def _record_reason(reason: str, message: Any) -> None:
    channel = getattr(message, "channel", None)  # Celery's signal may pass none
    if isinstance(channel, KeepsReasons):
        channel.record_reject_reason(message.delivery_tag, reason)


def _on_task_unknown(sender: Any = None, message: Any = None, name: Any = None, **_: Any) -> None:
    if sender not in _OWN_REASONS:  # celery-pg worker said why already
        _record_reason(f"unregistered task {name!r}", message)


def _on_task_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    if sender not in _OWN_REASONS:
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
