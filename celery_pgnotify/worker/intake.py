"""From a delivered task message to a job on the pool.

A message is checked (headers, registered task, body; ``validate.py``),
discarded if revoked or expired, held if its ETA or its task's rate limit
says so (``holding.py``), else recorded in the :class:`~.state.Ledger` and
submitted to the pool. Whatever goes wrong costs that message only: it is
dead-lettered with the reason, and the worker goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import signals
from kombu.message import Message
from kombu.serialization import prepare_accept_content

from celery_pgnotify.envelope import parse_time
from celery_pgnotify.worker.child import Job
from celery_pgnotify.worker.events import WorkerEvents
from celery_pgnotify.worker.holding import Holding
from celery_pgnotify.worker.pool import Pool
from celery_pgnotify.worker.settling import Settler, refuse
from celery_pgnotify.worker.state import Ledger
from celery_pgnotify.worker.validate import Refused, check_task_headers, decode_body

logger = logging.getLogger(__name__)


def _request_view(message: Message, name: str, body: tuple[Any, Any, Any], hostname: str) -> Any:
    """What ``task_received`` handlers read of Celery's Request: id, name,
    args, kwargs, eta, expires, hostname, delivery_info, message."""
    from celery.app.task import Context

    return Context(
        message.headers,
        name=name,
        task_name=name,
        args=body[0],
        kwargs=body[1],
        hostname=hostname,
        delivery_info=message.delivery_info,
        message=message,
    )


class Intake:
    def __init__(
        self,
        app: Any,
        hostname: str,
        pool: Pool,
        ledger: Ledger,
        holding: Holding,
        settler: Settler,
        events: WorkerEvents,
        on_hold: Callable[[], None],
        sender: Any = None,
    ) -> None:
        self._app = app
        self._sender = sender  # of Celery's task_received / task_unknown signals
        self._hostname = hostname
        self._pool = pool
        self._ledger = ledger
        self._holding = holding
        self._settler = settler
        self._events = events
        self._on_hold = on_hold  # an ETA message was held: widen the prefetch window
        self._accept: set[str] = prepare_accept_content(app.conf.accept_content)
        self._default_soft_limit = app.conf.task_soft_time_limit  # read once, as Celery's worker

    def on_message(self, message: Message, held: bool = False) -> None:
        """A task message arrived (``held``: one held here comes due)."""
        try:
            self._receive(message, held)
        except Exception as exc:  # noqa: BLE001 - one message, never the pool
            logger.exception("celery-pg worker failed on message %s", message.delivery_tag)
            if not message.acknowledged:
                refuse(message, f"celery-pg worker failed on this message: {exc!r}")

    def release_due(self) -> bool:
        """Take in the held messages now due; True if an ETA one was among them."""
        released = False
        for message, is_eta in self._holding.due(time.time()):
            released |= is_eta
            self.on_message(message, held=True)
        return released

    def _receive(self, message: Message, held: bool) -> None:
        headers = message.headers
        try:
            if not isinstance(headers, dict) or "task" not in headers:
                # A task message's headers were checked as the transport took
                # it (envelope.parse); this one is not a task message at all.
                check_task_headers(headers)
            name, task_id = headers["task"], headers["id"]
            task = self._app.tasks.get(name)
            if task is None:
                refuse(message, f"unregistered task {name!r}")
                # As Celery's worker: the signal follows the reject.
                signals.task_unknown.send(
                    sender=self._sender, message=message, exc=None, name=name, id=task_id
                )
                return
            body = decode_body(message, self._accept)
        except Refused as exc:
            refuse(message, str(exc))
            return
        if not held:
            logger.debug("Received %s[%s]", name, task_id)
            if signals.task_received.receivers:  # the request view costs a copy
                signals.task_received.send(
                    sender=self._sender, request=_request_view(message, name, body, self._hostname)
                )
        if task_id in self._ledger.revoked:
            self._settler.discard(message, task, task_id, "revoked")
            return
        expires = parse_time(headers.get("expires"))
        if expires is not None and expires < time.time():
            self._settler.discard(message, task, task_id, "expired")
            return
        eta = parse_time(headers.get("eta"))
        if eta is not None and eta > time.time():
            # Held here, unacked: the lease keeps it safe however long; the
            # prefetch window grows so held tasks do not starve the pool.
            self._holding.hold(eta, message, is_eta=True)
            self._on_hold()
            return
        wait = self._holding.rate_wait(task)
        if wait:
            # Over the task's rate_limit: held here until a token is due,
            # within the prefetch window (as Celery's worker does).
            self._holding.hold(time.time() + wait, message, is_eta=False)
            return
        self._dispatch(message, task, name, task_id, headers, body, expires)

    def _dispatch(
        self,
        message: Message,
        task: Any,
        name: str,
        task_id: str,
        headers: dict[str, Any],
        body: tuple[Any, Any, Any],
        expires: float | None,
    ) -> None:
        props = message.properties
        info = message.delivery_info
        request = dict(headers)
        request.update(
            reply_to=props.get("reply_to"),
            correlation_id=props.get("correlation_id"),
            hostname=self._hostname,
            delivery_info={
                "exchange": info.get("exchange"),
                "routing_key": info.get("routing_key"),
                "priority": props.get("priority"),
                "redelivered": info.get("redelivered"),
            },
        )
        limits = headers.get("timelimit") or (None, None)
        soft = limits[1] if len(limits) > 1 else None
        job = Job(
            task_id,
            name,
            request,
            body,  # decoded once, here; the child does not decode again
            soft_time_limit=soft or task.soft_time_limit or self._default_soft_limit,
            tag=message.delivery_tag,
            expires=expires,
        )
        self._ledger.inflight[message.delivery_tag] = (message, task)
        self._events.received(task_id, name, headers)
        self._pool.submit(job)
