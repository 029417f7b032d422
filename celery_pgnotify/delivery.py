"""Claiming and delivering for one transport: the consuming half of its event loop.

kombu's virtual transports poll each queue; this one is woken. The
:class:`Delivery` of a transport knows which queues this process consumes
(and on which channel), which of them were notified and may hold work
(*pending*), and how to claim and hand their messages to kombu's callbacks.
It runs in one of two loops:

- ``drain_events`` (``celery-pg worker``, kombu consumers): claim what is
  pending, else block on the listener's wake-up descriptor;
- Celery's hub (the stock worker): the descriptor is a reader of the hub,
  a timer re-reads every queue each ``polling_interval``, and a tick before
  the hub blocks resumes claims that waited for prefetch room.

Acks made on the loop's thread, or inside a delivery batch, are deferred and
leave together: with the next claim of their channel, else in one statement
before the loop blocks again (:meth:`Delivery.batched_acks`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from celery_pgnotify.connect import wait_readable
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.session import ConsumerSession


class Claiming(Protocol):
    """A channel, as delivery sees it (``transport.Channel``)."""

    #: rows of its last claim dead-lettered as they were taken
    refused: int

    def claim_limit(self) -> int: ...

    def claim(self, queue: str, limit: int) -> list[dict[str, Any]]: ...

    def requeue_taken(self, tags: Iterable[int]) -> None: ...

    def consumer_failed(self, delivery_tag: int, exc: BaseException) -> None: ...

    def flush_acks(self) -> None: ...


class Delivery:
    def __init__(
        self,
        session: ConsumerSession,
        opts: TransportOptions,
        callback_for: Callable[[str], Callable[[Any], None] | None],
        connection_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._session = session
        self._interval = opts.polling_interval
        self._callback_for = callback_for  # kombu's callback of a queue
        self._connection_errors = connection_errors
        #: queue -> the channel consuming it
        self.consumers: dict[str, Claiming] = {}
        #: queues notified (or due a fallback read) that may hold work
        self.pending: set[str] = set()
        #: channels with deferred acks to write
        self.ack_channels: set[Claiming] = set()
        self._delivering: int | None = None  # the thread inside a delivery batch
        self.loop_thread: int | None = None  # the event loop's thread, once registered
        # The event loop registered with (the stock worker's hub) and its
        # polling timer: left when the connection closes.
        self._loop: Any = None
        self._poll_timer: Any = None
        self._woken = threading.Event()
        self._next_poll = time.monotonic() + self._interval

    # -- what is consumed ----------------------------------------------------------

    def consume(self, queue: str, channel: Claiming) -> None:
        self.consumers[queue] = channel
        self.pending.add(queue)

    def cancel(self, queue: str) -> None:
        self.consumers.pop(queue, None)
        self.pending.discard(queue)

    # -- claiming and delivering ---------------------------------------------------

    def claim_pending(self) -> bool:
        """Claim and deliver from pending queues; True if anything was delivered."""
        delivered = False
        try:
            for queue in list(self.pending):
                channel = self.consumers.get(queue)
                if channel is None:
                    self.pending.discard(queue)
                    continue
                limit = channel.claim_limit()
                if not limit:
                    continue  # prefetch full: stays pending until acks free room
                messages = channel.claim(queue, limit)
                if len(messages) + channel.refused < limit:  # the queue is drained
                    self.pending.discard(queue)
                if self._deliver_batch(queue, channel, messages):
                    delivered = True
        finally:
            self.flush_acks()
        return delivered

    def _deliver_batch(self, queue: str, channel: Claiming, messages: list[dict[str, Any]]) -> bool:
        callback = self._callback_for(queue)
        if callback is None:
            channel.requeue_taken(m["properties"]["delivery_tag"] for m in messages)
            return False
        with self.batched_acks():
            for i, message in enumerate(messages):
                try:
                    callback(message)
                except self._connection_errors:
                    raise
                except Exception as exc:  # noqa: BLE001 - costs this message, never the batch
                    channel.consumer_failed(message["properties"]["delivery_tag"], exc)
                except BaseException:
                    # Claimed but never handed over: back to the queue at once.
                    rest = messages[i + 1 :]
                    channel.requeue_taken(m["properties"]["delivery_tag"] for m in rest)
                    raise
        return bool(messages)

    # -- acks ----------------------------------------------------------------------

    @contextlib.contextmanager
    def batched_acks(self, write: bool = True) -> Iterator[None]:
        """Acks made by this thread inside the block leave in one statement:
        at its end, or (``write`` false) with the claim of this thread's next
        ``drain_events``, which writes them before it blocks anyway."""
        previous, self._delivering = self._delivering, threading.get_ident()
        try:
            yield
        finally:
            self._delivering = previous
            if write:
                self.flush_acks()

    def defer_acks_here(self) -> bool:
        """True on the event loop's thread, or inside a delivery batch."""
        me = threading.get_ident()
        return me == self._delivering or me == self.loop_thread

    def flush_acks(self) -> None:
        while self.ack_channels:
            self.ack_channels.pop().flush_acks()

    # -- drain_events ----------------------------------------------------------------

    def drain_events(self, timeout: float | None) -> None:
        """Deliver what is ready, else block on the LISTEN wake-up.

        Returns after delivering, or when :meth:`wakeup` was called; raises
        ``TimeoutError`` when ``timeout`` passes with nothing to do.
        """
        listener = self._session.listener()
        clock = time.monotonic
        deadline = None if timeout is None else clock() + timeout
        while True:
            self._session.check()
            self.pending |= listener.take_notified()
            if self.claim_pending() or self._take_wakeup():
                return
            now = clock()
            if now >= self._next_poll:
                self.pending |= set(self.consumers)
                self._next_poll = now + self._interval
                continue
            if deadline is not None and now >= deadline:
                raise TimeoutError()
            wait = self._next_poll - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            wait_readable([listener.wake_fd], wait)

    def wakeup(self) -> None:
        """Make a blocked :meth:`drain_events` return (thread-safe)."""
        self._woken.set()
        listener = self._session.current()
        if listener is not None:
            listener.wake()

    def _take_wakeup(self) -> bool:
        if self._woken.is_set():
            self._woken.clear()
            return True
        return False

    # -- Celery's hub ------------------------------------------------------------------

    def register(self, loop: Any) -> None:
        listener = self._session.listener()
        self.loop_thread = threading.get_ident()
        self._loop = loop
        loop.add_reader(listener.wake_fd, self._on_wake)
        self._poll_timer = loop.call_repeatedly(self._interval, self._poll_all)
        loop.on_tick.add(self._on_tick)

    def leave_event_loop(self) -> None:
        """Take the reader, timer and tick callback out of the event loop.
        Celery does not ask when it reconnects: it drops the readers and
        makes a new transport, and the old one's timer and tick would
        otherwise go on running (and claiming) for the process's life."""
        loop, self._loop = self._loop, None
        timer, self._poll_timer = self._poll_timer, None
        self.loop_thread = None
        if loop is None:
            return
        if timer is not None:
            timer.cancel()
        loop.on_tick.discard(self._on_tick)
        listener = self._session.current()
        if listener is not None and listener.wake_fd >= 0:
            loop.remove(listener.wake_fd)

    def _on_wake(self, *args: Any) -> None:
        listener = self._session.current()
        if listener is not None:
            self.pending |= listener.take_notified()
        self.claim_pending()

    def _on_tick(self) -> None:
        # Runs before the loop blocks: resume claiming if acks have freed
        # prefetch room (the acks leave with the claim), and write the acks
        # no claim took.
        self._session.check()
        if self.pending:
            self.claim_pending()
        self.flush_acks()

    def _poll_all(self) -> None:
        self.pending |= set(self.consumers)
        self.claim_pending()
