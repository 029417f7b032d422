"""Exchanges, queues and bindings: the declarations of a channel.

They live in the database (``queues``, ``exchanges``, ``bindings``), so a
route one process declares serves every process. The semantics are
RabbitMQ's where kombu's virtual transports allow: an ordinary
``queue_declare`` of an existing queue with other settings fails with
PRECONDITION_FAILED rather than reconfigure it behind its users' backs, a
passive declare of a missing queue or exchange fails with NOT_FOUND, and
``queue_delete(if_unused=True)`` counts consumers of every process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psycopg
from amqp.protocol import queue_declare_ok_t  # kombu's own dependency
from kombu.exceptions import ChannelError
from kombu.transport.base import to_rabbitmq_queue_arguments

from celery_pgnotify.errors import InvalidName, PreconditionFailed
from celery_pgnotify.routing import topic_pattern

if TYPE_CHECKING:
    from celery_pgnotify.statements import Statements

MAX_NAME_LENGTH = 1000


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str):
        raise InvalidName(f"{kind} name must be a string, not {type(name).__name__}")
    if "\x00" in name:
        raise InvalidName(f"{kind} name {name!r} contains a NUL character")
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidName(f"{kind} name {name!r} holds a lone UTF-16 surrogate") from None
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{kind} name is {len(name)} characters; at most {MAX_NAME_LENGTH}")
    return name


def milliseconds(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        ms = int(float(value))
    except (TypeError, ValueError):
        raise InvalidName(f"{what} must be a number of milliseconds, not {value!r}") from None
    return max(ms, 0)


class Topology:
    """The declaration methods of :class:`~celery_pgnotify.transport.Channel`."""

    exchange_types: dict[str, Any]
    _stmts: Statements
    _declared_exchanges: dict[str, str]

    def _execute(self, query: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        raise NotImplementedError  # the channel's

    def _consumer_id(self) -> int | None:
        raise NotImplementedError  # the channel's: its connection's consumer, if any

    def exchange_declare(
        self,
        exchange: str | None = None,
        type: str = "direct",
        durable: bool = False,
        auto_delete: bool = False,
        arguments: Any = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        type = type or "direct"
        exchange = check_name("exchange", exchange or f"amq.{type}")
        if type not in ("direct", "topic", "fanout"):
            raise InvalidName(f"exchange type {type!r} is not supported (direct, topic or fanout)")
        if passive:
            if self._exchange_type(exchange) is None:
                raise ChannelError(
                    f"NOT_FOUND - no exchange {exchange!r}",
                    (50, 10),
                    "Channel.exchange_declare",
                    "404",
                )
            return
        if self._declared_exchanges.get(exchange) == type:
            return
        self._execute(
            self._stmts.declare_exchange,
            {
                "name": exchange,
                "type": type,
                "durable": durable,
                "auto_delete": auto_delete,
            },
        )
        self._declared_exchanges[exchange] = type

    def _exchange_type(self, exchange: str) -> str | None:
        known = self._declared_exchanges.get(exchange)
        if known:
            return known
        row = self._execute(self._stmts.exchange_type, {"name": exchange}).fetchone()
        if row is None:
            return None
        self._declared_exchanges[exchange] = row[0]
        return str(row[0])

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self._execute(self._stmts.delete_exchange, {"name": exchange})
        self._declared_exchanges.pop(exchange, None)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        return self.exchange_types[self._exchange_type(exchange) or default]

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        rows = self._execute(self._stmts.exchange_bindings, {"name": exchange}).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        exchange = check_name("exchange", exchange or "amq.direct")
        check_name("queue", queue)
        routing_key = routing_key or ""
        kind = self._exchange_type(exchange) or "direct"
        self._execute(
            self._stmts.bind,
            {
                "exchange": exchange,
                "rk": routing_key,
                "queue": queue,
                "type": kind,
                "pattern": topic_pattern(routing_key) if kind == "topic" else None,
            },
        )

    def queue_unbind(
        self, queue: str, exchange: str | None = None, routing_key: str = "", *args: Any, **kw: Any
    ) -> None:
        self._execute(
            self._stmts.unbind,
            {
                "exchange": exchange or "amq.direct",
                "rk": routing_key or "",
                "queue": queue,
            },
        )

    def list_bindings(self) -> Iterable[tuple[str, str, str]]:
        rows = self._execute(self._stmts.list_bindings, {}).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        # Queue(expires=..., message_ttl=...) become x-expires/x-message-ttl.
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        """Declare ``queue`` (create it, or check its settings).

        Only a passive declare, the question "does it exist, and how many
        messages wait in it?", counts the backlog, and it creates nothing.
        An ordinary declare, made by every worker and producer on each
        connection, reports a message count of 0 rather than count a backlog
        that may hold millions of rows each time."""
        name = queue or f"amq.gen-{uuid.uuid4()}"
        if passive:
            if not self._has_queue(name):
                raise ChannelError(
                    f"NOT_FOUND - no queue {name!r}", (50, 10), "Channel.queue_declare", "404"
                )
            return queue_declare_ok_t(name, self._size(name), 0)
        self._new_queue(name, **kwargs)
        return queue_declare_ok_t(name, 0, 0)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        check_name("queue", queue)
        args = kwargs.get("arguments") or {}
        wanted = (
            bool(kwargs.get("durable", True)),
            bool(kwargs.get("auto_delete", False)),
            milliseconds(args.get("x-expires"), "x-expires"),
            milliseconds(args.get("x-message-ttl"), "x-message-ttl"),
        )
        names = ("name", "durable", "auto_delete", "expires", "ttl")
        row = self._execute(
            self._stmts.declare_queue, dict(zip(names, (queue, *wanted), strict=True))
        ).fetchone()
        if row is not None and tuple(row) != wanted:
            # Never reconfigure a shared queue behind its other users' backs.
            labels = ("durable", "auto_delete", "x-expires", "x-message-ttl")
            diff = ", ".join(
                f"{label} {had!r} (declared {new!r})"
                for label, had, new in zip(labels, row, wanted, strict=True)
                if had != new
            )
            raise PreconditionFailed(
                f"PRECONDITION_FAILED - queue {queue!r} exists with other settings: {diff}",
                (50, 10),
                "Channel.queue_declare",
                "406",
            )

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        row = self._execute(self._stmts.has_queue, {"name": queue}).fetchone()
        return bool(row and row[0])

    def _size(self, queue: str) -> int:
        row = self._execute(self._stmts.queue_size, {"name": queue}).fetchone()
        return int(row[0]) if row else 0

    def _purge(self, queue: str) -> int:
        row = self._execute(self._stmts.purge, {"name": queue}).fetchone()
        return int(row[0]) if row else 0

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> int:
        """Delete the queue, its bindings and its messages."""
        if if_empty and self._size(queue):
            return 0
        if if_unused and self._consumed_elsewhere(queue):
            return 0
        size = self._size(queue)
        self._execute(self._stmts.delete_queue, {"name": queue})
        return size

    def _consumed_elsewhere(self, queue: str) -> bool:
        row = self._execute(
            self._stmts.queue_consumed_elsewhere,
            {
                "name": queue,
                "consumer": self._consumer_id() or -1,
            },
        ).fetchone()
        return bool(row and row[0])
