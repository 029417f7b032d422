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
import weakref
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import psycopg

from celery_pgnotify.errors import DatabaseUnavailable

if TYPE_CHECKING:
    from celery_pgnotify.options import TransportOptions
    from celery_pgnotify.statements import Statements

logger = logging.getLogger(__name__)

#: The reason recorded when a consumer rejects a message without saying why.
REJECTED = "rejected by the consumer (requeue=False)"

#: Reasons are cut to this many characters.
MAX_REASON = 2000

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


class DeadLettering:
    """The dead-letter methods of :class:`~celery_pgnotify.transport.Channel`."""

    _stmts: Statements
    _opts: TransportOptions
    qos: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reject_reasons: dict[int, str] = {}

    def _execute(self, query: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        raise NotImplementedError  # the channel's

    def dead_letter(self, delivery_tag: int, reason: str) -> None:
        """Move a leased message to ``dead_letters`` with ``reason``."""
        self._execute(self._stmts.dead_letter, {"id": delivery_tag, "reason": reason[:MAX_REASON]})

    def refuse(
        self, queue: str, msg_id: int, reason: str, taken: tuple[int, str | None] | None
    ) -> None:
        """Dead-letter a row no consumer can read, as it is claimed. ``taken``
        (its rank and payload) when a no_ack take deleted it already."""
        logger.error("Dead-lettering message %s of queue %r: %s", msg_id, queue, reason)
        if taken is None:
            self.dead_letter(msg_id, reason)
            return
        rank, payload = taken
        self._execute(
            self._stmts.dead_letter_taken,
            {
                "id": msg_id,
                "queue": queue,
                "rank": rank,
                "payload": payload,
                "reason": reason[:MAX_REASON],
            },
        )

    def consumer_failed(self, delivery_tag: int, exc: BaseException) -> None:
        """The consumer's callback raised on a message: dead-letter it (if it
        is still held), so it costs that message, never the consumer."""
        reason = f"the consumer failed on this message: {exc!r}"
        logger.error("Dead-lettering message %s: %s", delivery_tag, reason, exc_info=exc)
        self.dead_letter(delivery_tag, reason)
        self.qos._quick_ack(delivery_tag)  # its prefetch slot is free again

    def note_reject_reason(self, delivery_tag: int, reason: str) -> None:
        """Say why the next ``reject(requeue=False)`` of ``delivery_tag`` happens."""
        self._reject_reasons[delivery_tag] = reason

    def reject_reason(self, delivery_tag: int) -> str:
        """Why ``delivery_tag`` is rejected now (said once, then forgotten)."""
        return self._reject_reasons.pop(delivery_tag, REJECTED)

    def record_reject_reason(self, delivery_tag: int, reason: str) -> None:
        """Replace the generic reason of a message this channel dead-lettered
        already (the stock worker says why only after rejecting)."""
        if not self._opts.dead_letter_rejected:
            return
        try:
            self._execute(
                self._stmts.dead_letter_reason, {"id": delivery_tag, "reason": reason[:MAX_REASON]}
            )
        except (psycopg.Error, DatabaseUnavailable) as exc:  # the row keeps the generic reason
            logger.debug("Could not record the reject reason: %s", exc)
