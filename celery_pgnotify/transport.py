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

import logging
import os
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from kombu.transport import virtual
from kombu.transport.virtual.base import BrokerState

from celery_pgnotify import envelope, migrations, ops, statements
from celery_pgnotify.batching import Gathering, gather_groups
from celery_pgnotify.connect import (
    conninfo_from_url,
    forget_after_fork,
    mask_url,
)
from celery_pgnotify.deadletters import DeadLettering, connect_celery_signals
from celery_pgnotify.delivery import Delivery
from celery_pgnotify.enqueue import current_connection
from celery_pgnotify.envelope import Refused
from celery_pgnotify.errors import (
    DatabaseUnavailable,
    InvalidName,
    MessageTooLarge,
)
from celery_pgnotify.listener import Listener
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.promoter import inspect_entry
from celery_pgnotify.remote import extend_remote_control
from celery_pgnotify.revoking import REVOKE_EXPIRES, remember_revoked, revoked_by
from celery_pgnotify.session import ConsumerSession
from celery_pgnotify.topology import Topology, check_name, milliseconds

logger = logging.getLogger(__name__)

#: Most broker-held tasks one worker lists in ``celery inspect scheduled``.
INSPECT_SCHEDULED_LIMIT = 1000


class QoS(virtual.QoS):
    """Prefetch accounting whose acks and rejects reach the database."""

    channel: Channel

    def ack(self, delivery_tag: int) -> None:
        self.channel._ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: int, requeue: bool = False) -> None:
        if requeue:
            self.channel.requeue_taken([delivery_tag])
        elif self.channel._opts.dead_letter_rejected:
            self.channel.dead_letter(delivery_tag, self.channel.reject_reason(delivery_tag))
        else:
            self.channel._ack(delivery_tag)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Return every unacked message to its queue in one statement."""
        self._flush()
        if self.channel.connection.session.parked:
            # The consumer carries on on its next connection: it keeps them.
            self._delivered.clear()
            return []
        tags = [tag for tag in self._delivered if tag not in self._dirty]
        self._delivered.clear()
        if not tags:
            return []
        try:
            self.channel.requeue_taken(tags)
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


class Channel(Topology, DeadLettering, Gathering, virtual.Channel):
    """A channel over the transport's shared work connection."""

    QoS = QoS
    connection: Transport
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._stmts = connection.stmts
        self._opts = connection.opts
        # What a consumer writes (claims, acks, requeues) may commit without
        # waiting for the WAL flush: see the async_acks transport option.
        self._writes = self._stmts.writes(self._opts.async_acks)
        # Publishes wait for the WAL flush unless durable_publish is off; one
        # inside enqueue_in(conn) always does (the caller's transaction is
        # never made less durable than it is).
        self._publishes = self._stmts.publishes(self._opts.durable_publish)
        self._declared_exchanges: dict[str, str] = {}
        self._deferred_acks: list[int] = []
        self._acks_thread: int | None = None  # the thread that deferred them
        self._no_ack_queues: set[str] = set()
        self.refused = 0  # rows of the last claim dead-lettered as they were taken

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

    def _consumer_id(self) -> int | None:
        return self.connection.session.consumer_id_or_none()

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
        revoked = revoked_by(message, exchange)
        if revoked:
            # Recorded before the broadcast: a worker starting meanwhile
            # misses the broadcast but finds the record.
            self._execute(self._stmts.record_revokes, {"ids": revoked, "expires": REVOKE_EXPIRES})
        self._inplace_augment_message(message, exchange, routing_key)
        props = message["properties"]
        payload = envelope.dumps(message)
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
            "ttl": milliseconds(expiration, "expiration"),
            "prefix": self._stmts.channel_prefix,
            "fresh": self._opts.fresh,
            "task_id": None if headers.get("id") is None else str(headers["id"]),
        }
        # A task due later waits in the database, not in a worker's memory.
        # Inside enqueue_in(conn): the row is written in the caller's transaction.
        through = current_connection(headers)
        params["wake_all"] = through is not None  # it commits later (see fragments.wake)
        publishes = self._stmts.durable_publishes if through is not None else self._publishes
        due = envelope.due_time(headers, self._opts.broker_eta_threshold)
        if due is not None and self._opts.broker_etas:
            params["due"] = due
            routed, direct = publishes.schedule_routed, publishes.schedule_direct
        else:
            routed, direct = publishes.publish_routed, publishes.publish_direct
        if self._gather(exchange, routing_key, params, through):
            return
        execute = through.execute if through is not None else self._execute
        if exchange:
            params.update(exchange=exchange, rk=routing_key or "")
            rows = execute(routed, params).fetchall()
            if not rows:
                self._unrouted(exchange, routing_key)
        else:
            params["queue"] = check_name("queue", routing_key)
            execute(direct, params)

    def _unrouted(self, exchange: str, routing_key: str) -> None:
        # A broadcast nobody listens to (no worker up for `celery inspect`)
        # is routine; a direct or topic message matching no queue is lost data.
        log = logger.debug if self._exchange_type(exchange) == "fanout" else logger.warning
        log("Message to exchange %r key %r matched no queue; dropped", exchange, routing_key)

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
        if self.connection.session.parked:
            return  # the consumer comes back on its next connection
        try:
            row = self._execute(self._stmts.queue_auto_delete, {"name": queue}).fetchone()
            if row and row[0] and not self._consumed_elsewhere(queue):
                self.queue_delete(queue)
        except psycopg.Error as exc:
            logger.debug("auto_delete check for %r failed: %s", queue, exc)

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
            rows = conn.execute(self._writes.take_no_ack, params).fetchall()
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
                "prefix": self._stmts.channel_prefix,
                "fresh": self._opts.fresh,
            }
            started = time.perf_counter()
            try:
                rows = conn.execute(self._writes.claim, params).fetchall()
            except BaseException:
                self._deferred_acks[:0] = acks  # still to be written
                raise
            self.connection.session.claimed(time.perf_counter() - started, bool(rows))
        rows.sort(key=lambda r: (-r[1], r[0]))
        self.refused = 0
        messages = []
        for msg_id, rank, payload, redelivered, size, revoked in rows:
            if payload is None or size > max_size:
                reason = f"message of {size} bytes exceeds max_message_size ({max_size})"
            else:
                try:
                    message = self._payload(msg_id, payload, redelivered)
                except Refused as exc:
                    reason = f"malformed message: {exc}"
                except Exception as exc:  # noqa: BLE001 - whatever it is, it costs this row only
                    reason = f"malformed message: {exc!r}"
                else:
                    if revoked:  # revoked while no worker was there to hear it
                        remember_revoked((message.get("headers") or {}).get("id"))
                    messages.append(message)
                    continue
            self.refused += 1
            self.refuse(queue, msg_id, reason, taken=(rank, payload) if no_ack else None)
        return messages

    def _payload(self, msg_id: int, payload: str, redelivered: bool) -> dict[str, Any]:
        message = envelope.parse(payload, self.codecs)
        props = message["properties"]
        props["delivery_tag"] = msg_id
        props["delivery_info"]["redelivered"] = bool(redelivered)
        message["redelivered"] = bool(redelivered)
        return message

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """Take one message synchronously (``None`` when the queue is empty).

        Rows refused on the way (dead-lettered) do not end the search."""
        taken = self._take(queue, 1, no_ack)
        while not taken and self.refused:
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
        delivery = self._live().delivery
        if delivery.defer_acks_here():
            self._deferred_acks.append(delivery_tag)
            self._acks_thread = threading.get_ident()
            delivery.ack_channels.add(self)
        else:
            self._execute(self._writes.ack, {"id": delivery_tag})

    def flush_acks(self) -> None:
        """Write the acks deferred during a delivery batch."""
        tags, self._deferred_acks = self._deferred_acks, []
        if tags:
            try:
                self._execute(self._writes.ack_many, {"ids": tags})
            except BaseException:
                self._deferred_acks[:0] = tags  # still to be written
                raise

    def requeue_taken(self, tags: Iterable[int]) -> None:
        ids = list(tags)
        # Under the id the messages were leased to, even when that consumer
        # was declared dead meanwhile (its session ended): whatever is still
        # leased to it goes back.
        consumer = self._consumer_id()
        if not ids or consumer is None:
            return
        self._execute(
            self._writes.requeue,
            {"ids": ids, "consumer": consumer, "prefix": self._stmts.channel_prefix},
        )

    def _restore(self, message: Any) -> None:
        self.requeue_taken([message.delivery_tag])

    def close(self) -> None:
        if not self.closed:
            if self.connection.session.parked:  # written by the consumer's next connection
                self.connection.session.unwritten_acks += self._deferred_acks
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
        self.stmts = statements.statements(self.opts.schema)
        self._conn: psycopg.Connection[Any] | None = None
        self._claiming_conn: psycopg.Connection[Any] | None = None
        #: this connection's consumer: its LISTEN session, park and resume
        self.session = ConsumerSession(self.conninfo, self.stmts, self.opts, self.work_conn)
        self._pid = os.getpid()
        #: claiming and delivering, in drain_events or Celery's event loop
        self.delivery = self._new_delivery()
        forget_after_fork(self)

    def _new_delivery(self) -> Delivery:
        return Delivery(
            self.session,
            self.opts,
            lambda queue: self._callbacks.get(queue),
            self.connection_errors,
        )

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
            conn = self._conn = migrations.connect_current(
                self.conninfo, self.opts.schema, self.opts.auto_migrate
            )
        return conn

    def claim_conn(self) -> psycopg.Connection[Any]:
        """The work connection, once set up for claiming (see
        :data:`celery_pgnotify.statements.CLAIMING_SESSION`)."""
        conn = self.work_conn()
        if conn is not self._claiming_conn:
            # Only consuming processes claim, and they are never behind a
            # transaction pooler (LISTEN needs a session): the setting stays
            # with this session and never reaches another client's.
            conn.execute(statements.CLAIMING_SESSION)
            self._claiming_conn = conn
        return conn

    def establish_connection(self) -> Transport:
        self.work_conn()
        return super().establish_connection()  # type: ignore[no-any-return]

    def close_connection(self, connection: Any) -> None:
        try:
            if os.getpid() == self._pid:
                self.delivery.leave_event_loop()
            super().close_connection(connection)
        finally:
            if os.getpid() == self._pid:
                # With the acks this connection could not write (if parked).
                self.session.close([tag for ch in self.channels for tag in ch._deferred_acks])
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

    def _forget_after_fork(self) -> None:
        self._conn = None
        self.session.forget_after_fork()
        self.delivery = self._new_delivery()
        self._pid = os.getpid()

    # -- the consumer (see session.py) and what celery-pg worker asks of it ----

    def listener(self) -> Listener:
        """The consumer's LISTEN session, started on first need."""
        return self.session.listener()

    def consumer_id(self) -> int:
        """The id this connection's leases are taken under."""
        return self.session.consumer_id()

    def alive_for_sure(self) -> bool:
        """False while this process's consumer has not proved itself alive
        for ``lease_timeout`` (frozen, stalled, cut off): it may have been
        declared dead and its messages given to others, so it should start
        nothing new until its next heartbeat says."""
        return self.session.alive_for_sure()

    def scheduled(
        self, hostname: str, limit: int = INSPECT_SCHEDULED_LIMIT
    ) -> list[dict[str, Any]]:
        """The tasks of this consumer's queues waiting in the database until
        due, as ``celery inspect scheduled`` lists them (see promoter.py)."""
        me = self.session.consumer_id_or_none()
        if me is None:
            return []
        params = {"queues": sorted(self.delivery.consumers), "limit": limit, "me": me}
        rows = self.work_conn().execute(self.stmts.inspect_scheduled, params).fetchall()
        entries = (inspect_entry(payload, due, rank, hostname) for payload, due, rank in rows)
        return [entry for entry in entries if entry is not None]

    def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause or resume ``queue`` for every worker (see ``celery-pg pause``);
        False when it was so already."""
        action = ops.pause if paused else ops.resume
        return action(self.work_conn(), self.stmts, check_name("queue", queue))

    def park(self) -> None:
        """This connection is lost, not closed: its consumer carries on on the
        process's next connection to the same database and schema.

        Closing it then keeps the leases (nothing goes back to the queues)
        and hands the consumer over to the next listener this process starts,
        which takes the consumer's session lock again. Whoever calls this must
        go on consuming and settle every message it holds (see
        :attr:`resumed`); if it does not come back, the leases run out as a
        dead consumer's do.
        """
        self.session.parked = True

    @property
    def resumed(self) -> bool:
        """True when this connection's consumer is a parked one taken over
        with its leases intact (not reaped in between)."""
        return self.session.resumed

    def reconcile(self, held: Iterable[int]) -> int:
        """After taking over a parked consumer: give back what is leased to
        it but not held by this process (a claim whose reply was lost, a
        batch that failed half-way, an ack undone by a crash); returns how
        many went back."""
        return self.session.reconcile(held)

    def _consume(self, queue: str, channel: _Channel) -> None:
        extend_remote_control()  # a consuming process may be a stock worker
        self.delivery.consume(queue, channel)
        self.listener().set_queues(self.delivery.consumers)

    def _cancel(self, queue: str) -> None:
        delivery = self.delivery
        delivery.cancel(queue)
        listener = self.session.current()
        if listener is None:
            return
        if (
            delivery.consumers
            or self._holds_messages()
            or delivery.loop_thread is not None
            or self.session.parked
        ):
            listener.set_queues(delivery.consumers)
            return
        # Nothing consumed and nothing held (e.g. the reply consumer of
        # `celery inspect` on a pooled connection): end the session.
        # (Inside Celery's event loop the session stays: the loop watches it.)
        self.session.stop()

    def _holds_messages(self) -> bool:
        return any(ch._qos is not None and ch._qos._delivered for ch in self.channels)

    # -- delivering (see delivery.py) ------------------------------------------

    def batched_acks(self, write: bool = True) -> AbstractContextManager[None]:
        """Acks made by this thread inside the block leave in one statement."""
        return self.delivery.batched_acks(write)

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver what is ready, else block on the LISTEN wake-up (until
        :meth:`wakeup`, or ``TimeoutError`` after ``timeout``)."""
        self.delivery.drain_events(timeout)

    def wakeup(self) -> None:
        """Make a blocked :meth:`drain_events` return (thread-safe)."""
        self.delivery.wakeup()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.delivery.register(loop)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        self.delivery.leave_event_loop()
        self.delivery.flush_acks()

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": self.default_port, "hostname": "localhost"}


connect_celery_signals()
gather_groups()
