"""A LISTEN session: the one implementation behind the consumer's session
(``listener.py``) and ``.get()``'s (``waiting.py``).

It owns one dedicated connection (never pooled: LISTEN does not survive
PgBouncer's transaction mode), keeps the channels it listens on in step with
those wanted, waits on its socket beside the caller's own descriptors, and
hands each notification's channel to a callback. What differs between the
two users is policy (a thread that reconnects with backoff and heartbeats,
or waits driven by the threads calling ``.get()``), not the session.

A notification only says "look": its payload is never read, since any role
that can connect may NOTIFY any channel. Channel names are derived from
hashes (of queue names, of task ids) and are quoted all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from psycopg import sql

from celery_pgnotify.connect import close_quietly, connect, received_notifies, wait_readable


class Listening:
    """One LISTEN session; each notification's channel is handed to
    ``on_channel`` on the thread that reads it (while a statement runs, or
    in :meth:`read`). Closed until :meth:`open`."""

    def __init__(self, on_channel: Callable[[str], None]) -> None:
        self._on_channel = on_channel
        #: The session's connection (None while closed); other statements
        #: may run on it between waits.
        self.conn: psycopg.Connection[Any] | None = None
        self.channels: frozenset[str] = frozenset()
        #: True once a session was opened: a later :meth:`open` follows a gap
        #: in which notifications may have been missed.
        self.opened_before = False

    @property
    def is_open(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def open(self, conninfo: str, wanted: Iterable[str] = ()) -> psycopg.Connection[Any]:
        """Open a new session (closing any previous one) listening on ``wanted``."""
        self.close()
        conn = connect(conninfo)
        conn.add_notify_handler(self._handle)
        try:
            self.conn = conn
            self.sync(wanted)
        except BaseException:
            self.close()
            raise
        self.opened_before = True
        return conn

    def close(self) -> None:
        """Close the session, whatever state it is in (its server may be gone)."""
        conn, self.conn = self.conn, None
        self.channels = frozenset()
        close_quietly(conn)

    def forget(self) -> None:
        """After a fork: the parent's session is not ours to use or close."""
        self.conn = None
        self.channels = frozenset()
        self.opened_before = False

    def _handle(self, notify: psycopg.Notify) -> None:
        self._on_channel(notify.channel)

    def sync(self, wanted: Iterable[str]) -> bool:
        """LISTEN on exactly ``wanted`` (the difference only, in one round
        trip); True when anything changed."""
        assert self.conn is not None
        target = frozenset(wanted)
        start, stop = sorted(target - self.channels), sorted(self.channels - target)
        if not start and not stop:
            return False
        commands = [sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in start]
        commands += [sql.SQL("UNLISTEN {}").format(sql.Identifier(c)) for c in stop]
        self.conn.execute(sql.SQL("; ").join(commands))
        self.channels = target
        return True

    def read(self) -> None:
        """Hand the notifications already received to ``on_channel`` (never
        waits); raises ``OperationalError`` when the session is gone."""
        if self.conn is None:
            raise psycopg.OperationalError("the LISTEN session is closed")
        for channel, _payload in received_notifies(self.conn):
            self._on_channel(channel)

    def wait(self, timeout: float | None, *fds: int) -> tuple[bool, list[int]]:
        """Wait until the session or one of ``fds`` is readable: whether the
        session is (read it with :meth:`read`), and which of ``fds`` are."""
        conn = self.conn
        try:
            own = conn.fileno() if conn is not None else -1
        except psycopg.Error:  # closed meanwhile by another thread
            own = -1
        readable = wait_readable([own, *fds], timeout)
        return own >= 0 and own in readable, [fd for fd in readable if fd != own]
