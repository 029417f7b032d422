"""Many publishes, one statement: the tasks of a group.

A ``group`` (and so a chord's header, ``chunks``, ``starmap``...) publishes
its tasks one by one through one producer. On a pgnotify channel they are
gathered instead and stored by one statement in one transaction when the
group's publishing ends (``publish_many``): one commit and one NOTIFY per
queue for the whole group, not one per task. ``group.apply_async()`` returns
once they are committed, as before; a failure raises from it. A group larger
than :data:`MANY` is stored :data:`MANY` messages at a time. Celery's
``group._apply_tasks`` (how every group publishes) is wrapped once, when the
transport is first loaded; for other brokers it runs as it is.

A group published inside an ``enqueue_in(conn)`` block is stored by one
statement in the caller's transaction; other messages of the block go into
it one statement each, as they are published (see ``enqueue.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import psycopg

from celery_pgnotify.options import TransportOptions
from celery_pgnotify.statements import Publishes, Statements
from celery_pgnotify.topology import check_name

# exchange, routing key, rank, payload, ttl (ms), task id, due
_Row = tuple[str, str, int, str, "int | None", "str | None", "datetime | None"]

#: Tries of a group's statement after a lost connection.
RETRIES = 3

#: Most messages one ``publish_many`` statement stores: a larger group is
#: stored in statements (and commits) of this many, so that memory stays bounded.
MANY = 1000


class PublishBatch:
    """Messages gathered for one ``publish_many`` statement."""

    def __init__(self, rows: list[_Row] | None = None, through: Any = None) -> None:
        self.rows: list[_Row] = rows if rows is not None else []
        #: the connection of an enqueue_in(conn) block they are published in
        self.through = through

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, exchange: str, routing_key: str, params: dict[str, Any]) -> None:
        self.rows.append(
            (
                exchange,
                routing_key,
                params["rank"],
                params["payload"],
                params["ttl"],
                params["task_id"],
                params.get("due"),
            )
        )

    def take(self) -> PublishBatch:
        """The messages gathered so far, leaving this batch empty."""
        rows, self.rows = self.rows, []
        return PublishBatch(rows=rows, through=self.through)

    def route(self, n: int) -> tuple[str, str]:
        """Exchange and routing key of the ``n``-th message (1-based)."""
        return self.rows[n - 1][0], self.rows[n - 1][1]

    def params(self, prefix: str, fresh: float) -> dict[str, Any]:
        names = ("exchanges", "rks", "ranks", "payloads", "ttls", "task_ids", "dues")
        columns = zip(*self.rows, strict=True) if self.rows else [()] * len(names)
        return {
            "prefix": prefix,
            "fresh": fresh,
            **{n: list(c) for n, c in zip(names, columns, strict=True)},
        }


#: The group being published in this context (thread or asyncio task).
_batch: ContextVar[PublishBatch | None] = ContextVar("celery_pgnotify_batch", default=None)


@contextmanager
def gathering(producer: Any) -> Iterator[None]:
    """Gather what is published in the block; store it through ``producer``
    at the end of the outermost block (also when the block raises: what was
    published before the error stays published, as without gathering).

    The batch belongs to the context, not to a channel: kombu replaces the
    producer's channel when it reconnects in the middle of a group."""
    if _batch.get() is not None:  # a group in a group: the outermost stores it
        yield
        return
    batch = PublishBatch()
    token = _batch.set(batch)
    try:
        yield
    finally:
        _batch.reset(token)
        if len(batch):
            _store(producer, batch)


def _store(producer: Any, batch: PublishBatch) -> None:
    """Store a group's messages through the producer's current channel. A
    lost connection is retried as kombu retries each publish (Celery's
    ``task_publish_retry``), except inside ``enqueue_in``, whose transaction
    is the caller's to retry."""
    if batch.through is not None:
        producer.channel._publish_many(batch)
        return
    publish = producer.connection.ensure(
        producer,
        lambda: producer.channel._publish_many(batch),
        max_retries=RETRIES,
        interval_start=0.1,
        interval_step=0.5,
        interval_max=1.0,
    )
    publish()


class Gathering:
    """The gathering methods of :class:`~celery_pgnotify.transport.Channel`."""

    _stmts: Statements
    _opts: TransportOptions
    _publishes: Publishes

    def _execute(self, query: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        raise NotImplementedError  # the channel's

    def _unrouted(self, exchange: str, routing_key: str) -> None:
        raise NotImplementedError  # the channel's

    def _gather(
        self,
        exchange: str,
        routing_key: str,
        params: dict[str, Any],
        through: psycopg.Connection[Any] | None,
    ) -> bool:
        """Keep a message for the statement of its group; False outside one."""
        batch = _batch.get()
        if batch is None:
            return False
        if not exchange:
            check_name("queue", routing_key)
        if batch.through is not through and len(batch):
            self._publish_many(batch.take())  # one statement per connection
        batch.through = through
        batch.add(exchange, routing_key or "", params)
        if len(batch) >= MANY:
            self._publish_many(batch.take())
        return True

    def _publish_many(self, batch: PublishBatch) -> None:
        params = batch.params(self._stmts.channel_prefix, self._opts.fresh)
        params["wake_all"] = batch.through is not None  # it commits later (see fragments.wake)
        if batch.through is not None:  # inside enqueue_in(conn): the caller's transaction
            query = self._stmts.durable_publishes.publish_many
            rows = batch.through.execute(query, params).fetchall()
        else:
            rows = self._execute(self._publishes.publish_many, params).fetchall()
        # Once per exchange and key, not per message: a group of a thousand
        # unroutable messages costs one lookup of the exchange, not a thousand.
        for route in dict.fromkeys(batch.route(n) for n, queue, _ in rows if queue is None):
            self._unrouted(*route)


def _gathered(apply_tasks: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(apply_tasks)
    def apply_tasks_gathered(
        self: Any, tasks: Any, producer: Any = None, app: Any = None, *args: Any, **kwargs: Any
    ) -> Iterator[Any]:
        app = app or self.app
        with app.producer_or_acquire(producer) as producer:
            if not hasattr(producer.channel, "_publish_many"):  # another broker
                yield from apply_tasks(self, tasks, producer, app, *args, **kwargs)
                return
            with gathering(producer):
                results = list(apply_tasks(self, tasks, producer, app, *args, **kwargs))
            yield from results

    apply_tasks_gathered.__pgnotify_gathered__ = True  # type: ignore[attr-defined]
    return apply_tasks_gathered


def gather_groups() -> None:
    """Wrap Celery's ``group._apply_tasks`` (once) so that a group's
    messages are published by one statement on a pgnotify channel."""
    from celery.canvas import group

    current = getattr(group, "_apply_tasks", None)
    if current is None or getattr(current, "__pgnotify_gathered__", False):
        return
    group._apply_tasks = _gathered(current)
