"""kombu transport on PostgreSQL: tables for durability, LISTEN/NOTIFY to wake.

Features
========
* Type: virtual (kombu's virtual channel model), ``driver_type = 'pgnotify'``.
* Durable: yes. A published message is a committed row; NOTIFY only wakes.
* Exchanges: direct, topic and fanout; bindings live in the database, so a
  route declared by one process serves every process.
* Priorities 0-9 (``priority_order`` picks RabbitMQ's or Redis's meaning).
* Message TTL (``x-message-ttl``, ``expiration``) and queue ``x-expires``.
* Leases tied to the consumer's liveness (see :mod:`celery_pgnotify.listener`).
* Event loop: Celery's hub watches the listener's wake descriptor.

Connection String
=================
``pgnotify://USER:PASSWORD@HOST:PORT/DBNAME?sslmode=require&...``

Any libpq option may follow ``?``. A full DSN can be given instead with the
``dsn`` transport option.

Transport Options
=================
See :mod:`celery_pgnotify.options`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from amqp.protocol import queue_declare_ok_t  # kombu's own dependency
from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual.base import BrokerState

from celery_pgnotify import envelope
from celery_pgnotify import sql as pgsql
from celery_pgnotify.connect import (
    connect,
    conninfo_from_url,
    forget_after_fork,
    mask_url,
    wait_readable,
)
from celery_pgnotify.deadletters import REJECTED, connect_celery_signals
from celery_pgnotify.enqueue import current_connection
from celery_pgnotify.envelope import Refused
from celery_pgnotify.errors import (
    DatabaseUnavailable,
    InvalidName,
    MessageTooLarge,
    PreconditionFailed,
)
from celery_pgnotify.listener import Listener
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.routing import topic_pattern

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 1000


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str):
        raise InvalidName(f"{kind} name must be a string, not {type(name).__name__}")
    if "\x00" in name:
        raise InvalidName(f"{kind} name {name!r} contains a NUL character")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{kind} name is {len(name)} characters; at most {MAX_NAME_LENGTH}")
    return name


def _milliseconds(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        ms = int(float(value))
    except (TypeError, ValueError):
        raise InvalidName(f"{what} must be a number of milliseconds, not {value!r}") from None
    return max(ms, 0)


#: Message properties kombu itself sets; other keyword arguments of
#: ``Producer.publish`` land among the properties too.
_KNOWN_PROPERTIES = frozenset(
    (
        "body_encoding",
        "delivery_info",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    )
)


def _dumps(message: dict[str, Any]) -> str:
    """The stored text of ``message``. An extra property JSON cannot carry
    (``publish(body, **kwargs)`` forwarding anything) is left out, as AMQP
    clients send only the properties they know; the rest must encode."""
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        props = message["properties"]
        for key in [k for k in props if k not in _KNOWN_PROPERTIES]:
            try:
                json.dumps(props[key], allow_nan=False)
            except (TypeError, ValueError):
                logger.debug("Property %r cannot be stored as JSON; left out", key)
                del props[key]
        return json.dumps(message, separators=(",", ":"), allow_nan=False)


#: Consumer ids of parked connections, and the acks they could not write, by
#: (pid, conninfo, schema): for this process's next listener on the same
#: database and schema.
_parked_consumers: dict[tuple[int, str, str], tuple[int, list[int]]] = {}


class QoS(virtual.QoS):
    """Prefetch accounting whose acks and rejects reach the database."""

    channel: Channel

    def ack(self, delivery_tag: int) -> None:
        self.channel._ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        if requeue:
            self.channel._db_requeue([delivery_tag])
        elif self.channel._opts.dead_letter_rejected:
            reason = self.channel._reject_reasons.pop(delivery_tag, REJECTED)
            self.channel.dead_letter(delivery_tag, reason)
        else:
            self.channel._ack(delivery_tag)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Return every unacked message to its queue in one statement."""
        self._flush()
        if self.channel.connection.parked:
            # The consumer carries on on its next connection: it keeps them.
            self._delivered.clear()
            return []
        tags = [tag for tag in self._delivered if tag not in self._dirty]
        self._delivered.clear()
        if not tags:
            return []
        try:
            self.channel._db_requeue(tags)
        except psycopg.Error as exc:
            # The lease still protects them: they return once this consumer
            # is seen dead. Nothing is lost; say so instead of dumping state.
            logger.warning(
                "Could not return %d unacked message(s) now (%s); "
                "they come back when this consumer's lease runs out",
                len(tags),
                exc,
            )
        return []


