"""Judging other consumers: dead ones' leases go back to their queues.

Every consumer's LISTEN thread offers to reap after each heartbeat; one at a
time does (a transaction advisory lock: the others skip their turn), so the
work does not grow with the fleet. A consumer is dead when it has been silent
for ``lease_timeout``, or silent past ``2 x heartbeat_interval`` with its
session lock free (its session is gone). A reaper whose own heartbeats had a
gap, or whose session is new, judges nobody for ``lease_timeout``: whatever
held it up most likely held the others up too. After reaping it raises the
queues' floors (floors.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from celery_pgnotify.floors import FloorRaiser
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.statements import Statements

logger = logging.getLogger(__name__)

#: Every how many reaps the search for orphaned leases runs (a skip scan:
#: its cost does not grow with the messages leased, but it is seldom needed).
ORPHANS_EVERY = 5

#: A statement given up on: a lock held elsewhere, or the database too slow.
STALLED = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)


class Reaper:
    def __init__(self, stmts: Statements, opts: TransportOptions) -> None:
        self._stmts = stmts
        self._lease_timeout = opts.lease_timeout
        self._params = {
            "lease_timeout": opts.lease_timeout,
            "lock_grace": opts.lock_grace,
            "ns": stmts.lock_namespace,
            "prefix": stmts.channel_prefix,
        }
        self._not_before = 0.0
        self._reaps = 0
        self._floors = FloorRaiser(stmts, opts.heartbeat_interval)

    def hold_off(self) -> None:
        """Judge nobody for ``lease_timeout`` (a new session, or a gap in our
        own heartbeats: let the others beat again first)."""
        self._not_before = max(self._not_before, time.monotonic() + self._lease_timeout)

    def reap(self, conn: psycopg.Connection[Any]) -> None:
        rows: list[Any] = []
        try:
            if time.monotonic() >= self._not_before:
                self._reaps += 1
                rows = conn.execute(self._stmts.reap, self._params).fetchall()
                if self._reaps % ORPHANS_EVERY == 0:
                    rows += conn.execute(self._stmts.reap_orphans, self._params).fetchall()
            # Judges nobody: not held off with the judging.
            self._floors.raise_floors(conn)
        except STALLED as exc:
            # Another reaper is at it, or the tables are locked: next beat.
            logger.warning("Reaping held up (%s); trying again", exc)
            return
        if rows:
            logger.warning(
                "Returned leased messages of dead consumers to queues: %s",
                ", ".join(sorted(r[0] for r in rows)),
            )
