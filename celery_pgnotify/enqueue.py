"""Transactional enqueue: publish tasks through the application's own transaction.

::

    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("INSERT INTO orders ...")
        with enqueue_in(conn):
            send_receipt.delay(order_id)

Inside the block, every message this thread (or asyncio task) publishes on a
``pgnotify://`` broker is inserted through ``conn``, as part of whatever
transaction ``conn`` has open: if it rolls back, the task never existed; if it
commits, the task is delivered (its NOTIFY is sent at COMMIT) and sees the
committed rows. Outside a transaction (autocommit) each publish commits at once.

The rule: ``conn`` must be a psycopg 3 connection to the broker's database,
whose schema the transport has created (it does so on first use, or with
``celery-pg migrate``). Only publishing moves to ``conn``; queue declarations
and everything else keep using the transport's own connection. Other brokers
ignore the block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg

_connection: ContextVar[psycopg.Connection[Any] | None] = ContextVar(
    "celery_pgnotify_enqueue_connection", default=None
)


@contextmanager
def enqueue_in(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Publish the tasks sent inside the block through ``conn``'s transaction."""
    if not isinstance(conn, psycopg.Connection):
        raise TypeError(f"enqueue_in() needs a psycopg 3 Connection, not {type(conn).__name__}")
    token = _connection.set(conn)
    try:
        yield conn
    finally:
        _connection.reset(token)


#: Callables that may name the connection to publish through when no
#: :func:`enqueue_in` block is active (the Django integration adds one).
_providers: list[Callable[[], psycopg.Connection[Any] | None]] = []


def add_provider(provider: Callable[[], psycopg.Connection[Any] | None]) -> None:
    """Consult ``provider`` on every publish outside an :func:`enqueue_in` block."""
    if provider not in _providers:
        _providers.append(provider)


def current_connection() -> psycopg.Connection[Any] | None:
    """The connection publishes go through in this context, if any."""
    conn = _connection.get()
    if conn is None:
        for provider in _providers:
            conn = provider()
            if conn is not None:
                break
    return conn