class Channel(virtual.Channel):
    """A channel over the transport's shared work connection."""

    QoS = QoS
    connection: Transport
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._stmts = stmts = connection.stmts
        self._opts = connection.opts
        # What a consumer writes (claims, acks, requeues) may commit without
        # waiting for the WAL flush: see the async_acks transport option.
        flushed = "" if self._opts.async_acks else "_flushed"
        self._claim_sql: str = getattr(stmts, "claim" + flushed)
        self._take_no_ack_sql: str = getattr(stmts, "take_no_ack" + flushed)
        self._ack_sql: str = getattr(stmts, "ack" + flushed)
        self._ack_many_sql: str = getattr(stmts, "ack_many" + flushed)
        self._requeue_sql: str = getattr(stmts, "requeue" + flushed)
        self._declared_exchanges: dict[str, str] = {}
        self._deferred_acks: list[int] = []
        self._acks_thread: int | None = None  # the thread that deferred them
        self._no_ack_queues: set[str] = set()
        self._reject_reasons: dict[int, str] = {}
        self._refused = 0  # rows of the last claim dead-lettered as they were taken

    # -- helpers -------------------------------------------------------------

    def _live(self) -> Transport:
        """The transport, or a connection error once this channel is closed
        (kombu forgets it then): Celery reports an ack that fails with one
        and carries on, as with any broker whose connection went away."""
        transport = self.connection
        if transport is None:
            raise DatabaseUnavailable(
                "the channel was closed (its connection was lost or closed); "
                "its unacked messages went back to their queues"
            )
        return transport

    def _execute(self, query: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        return self._live().work_conn().execute(query, params)

    def _rank(self, priority: Any) -> int:
        try:
            p = max(min(int(priority), self.max_priority), self.min_priority)
        except (TypeError, ValueError):
            p = self.default_priority
        return p if self._opts.priority_order == "desc" else self.max_priority - p

    # -- publishing ------------------------------------------------------------

    def _inplace_augment_message(
        self, message: dict[str, Any], exchange: str, routing_key: str
    ) -> None:
        message["body"], body_encoding = self.encode_body(message["body"], self.body_encoding)
        props = message["properties"]
        props["body_encoding"] = body_encoding
        props["delivery_info"].update(exchange=exchange, routing_key=routing_key)

    def basic_publish(
        self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any
    ) -> None:
        """Route, store and notify in one statement (one round trip)."""
        self._inplace_augment_message(message, exchange, routing_key)
        props = message["properties"]
        payload = _dumps(message)
        if len(payload) > self._opts.max_message_size:
            raise MessageTooLarge(
                f"message of {len(payload)} characters exceeds the max_message_size "
                f"transport option ({self._opts.max_message_size} bytes)"
            )
        # A Celery task's ``expires`` is also its message's expiration; the
        # task must reach a worker all the same, which marks it REVOKED
        # (instead of leaving its caller waiting on a result that never comes).
        headers = message.get("headers") or {}
        celery_expires = "task" in headers and headers.get("expires") is not None
        expiration = None if celery_expires else props.get("expiration")
        params = {
            "rank": self._rank(props.get("priority")),
            "payload": payload,
            "ttl": _milliseconds(expiration, "expiration"),
            "prefix": self._stmts.channel_prefix,
        }
        # Inside enqueue_in(conn): the row is written in the caller's transaction.
        through = current_connection(headers)
        execute = through.execute if through is not None else self._execute
        if exchange:
            params.update(exchange=exchange, rk=routing_key or "")
            rows = execute(self._stmts.publish_routed, params).fetchall()
            if not rows:
                rk = routing_key
                # A broadcast nobody listens to (no worker up for `celery
                # inspect`) is routine; a direct or topic message matching no
                # queue is lost data.
                log = logger.debug if self._exchange_type(exchange) == "fanout" else logger.warning
                log("Message to exchange %r key %r matched no queue; dropped", exchange, rk)
        else:
            params["queue"] = _check_name("queue", routing_key)
            execute(self._stmts.publish_direct, params)

    # -- consuming ---------------------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> str:
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if no_ack:
            self._no_ack_queues.add(queue)
        self.connection._consume(queue, self)
        return consumer_tag

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is None or queue in self._active_queues:
            return
        self.connection._cancel(queue)
        if self.connection.parked:
            return  # the consumer comes back on its next connection
        try:
            row = self._execute(self._stmts.queue_auto_delete, {"name": queue}).fetchone()
            if row and row[0] and not self._consumed_elsewhere(queue):
                self.queue_delete(queue)
        except psycopg.Error as exc:
            logger.debug("auto_delete check for %r failed: %s", queue, exc)

    def _consumed_elsewhere(self, queue: str) -> bool:
        row = self._execute(
            self._stmts.queue_consumed_elsewhere,
            {
                "name": queue,
                "consumer": self.connection.consumer_id_or_none() or -1,
            },
        ).fetchone()
        return bool(row and row[0])

    def claim_limit(self) -> int:
        """How many messages this channel should take now (0: not yet).

        While messages are still in hand, wait until half the prefetch window
        is free, so a backlog is claimed in batches rather than one by one.
        """
        qos = self.qos
        if not qos.can_consume():
            return 0
        estimate = qos.can_consume_max_estimate()
        batch = self._opts.claim_batch
        if estimate is None:
            return batch
        in_hand = len(qos._delivered) - len(qos._dirty)
        if in_hand and estimate < max(1, qos.prefetch_count // 2):
            return 0
        return min(int(estimate), batch)

    def claim(self, queue: str, limit: int) -> list[dict[str, Any]]:
        """Lease up to ``limit`` ready messages of ``queue`` (best first)."""
        return self._take(queue, limit, no_ack=queue in self._no_ack_queues)

    def _take(self, queue: str, limit: int, no_ack: bool) -> list[dict[str, Any]]:
        # One statement either way: leased to this consumer, or (no_ack)
        # deleted as it is taken.
        max_size = self._opts.max_message_size
        conn = self.connection.claim_conn()
        if no_ack:
            params: dict[str, Any] = {"queue": queue, "limit": limit}
            rows = conn.execute(self._take_no_ack_sql, params).fetchall()
        else:
            acks: list[int] = []
            if self._acks_thread == threading.get_ident():  # the thread whose acks wait
                acks, self._deferred_acks = self._deferred_acks, []
            params = {
                "queue": queue,
                "limit": limit,
                "consumer": self.connection.consumer_id(),
                "max_size": max_size,
                "acks": acks,
            }
            try:
                rows = conn.execute(self._claim_sql, params).fetchall()
            except BaseException:
                self._deferred_acks[:0] = acks  # still to be written
                raise
        rows.sort(key=lambda r: (-r[1], r[0]))
        self._refused = 0
        messages = []
        for msg_id, rank, payload, redelivered, size in rows:
            if payload is None or size > max_size:
                reason = f"message of {size} bytes exceeds max_message_size ({max_size})"
            else:
                try:
                    messages.append(self._payload(msg_id, payload, redelivered))
                    continue
                except Refused as exc:
                    reason = f"malformed message: {exc}"
                except Exception as exc:  # noqa: BLE001 - whatever it is, it costs this row only
                    reason = f"malformed message: {exc!r}"
            logger.error("Dead-lettering message %s of queue %r: %s", msg_id, queue, reason)
            self._refused += 1
            if no_ack:  # already taken off the table
                self._execute(
                    self._stmts.dead_letter_taken,
                    {
                        "id": msg_id,
                        "queue": queue,
                        "rank": rank,
                        "payload": payload,
                        "reason": reason,
                    },
                )
            else:
                self.dead_letter(msg_id, reason)
        return messages

    def _payload(self, msg_id: int, payload: str, redelivered: bool) -> dict[str, Any]:
        message = envelope.parse(payload, self.codecs)
        props = message["properties"]
        props["delivery_tag"] = msg_id
        props["delivery_info"]["redelivered"] = bool(redelivered)
        message["redelivered"] = bool(redelivered)
        return message

    def dead_letter(self, delivery_tag: int, reason: str) -> None:
        """Move a taken message to ``dead_letters`` with ``reason``."""
        self._execute(self._stmts.dead_letter, {"id": delivery_tag, "reason": reason[:2000]})

    def consumer_failed(self, delivery_tag: int, exc: BaseException) -> None:
        """The consumer's callback raised on a message: dead-letter it (if it
        is still held), so it costs that message, never the consumer."""
        reason = f"the consumer failed on this message: {exc!r}"
        logger.error("Dead-lettering message %s: %s", delivery_tag, reason, exc_info=exc)
        self.dead_letter(delivery_tag, reason)
        self.qos._quick_ack(delivery_tag)  # its prefetch slot is free again

    def note_reject_reason(self, delivery_tag: int, reason: str) -> None:
        """Say why the next ``reject(requeue=False)`` of ``delivery_tag`` happens."""
        self._reject_reasons[delivery_tag] = reason

    def record_reject_reason(self, delivery_tag: int, reason: str) -> None:
        """Replace the generic reason of a message this channel dead-lettered
        already (the stock worker says why only after rejecting)."""
        if not self._opts.dead_letter_rejected:
            return
        try:
            self._execute(
                self._stmts.dead_letter_reason, {"id": delivery_tag, "reason": reason[:2000]}
            )
        except (psycopg.Error, DatabaseUnavailable) as exc:  # the row keeps the generic reason
            logger.debug("Could not record the reject reason: %s", exc)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """Take one message synchronously (``None`` when the queue is empty).

        Rows refused on the way (dead-lettered) do not end the search."""
        taken = self._take(queue, 1, no_ack)
        while not taken and self._refused:
            taken = self._take(queue, 1, no_ack)
        if not taken:
            return None
        message = self.Message(taken[0], channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def _ack(self, delivery_tag: int) -> None:
        # Acks made on the event loop's thread (or inside a delivery batch)
        # leave together at the next loop tick, before the loop blocks again:
        # with the next claim of this channel if there is one, else in one
        # statement of their own. Acks from any other thread are written at once.
        if self._live().defer_acks_here():
            self._deferred_acks.append(delivery_tag)
            self._acks_thread = threading.get_ident()
            self.connection._ack_channels.add(self)
        else:
            self._execute(self._ack_sql, {"id": delivery_tag})

    def flush_acks(self) -> None:
        """Write the acks deferred during a delivery batch."""
        tags, self._deferred_acks = self._deferred_acks, []
        if tags:
            try:
                self._execute(self._ack_many_sql, {"ids": tags})
            except BaseException:
                self._deferred_acks[:0] = tags  # still to be written
                raise

    def _db_requeue(self, tags: Iterable[int]) -> None:
        ids = list(tags)
        # Under the id the messages were leased to, even when that consumer
        # was declared dead meanwhile (its session ended): whatever is still
        # leased to it goes back.
        consumer = self.connection.consumer_id_or_none()
        if not ids or consumer is None:
            return
        self._execute(
            self._requeue_sql,
            {"ids": ids, "consumer": consumer, "prefix": self._stmts.channel_prefix},
        )

    def _restore(self, message: Any) -> None:
        self._db_requeue([message.delivery_tag])

    # -- declarations ------------------------------------------------------------

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
        exchange = _check_name("exchange", exchange or f"amq.{type}")
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
        exchange = _check_name("exchange", exchange or "amq.direct")
        _check_name("queue", queue)
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
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
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
        _check_name("queue", queue)
        args = kwargs.get("arguments") or {}
        wanted = (
            bool(kwargs.get("durable", True)),
            bool(kwargs.get("auto_delete", False)),
            _milliseconds(args.get("x-expires"), "x-expires"),
            _milliseconds(args.get("x-message-ttl"), "x-message-ttl"),
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

    def close(self) -> None:
        if not self.closed:
            if self.connection.parked:  # written by the consumer's next connection
                self.connection.unwritten_acks += self._deferred_acks
                self._deferred_acks = []
            else:
                self.flush_acks()
        super().close()


_Channel = Channel


class Transport(virtual.Transport):
    """The ``pgnotify://`` transport."""

    Channel = Channel

    driver_type = "pgnotify"
    driver_name = "psycopg"
    default_port = 5432  # type: ignore[assignment]
    can_parse_url = True
    polling_interval = None  # type: ignore[assignment]

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    # Celery's reconnect and publish-retry logic key off these tuples.
    connection_errors = virtual.Transport.connection_errors + (  # type: ignore[assignment]
        psycopg.OperationalError,
        psycopg.InterfaceError,
        DatabaseUnavailable,
    )
    channel_errors = virtual.Transport.channel_errors + (  # type: ignore[assignment]
        psycopg.ProgrammingError,
        psycopg.IntegrityError,
        psycopg.DataError,
        psycopg.InternalError,
        psycopg.NotSupportedError,
        InvalidName,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.state = BrokerState()
        self.opts = TransportOptions.from_mapping(client.transport_options or {})
        url = client.hostname if "://" in (client.hostname or "") else self._url_from_parts()
        self.conninfo = conninfo_from_url(url, self.opts.dsn, self.opts.connect_timeout)
        self.stmts = pgsql.statements(self.opts.schema)
        self._conn: psycopg.Connection[Any] | None = None
        self._claiming_conn: psycopg.Connection[Any] | None = None
        #: set by :meth:`park`
        self.parked = False
        #: acks of closed channels, once parked, for the next connection
        self.unwritten_acks: list[int] = []
        self._listener: Listener | None = None
        self._pid = os.getpid()
        self._consumers: dict[str, _Channel] = {}
        self._pending: set[str] = set()
        self._delivering: int | None = None
        self._loop_thread: int | None = None
        # The event loop this transport registered with (the stock worker's
        # hub) and its polling timer: left when the connection closes.
        self._loop: Any = None
        self._poll_timer: Any = None
        self._woken = threading.Event()
        self._next_poll = time.monotonic() + self.opts.polling_interval
        self._ack_channels: set[_Channel] = set()
        forget_after_fork(self)

    def _url_from_parts(self) -> str:
        c = self.client
        assert c is not None
        user = c.userid or ""
        auth = f"{user}:{c.password}@" if c.password else (f"{user}@" if user else "")
        host = c.hostname or "localhost"
        port = f":{c.port}" if c.port else ""
        vhost = c.virtual_host if c.virtual_host not in (None, "/") else ""
        return f"postgresql://{auth}{host}{port}/{vhost.lstrip('/')}"

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        return uri if include_password else mask_url(uri, mask)

    # -- connections ---------------------------------------------------------

    def work_conn(self) -> psycopg.Connection[Any]:
        """The shared connection for publish/claim/ack (opened on demand)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = connect(self.conninfo)
            pgsql.ensure_schema(conn, self.conninfo, self.opts.schema, self.opts.auto_migrate)
        return conn

    def claim_conn(self) -> psycopg.Connection[Any]:
        """The work connection, once set up for claiming (see
        :data:`celery_pgnotify.sql.CLAIMING_SESSION`)."""
        conn = self.work_conn()
        if conn is not self._claiming_conn:
            # Only consuming processes claim, and they are never behind a
            # transaction pooler (LISTEN needs a session): the setting stays
            # with this session and never reaches another client's.
            conn.execute(pgsql.CLAIMING_SESSION)
            self._claiming_conn = conn
        return conn

    def establish_connection(self) -> Transport:
        self.work_conn()
        return super().establish_connection()  # type: ignore[no-any-return]

    def close_connection(self, connection: Any) -> None:
        try:
            if os.getpid() == self._pid:
                self._leave_event_loop()
            super().close_connection(connection)
        finally:
            if os.getpid() == self._pid:
                listener, self._listener = self._listener, None
                if listener is not None:
                    listener.stop(release=not self.parked)
                    if self.parked and listener.consumer_id is not None:
                        # With the acks this connection could not write.
                        acks = self.unwritten_acks
                        acks += [tag for ch in self.channels for tag in ch._deferred_acks]
                        _parked_consumers[self._parking_key()] = (listener.consumer_id, acks)
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

    def _forget_after_fork(self) -> None:
        self._conn = None
        self._listener = None
        self._consumers = {}
        self._pending = set()
        self._ack_channels = set()
        self._loop_thread = None
        self._pid = os.getpid()

    def listener(self) -> Listener:
        """The consumer session, started on first need.

        Raises a connection error when its thread has ended: without it this
        process is no live consumer, and must reconnect before claiming more.
        """
        if self._listener is None:
            adopted, acks = _parked_consumers.pop(self._parking_key(), (None, []))
            listener = Listener(self.conninfo, self.stmts, self.opts, consumer_id=adopted)
            listener.start()
            self._listener = listener
            if acks:
                # Written whether or not the consumer survived: these tasks
                # ran, and a message given back meanwhile must not run again.
                ack_many = (
                    self.stmts.ack_many if self.opts.async_acks else self.stmts.ack_many_flushed
                )
                self.work_conn().execute(ack_many, {"ids": acks})
        else:
            self._check_listener()
        return self._listener

    def _check_listener(self) -> None:
        listener = self._listener
        if listener is None or listener.is_alive():
            return
        if listener.reaped:
            raise DatabaseUnavailable(
                f"consumer {listener.consumer_id} was declared dead while it lived; reconnecting"
            )
        raise DatabaseUnavailable("the consumer's LISTEN session has stopped")

    def alive_for_sure(self) -> bool:
        """False while this process's consumer has not proved itself alive
        for ``lease_timeout`` (frozen, stalled, cut off): it may have been
        declared dead and its messages given to others, so it should start
        nothing new until its next heartbeat says."""
        listener = self._listener
        if listener is None or not listener.is_alive():
            return False
        return listener.heartbeat_age() < self.opts.lease_timeout

    def reconcile(self, held: Iterable[int]) -> int:
        """After taking over a parked consumer: give back what is leased to
        it but not held by this process (a claim whose reply was lost, a
        batch that failed half-way, an ack undone by a crash); returns how
        many went back."""
        rows = (
            self.work_conn()
            .execute(
                self.stmts.release_unheld,
                {
                    "consumer": self.consumer_id(),
                    "held": list(held),
                    "prefix": self.stmts.channel_prefix,
                },
            )
            .fetchall()
        )
        return sum(int(r[1]) for r in rows)

    def park(self) -> None:
        """This connection is lost, not closed: its consumer carries on on the
        process's next connection to the same database and schema.

        Closing it then keeps the leases (nothing goes back to the queues)
        and hands the consumer id to the next listener this process starts,
        which takes the consumer's session lock again. Whoever calls this must
        go on consuming and settle every message it holds (see
        :attr:`resumed`); if it does not come back, the leases run out as a
        dead consumer's do.
        """
        self.parked = True

    @property
    def resumed(self) -> bool:
        """True when this connection's consumer is a parked one taken over
        with its leases intact (not reaped in between)."""
        return self._listener is not None and self._listener.resumed

    def _parking_key(self) -> tuple[int, str, str]:
        return (os.getpid(), self.conninfo, self.opts.schema)

    def consumer_id(self) -> int:
        """The id this process's leases are taken under."""
        cid = self.listener().consumer_id
        assert cid is not None
        return cid

    def consumer_id_or_none(self) -> int | None:
        return self._listener.consumer_id if self._listener is not None else None

    def _consume(self, queue: str, channel: _Channel) -> None:
        self._consumers[queue] = channel
        self.listener().set_queues(self._consumers)
        self._pending.add(queue)

    def _cancel(self, queue: str) -> None:
        self._consumers.pop(queue, None)
        self._pending.discard(queue)
        listener = self._listener
        if listener is None:
            return
        if (
            self._consumers
            or self._holds_messages()
            or self._loop_thread is not None
            or self.parked
        ):
            listener.set_queues(self._consumers)
            return
        # Nothing consumed and nothing held (e.g. the reply consumer of
        # `celery inspect` on a pooled connection): end the session to free
        # its connection and thread; the next consumer starts a new one.
        # (Inside Celery's event loop the session stays: the loop watches it.)
        self._listener = None
        listener.stop()

    def _holds_messages(self) -> bool:
        return any(ch._qos is not None and ch._qos._delivered for ch in self.channels)

    # -- delivering ----------------------------------------------------------

    def _claim_pending(self) -> bool:
        """Claim and deliver from notified queues; True if anything was delivered."""
        delivered = False
        try:
            for queue in list(self._pending):
                channel = self._consumers.get(queue)
                if channel is None:
                    self._pending.discard(queue)
                    continue
                limit = channel.claim_limit()
                if not limit:
                    continue  # prefetch full: stays pending until acks free room
                messages = channel.claim(queue, limit)
                if len(messages) + channel._refused < limit:  # the queue is drained
                    self._pending.discard(queue)
                if self._deliver_batch(queue, channel, messages):
                    delivered = True
        finally:
            self._flush_acks()
        return delivered

    def _deliver_batch(self, queue: str, channel: _Channel, messages: list[dict[str, Any]]) -> bool:
        callback = self._callbacks.get(queue)
        if callback is None:
            channel._db_requeue(m["properties"]["delivery_tag"] for m in messages)
            return False
        with self.batched_acks():
            for i, message in enumerate(messages):
                try:
                    callback(message)
                except self.connection_errors:
                    raise
                except Exception as exc:  # noqa: BLE001 - costs this message, never the batch
                    channel.consumer_failed(message["properties"]["delivery_tag"], exc)
                except BaseException:
                    # Claimed but never handed over: back to the queue at once.
                    channel._db_requeue(m["properties"]["delivery_tag"] for m in messages[i + 1 :])
                    raise
        return bool(messages)

    @contextlib.contextmanager
    def batched_acks(self, write: bool = True) -> Iterator[None]:
        """Acks made by this thread inside the block leave in one statement:
        at its end, or (``write`` false) with the claim of this thread's next
        :meth:`drain_events`, which writes them before it blocks anyway."""
        previous, self._delivering = self._delivering, threading.get_ident()
        try:
            yield
        finally:
            self._delivering = previous
            if write:
                self._flush_acks()

    def defer_acks_here(self) -> bool:
        """True on the event loop's thread, or inside a delivery batch."""
        me = threading.get_ident()
        return me == self._delivering or me == self._loop_thread

    def _flush_acks(self) -> None:
        while self._ack_channels:
            self._ack_channels.pop().flush_acks()

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver what is ready, else block on the LISTEN wake-up.

        Returns after delivering, or when :meth:`wakeup` was called; raises
        ``socket.timeout`` when ``timeout`` passes with nothing to do.
        """
        listener = self.listener()
        clock = time.monotonic
        deadline = None if timeout is None else clock() + timeout
        while True:
            self._check_listener()
            self._pending |= listener.take_notified()
            if self._claim_pending() or self._take_wakeup():
                return
            now = clock()
            if now >= self._next_poll:
                self._pending |= set(self._consumers)
                self._next_poll = now + self.opts.polling_interval
                continue
            if deadline is not None and now >= deadline:
                raise TimeoutError()
            wait = self._next_poll - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            wait_readable([listener.wake_fd], wait)

    def wakeup(self) -> None:
        """Make a blocked :meth:`drain_events` return (thread-safe)."""
        self._woken.set()
        if self._listener is not None:
            self._listener.wake()

    def _take_wakeup(self) -> bool:
        if self._woken.is_set():
            self._woken.clear()
            return True
        return False

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        listener = self.listener()
        self._loop_thread = threading.get_ident()
        self._loop = loop
        loop.add_reader(listener.wake_fd, self._on_wake)
        self._poll_timer = loop.call_repeatedly(self.opts.polling_interval, self._poll_all)
        loop.on_tick.add(self._on_tick)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        self._leave_event_loop()
        self._flush_acks()

    def _leave_event_loop(self) -> None:
        """Take this transport's reader, timer and tick callback out of the
        event loop. Celery does not ask when it reconnects: it drops the
        readers and makes a new transport, and the old one's timer and tick
        would otherwise go on running (and claiming) for the process's life."""
        loop, self._loop = self._loop, None
        timer, self._poll_timer = self._poll_timer, None
        self._loop_thread = None
        if loop is None:
            return
        if timer is not None:
            timer.cancel()
        loop.on_tick.discard(self._on_tick)
        if self._listener is not None and self._listener.wake_fd >= 0:
            loop.remove(self._listener.wake_fd)

    def _on_wake(self, *args: Any) -> None:
        if self._listener is not None:
            self._pending |= self._listener.take_notified()
        self._claim_pending()

    def _on_tick(self) -> None:
        # Runs before the loop blocks: resume claiming if acks have freed
        # prefetch room (the acks leave with the claim), and write the acks
        # no claim took.
        self._check_listener()
        if self._pending:
            self._claim_pending()
        self._flush_acks()

    def _poll_all(self) -> None:
        self._pending |= set(self._consumers)
        self._claim_pending()

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "localhost"}


connect_celery_signals()
