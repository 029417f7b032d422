"""LISTEN on a set of channels: the one implementation behind the consumer's
session (``listener.py``) and ``.get()``'s (``waiting.py``).

A notification only says "look": its payload is never read, since any role
that can connect may NOTIFY any channel. Channel names are derived from
hashes (of queue names, of task ids) and are quoted all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from psycopg import sql

from celery_pgnotify.connect import received_notifies


class Listening:
    """The channels one connection listens on, kept in step with those
    wanted; each notification is handed to ``on_channel``, on the thread that
    reads it (while a statement runs, or in :meth:`read`)."""

    def __init__(self, conn: psycopg.Connection[Any], on_channel: Callable[[str], None]) -> None:
        self.conn = conn
        self._on_channel = on_channel
        self.channels: frozenset[str] = frozenset()
        conn.add_notify_handler(self._handle)

    def _handle(self, notify: psycopg.Notify) -> None:
        self._on_channel(notify.channel)

    def sync(self, wanted: Iterable[str]) -> bool:
        """LISTEN on exactly ``wanted`` (the difference only, in one round
        trip); True when anything changed."""
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
        for channel, _payload in received_notifies(self.conn):
            self._on_channel(channel)
