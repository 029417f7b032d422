"""Scheduled tasks to their queues when due (broker-held ETAs).

A task published with an ETA more than ``broker_eta_threshold`` ahead waits
in ``scheduled``, where no claim looks: neither a worker's memory nor the
queue's ready index holds it. Every consumer's LISTEN thread learns, with
each heartbeat, when the first scheduled task of its queues is due, and moves
the tasks due within :data:`~celery_pgnotify.options.PROMOTE_AHEAD` seconds
to their queues at that moment (in due order, notifying each queue once).
Consumers of the same queues that promote at the same moment share the rows
(SKIP LOCKED); the worker that gets a task early holds it until its ETA, as
Celery does. The threshold is at least two heartbeats plus PROMOTE_AHEAD, so
a consumer always hears of a new task before it must promote it.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Any

import psycopg

from celery_pgnotify.options import PROMOTE_AHEAD
from celery_pgnotify.reaper import STALLED
from celery_pgnotify.statements import Statements

logger = logging.getLogger(__name__)

#: Most scheduled tasks moved to their queues by one statement.
PROMOTE_BATCH = 1000


class Promoter:
    """When to promote next, and the promotion itself (on the LISTEN thread)."""

    def __init__(self, stmts: Statements, retry_after: float, fresh: float) -> None:
        self._stmts = stmts
        self._retry_after = retry_after
        self._fresh = fresh  # see TransportOptions.fresh
        # Batches stop after this long: the thread also owes the heartbeat,
        # and a backlog fallen due at once (after an outage) must not delay
        # it past lease_timeout. What is left is moved on the next turn.
        self._budget = retry_after
        #: Monotonic time of the next promotion; None while nothing is scheduled.
        self.next_at: float | None = None

    def plan(self, due_in: float | None) -> None:
        """The first scheduled task is due in ``due_in`` seconds (None: none is)."""
        if due_in is None:
            self.next_at = None
        else:
            self.next_at = time.monotonic() + max(0.0, float(due_in) - PROMOTE_AHEAD)

    def is_due(self) -> bool:
        return self.next_at is not None and time.monotonic() >= self.next_at

    def promote(self, conn: psycopg.Connection[Any], queues: list[str]) -> None:
        """Move the tasks due now (or within PROMOTE_AHEAD) to their queues,
        then plan the next promotion."""
        params = {
            "queues": queues,
            "ahead": PROMOTE_AHEAD,
            "limit": PROMOTE_BATCH,
            "prefix": self._stmts.channel_prefix,
            "fresh": self._fresh,
            "wake_all": False,  # it commits at once
        }
        stop_at = time.monotonic() + self._budget
        try:
            while True:  # at least one batch a turn
                rows = conn.execute(self._stmts.promote, params).fetchall()
                moved = sum(n for _queue, n, _notified in rows)
                if moved:
                    logger.debug("%d scheduled task(s) due: moved to their queues", moved)
                if moved < PROMOTE_BATCH:
                    break
                if time.monotonic() >= stop_at:
                    self.next_at = time.monotonic()  # more are due: next turn
                    return
            due = conn.execute(self._stmts.next_due, {"queues": queues}).fetchone()
        except STALLED as exc:
            logger.warning("Scheduled tasks not moved to their queues yet (%s); retrying", exc)
            self.next_at = time.monotonic() + self._retry_after
            return
        self.plan(due[0] if due else None)


def inspect_entry(
    payload: str, due_at: datetime, rank: int, hostname: str
) -> dict[str, Any] | None:
    """A scheduled task as ``celery inspect scheduled`` shows one (None for a
    row that is not a task message: the claim will dead-letter it)."""
    try:
        message = json.loads(payload)
        headers = message["headers"]
        props = message.get("properties") or {}
        if not isinstance(headers, dict) or not isinstance(props, dict):
            return None
    except (ValueError, TypeError, KeyError, RecursionError):  # any row may be written by SQL
        return None
    return {
        "eta": headers.get("eta") or due_at.isoformat(),
        "priority": props.get("priority", rank),
        "request": {
            "id": headers.get("id"),
            "name": headers.get("task"),
            "args": headers.get("argsrepr"),
            "kwargs": headers.get("kwargsrepr"),
            "type": headers.get("task"),
            "hostname": hostname,
            "time_start": None,
            "acknowledged": False,
            "delivery_info": props.get("delivery_info"),
            "worker_pid": None,
            # Not in this worker's memory: waiting in the database until due.
            "held_by": "broker",
        },
    }
