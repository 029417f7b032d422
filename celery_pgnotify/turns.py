"""Consumers take turns: the channels that wake this consumer alone, and
stepping aside when its loop does not answer them.

A publish wakes one consumer that has room (``fragments.wake``), on a
channel of that consumer's own per queue. A consumer whose loop is held up
(a ``-P solo`` worker running a long task, a stalled event loop) would still
look hungry, and would go on being chosen while others wait. So the LISTEN
thread, which runs whatever the loop does, watches its own wake-ups: one the
consuming side has not taken within :data:`PATIENCE` makes it step aside,
in one statement: it is no longer hungry (publishes choose another until its
next claim says otherwise), and the wake-up passes to the next hungry
consumer of the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import psycopg

from celery_pgnotify.options import TransportOptions
from celery_pgnotify.reaper import STALLED
from celery_pgnotify.statements import Statements

logger = logging.getLogger(__name__)

#: Seconds a consumer's loop has to take a wake-up meant for it alone.
PATIENCE = 0.25


class Turns:
    """This consumer's own channels and the wake-ups on them not yet taken."""

    def __init__(self, stmts: Statements, opts: TransportOptions) -> None:
        self._stmts = stmts
        self._opts = opts
        self._lock = threading.Lock()
        self._own: dict[str, str] = {}  # channel -> queue
        self._waiting: dict[str, float] = {}  # queue -> when it was woken alone

    def channels(self, queues: Iterable[str], consumer_id: int) -> dict[str, str]:
        """Its own channel for each of ``queues`` (channel -> queue)."""
        own = {self._stmts.consumer_channel(q, consumer_id): q for q in queues}
        with self._lock:
            self._own = own
        return dict(own)

    def woken(self, channel: str) -> str | None:
        """The queue ``channel`` wakes this consumer alone for, if it is one."""
        with self._lock:
            queue = self._own.get(channel)
            if queue is not None:
                self._waiting.setdefault(queue, time.monotonic())
        return queue

    def taken(self) -> None:
        """The consuming side took its wake-ups: its loop answers."""
        with self._lock:
            self._waiting.clear()

    def next_at(self) -> float | None:
        """When the oldest wake-up not taken runs out of patience."""
        with self._lock:
            return min(self._waiting.values()) + PATIENCE if self._waiting else None

    def step_aside(self, conn: psycopg.Connection[Any], consumer_id: int) -> None:
        """For each wake-up not taken in time: not hungry, and the wake-up
        passed on (see the module docstring)."""
        now = time.monotonic()
        with self._lock:
            late = [q for q, at in self._waiting.items() if now - at >= PATIENCE]
            for queue in late:
                del self._waiting[queue]
        for queue in late:
            logger.debug("Consumer %s busy: passing on a wake-up for %r", consumer_id, queue)
            params = {
                "consumer": consumer_id,
                "queue": queue,
                "prefix": self._stmts.channel_prefix,
                "fresh": self._opts.fresh,
            }
            try:
                conn.execute(self._stmts.step_aside, params)
            except STALLED as exc:
                logger.debug("Could not step aside (%s); the fallback re-read covers it", exc)
