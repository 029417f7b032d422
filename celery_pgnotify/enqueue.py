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

Which publishes join: the application's own (``.delay()``, ``apply_async``,
``send_task``, canvas calls). Never the messages Celery sends for the task
running in this thread: its retry (``self.retry()``, ``autoretry_for``: the
same task id) and its replacement (``self.replace()``). A retry raised inside
the block leaves it by exception, which rolls the transaction back; were its
message in that transaction, the task would be acked and its retry gone.
(Chains, callbacks and chord callbacks are published by Celery after the task
body returned, so outside any block of the task's own.)
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


def _sent_by_celery(headers: Any) -> bool:
    """True for the retry or replacement of the task running in this thread."""
    if not isinstance(headers, dict) or "id" not in headers:
        return False
    from celery import current_task

    if not current_task:
        return False
    request = current_task.request
    if request.called_directly or request.is_eager:
        return False
    if headers.get("id") == request.id:  # self.retry() resends the same id
        return True
    nesting = headers.get("replaced_task_nesting") or 0
    return isinstance(nesting, int) and nesting > (
        getattr(request, "replaced_task_nesting", 0) or 0
    )


def current_connection(headers: Any = None) -> psycopg.Connection[Any] | None:
    """The connection a message with ``headers`` is published through in
    this context, if any (see the module docstring for which join)."""
    conn = _connection.get()
    if conn is None:
        for provider in _providers:
            conn = provider()
            if conn is not None:
                break
    # Asked only when there is a connection to join: most publishes have
    # none, and looking at the running task costs every publish.
    if conn is None or _sent_by_celery(headers):
        return None
    return conn
