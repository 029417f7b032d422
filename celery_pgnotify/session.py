"""A connection's consumer: its LISTEN session, and its handover when the
connection is lost.

Each consuming connection has one consumer, whose leases are proved alive by
a LISTEN session of its own (``listener.py``), started on first need. A
connection that is lost, not closed, can be *parked* (``celery-pg worker``
does): closing it then keeps the consumer's leases, and the process's next
connection to the same database and schema takes the consumer over (its id,
its session lock again, and the acks the old connection could not write),
then *reconciles* with the table: whatever is leased to it that the process
does not hold goes back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from celery_pgnotify.errors import DatabaseUnavailable
from celery_pgnotify.listener import Listener
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.statements import Statements

#: Consumer ids of parked connections, and the acks they could not write, by
#: (pid, conninfo, schema): for this process's next listener on the same
#: database and schema.
_parked_consumers: dict[tuple[int, str, str], tuple[int, list[int]]] = {}


class ConsumerSession:
    def __init__(
        self,
        conninfo: str,
        stmts: Statements,
        opts: TransportOptions,
        work_conn: Callable[[], psycopg.Connection[Any]],
    ) -> None:
        self._conninfo = conninfo
        self._stmts = stmts
        self._opts = opts
        self._work_conn = work_conn  # the transport's connection for claims and acks
        self._listener: Listener | None = None
        #: set by :meth:`park`
        self.parked = False
        #: acks of closed channels, once parked, for the next connection
        self.unwritten_acks: list[int] = []

    def listener(self) -> Listener:
        """The consumer's LISTEN session, started on first need.

        Raises a connection error when its thread has ended: without it this
        process is no live consumer, and must reconnect before claiming more.
        """
        if self._listener is None:
            key = self._parking_key()
            adopted, acks = _parked_consumers.get(key, (None, []))
            listener = Listener(self._conninfo, self._stmts, self._opts, consumer_id=adopted)
            listener.start()  # if it fails, the parked consumer waits for the next try
            _parked_consumers.pop(key, None)
            self._listener = listener
            if acks:
                # Written whether or not the consumer survived: these tasks
                # ran, and a message given back meanwhile must not run again.
                ack_many = self._stmts.writes(self._opts.async_acks).ack_many
                try:
                    self._work_conn().execute(ack_many, {"ids": acks})
                except BaseException:
                    self.unwritten_acks += acks  # the next handover writes them
                    raise
        else:
            self.check()
        return self._listener

    def current(self) -> Listener | None:
        """The LISTEN session if one is running (never starts one)."""
        return self._listener

    def check(self) -> None:
        listener = self._listener
        if listener is None or listener.is_alive():
            return
        if listener.reaped:
            raise DatabaseUnavailable(
                f"consumer {listener.consumer_id} was declared dead while it lived; reconnecting"
            )
        raise DatabaseUnavailable("the consumer's LISTEN session has stopped")

    def consumer_id(self) -> int:
        """The id this connection's leases are taken under."""
        cid = self.listener().consumer_id
        assert cid is not None
        return cid

    def consumer_id_or_none(self) -> int | None:
        return self._listener.consumer_id if self._listener is not None else None

    def alive_for_sure(self) -> bool:
        listener = self._listener
        if listener is None or not listener.is_alive():
            return False
        return listener.heartbeat_age() < self._opts.lease_timeout

    @property
    def resumed(self) -> bool:
        return self._listener is not None and self._listener.resumed

    def reconcile(self, held: Iterable[int]) -> int:
        params = {
            "consumer": self.consumer_id(),
            "held": list(held),
            "prefix": self._stmts.channel_prefix,
        }
        rows = self._work_conn().execute(self._stmts.release_unheld, params).fetchall()
        return sum(int(r[1]) for r in rows)

    def stop(self) -> None:
        """End the session now (nothing consumed, nothing held): frees its
        connection and thread; the next consumer starts a new one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()

    def close(self, deferred_acks: list[int]) -> None:
        """The connection closes: release the leases, or (parked) keep them
        for the process's next connection, with ``deferred_acks``."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.stop(release=not self.parked)
        if self.parked and listener.consumer_id is not None:
            acks = self.unwritten_acks + deferred_acks
            _parked_consumers[self._parking_key()] = (listener.consumer_id, acks)

    def claimed(self, seconds: float, fed: bool) -> None:
        """A claim took ``seconds`` (and got messages, ``fed``): reported with
        the consumer's heartbeat."""
        listener = self._listener
        if listener is not None:
            listener.claim_times.record(seconds, fed)

    def forget_after_fork(self) -> None:
        self._listener = None

    def _parking_key(self) -> tuple[int, str, str]:
        return (os.getpid(), self._conninfo, self._opts.schema)
