"""The main process of ``celery-pg worker``: its lifecycle on the broker.

A kombu :class:`~kombu.mixins.ConsumerMixin` receives task messages over the
app's broker connection. The manager wires the parts and runs the loop; each
part is its own small class:

- ``intake.py``: a message becomes a job on the pool, or is held, discarded
  or dead-lettered;
- ``holding.py``: ETA and rate-limited messages held until due;
- ``pool.py``: the children; its results thread reports what they do;
- ``settling.py``: a child's report becomes an ack, requeue or dead letter
  (Celery's rules, ``outcomes.py``);
- ``limits.py``: hard time limits and cancellation; ``autoscale.py``;
- ``events.py``: Celery's monitoring events; ``control.py``: remote control.

The pool's results thread only queues events and wakes the loop; everything
else runs on the main thread, between two ``drain_events`` calls. A lost
broker connection is not a closed one: the manager goes on as the same
consumer on the next, keeping the messages it holds (see
:meth:`Manager._carry_over`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any

from celery import signals
from kombu.messaging import Consumer
from kombu.mixins import ConsumerMixin

from celery_pgnotify import deadletters
from celery_pgnotify.options import AppSettings
from celery_pgnotify.remote import HoldsTasks, pause_reply
from celery_pgnotify.worker import control
from celery_pgnotify.worker.autoscale import Autoscaler
from celery_pgnotify.worker.broker import broker_of
from celery_pgnotify.worker.events import WorkerEvents
from celery_pgnotify.worker.holding import Holding
from celery_pgnotify.worker.intake import Intake
from celery_pgnotify.worker.limits import Limits
from celery_pgnotify.worker.pool import Event, Pool, PoolSettings
from celery_pgnotify.worker.settling import Settler, settle
from celery_pgnotify.worker.state import Ledger, WorkerState

logger = logging.getLogger(__name__)


class _Stopped(Exception):
    """A stop was asked for while the broker could not be reached."""


class Manager(ConsumerMixin):
    """Consumes task messages and runs them on the pool."""

    def __init__(
        self,
        app: Any,
        queues: Iterable[Any],
        pool_settings: PoolSettings,
        hostname: str,
        prefetch_count: int,
        send_events: bool = False,
        beat: Any = None,
        autoscale: tuple[int, int] | None = None,
        own: AppSettings | None = None,
    ) -> None:
        own = own or AppSettings.from_conf(app.conf)
        self.app = app
        self.connection = app.connection_for_read()
        self.queues = list(queues)
        self.hostname = hostname
        self.prefetch_count = prefetch_count
        self.pool = Pool(pool_settings, self._on_pool_event, wake=self._wake)
        self.pool.may_start = self._alive_for_sure
        #: an embedded beat service (``-B``), started once the pool has forked
        self.beat = beat
        self.ledger = Ledger()
        self.holding = Holding(app)
        self.events = WorkerEvents(app, hostname, send_events, self.pool, self.ledger.processed)
        self.limits = Limits(app, self.pool, own.cancel_grace)
        self.settler = Settler(self.ledger, self.limits, self.events)
        self.intake = Intake(
            app,
            hostname,
            self.pool,
            self.ledger,
            self.holding,
            self.settler,
            self.events,
            on_hold=self._widen_prefetch,
            sender=self,
        )
        self.autoscaler = (
            None if autoscale is None else Autoscaler(self.pool, autoscale, own.autoscale_keepalive)
        )
        self._pool_events: collections.deque[Event] = collections.deque()
        self._consumer: Consumer | None = None
        self._active: Any = None  # the connection consumed on (the mixin clones ours)
        self._lost = False  # the last connection was lost, not closed
        self._cold = False
        self._stop_requested = 0
        self.node: Any = None
        # The dead letters it makes carry their reason already.
        deadletters.gives_own_reasons(self)

    # -- ConsumerMixin ---------------------------------------------------------

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        consumer = consumer_cls(
            queues=self.queues,
            on_message=self.intake.on_message,
            accept=self.app.conf.accept_content,
            prefetch_count=self.prefetch_count,
        )
        self._consumer = consumer
        consumers = [consumer]
        if self.app.conf.worker_enable_remote_control:
            mailbox = self.app.control.mailbox
            state: WorkerState = self  # all the handlers see of the manager
            self.node = mailbox.Node(
                self.hostname, state=state, handlers=control.HANDLERS, channel=channel
            )
            consumers.append(
                self.node.Consumer(
                    channel,
                    callbacks=[self.node.handle_message],
                    no_ack=True,
                    accept=mailbox.accept,
                )
            )
        return consumers

    @contextlib.contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        try:
            yield
        except connection.connection_errors + connection.channel_errors:
            # Lost, not closed: this manager goes on as the same consumer on
            # its next connection (see _carry_over), so closing this one must
            # not send the messages it holds back to their queues.
            broker_of(connection).park()
            self._lost = True
            raise

    def on_consume_ready(
        self, connection: Any, channel: Any, consumers: Any, **kwargs: Any
    ) -> None:
        if self._lost:
            self._lost = False
            self._carry_over(connection, channel)
        self._active = connection
        self.events.open(connection)
        logger.info(
            "%s ready: %d children consuming %s",
            self.hostname,
            self.pool.settings.concurrency,
            ", ".join(q.name for q in self.queues),
        )
        signals.worker_ready.send(sender=self)

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        # Consumers are cancelled, the connection is still open: the place
        # for a warm shutdown, so finishing tasks can still be acked.
        if self.should_stop:
            self._return_unstarted()
            if not self._cold:
                self.pool.stop()
            self._process_events()
        self.events.close(offline=self.should_stop)
        self._active = None

    def _alive_for_sure(self) -> bool:
        # Nothing new starts while this consumer may have been declared dead
        # (a stall or a freeze past lease_timeout): a thawed process cannot
        # know before its next heartbeat, and its jobs may be running elsewhere.
        return broker_of(self._active).alive_for_sure()

    def consume(
        self, limit: Any = None, timeout: Any = None, safety_interval: float = 1.0, **kwargs: Any
    ) -> Iterator[None]:
        """kombu's consuming loop, with each wait cut short at the time the
        earliest held message is due: a task held until its ETA starts then,
        not at the loop's next one-second tick."""
        with self.consumer_context(**kwargs) as (conn, _channel, _consumers):
            while not self.should_stop:
                self.on_iteration()
                due = self.holding.next_at()
                wait = safety_interval if due is None else due - time.time()
                try:
                    conn.drain_events(timeout=min(safety_interval, max(wait, 0.001)))
                except TimeoutError:
                    conn.heartbeat_check()
                except OSError:
                    if not self.should_stop:
                        raise
                else:
                    yield None

    def on_iteration(self) -> None:
        # drain_events comes next: the acks leave with its claim.
        self.pool.kick()  # jobs held back while liveness was in doubt
        self._process_events(write_acks=False)
        if self.intake.release_due():
            self._widen_prefetch()
        # Neither may cost the pool: a failure is logged and retried next turn.
        for what, step in (("time limits", self._enforce_limits), ("autoscale", self._autoscale)):
            try:
                step()
            except Exception:  # noqa: BLE001 - logged; the loop goes on
                logger.exception("celery-pg worker: %s failed", what)
        self.events.tick()

    def _enforce_limits(self) -> None:
        self.limits.enforce(self.ledger.inflight)

    def _autoscale(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.step()

    def _carry_over(self, connection: Any, channel: Any) -> None:
        """After a lost connection: settle what this manager holds through the
        new one, or let go of what the old one gave back."""
        broker = broker_of(connection)
        inflight = self.ledger.inflight
        if broker.resumed:
            # The same consumer, its leases intact: waiting, running and held
            # messages carry on; those not acked yet are settled on the new
            # channel (acks the old one could not write, the new one wrote).
            mine = [message for message, _ in inflight.values()] + self.holding.messages()
            held = [message for message in mine if not message.acknowledged]
            for message in held:
                message.channel = channel
                channel.qos.append(message, message.delivery_tag)
            # The table, not this process's memory, says what is leased to
            # it: whatever it does not hold goes back to its queue.
            returned = broker.reconcile([message.delivery_tag for message in mine])
            if returned:
                logger.warning("Reconnected: %d message(s) leased but not held went back", returned)
            self._widen_prefetch()
            logger.warning(
                "Reconnected as the same consumer: %d message(s) in hand carry on", len(held)
            )
            return
        # A new consumer: the old one's leases were released (or run out), so
        # messages not started are back in their queues; running them too
        # would run them twice.
        waiting = self.pool.queued(take=True)
        for job in waiting:
            inflight.pop(job.tag, None)
        dropped = len(waiting) + len(self.holding.clear())
        logger.warning("Reconnected: %d waiting message(s) left to their queues", dropped)

    @contextlib.contextmanager
    def establish_connection(self) -> Iterator[Any]:
        # kombu's own, but a stop ends the retries: the callback runs before
        # each attempt and each second of the wait between two (kombu's
        # retries otherwise go on for ever, SIGTERM or not).
        with self.create_connection() as conn:
            conn.ensure_connection(
                self.on_connection_error, self.connect_max_retries, callback=self._stop_retrying
            )
            yield conn

    def _stop_retrying(self) -> None:
        if self.should_stop:
            raise _Stopped

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("Broker connection error: %s; retrying in %.1fs", exc, interval)

    # -- running -----------------------------------------------------------------

    def start(self) -> None:
        """Run until SIGTERM/SIGINT (warm) or a second signal (cold)."""
        self.pool.start()  # children are forked before any connection exists
        if self.beat is not None:
            self.beat.start()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        try:
            self.run()
        except _Stopped:
            logger.info("Stopped before the broker could be reached")
        finally:
            self._shutdown()

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested += 1
        self.should_stop = True
        if self._stop_requested == 1:
            logger.info("Warm shutdown: running tasks finish, waiting ones go back")
        else:
            logger.warning("Cold shutdown: stopping children now")
            self._cold = True
            self.pool.terminate()
        self._wake()

    def request_stop(self, reason: str) -> None:
        logger.warning("%s: warm shutdown", reason)
        self._stop_requested += 1
        self.should_stop = True
        self._wake()

    def _wake(self) -> None:
        broker_of(self._active).wakeup()

    def _return_unstarted(self) -> None:
        """Jobs no child started, and ETA tasks held here, go back at once."""
        for job in self.pool.queued(take=True):
            entry = self.ledger.inflight.pop(job.tag, None)
            if entry is not None:
                settle(entry[0], "requeue")
        for message in self.holding.clear():
            settle(message, "requeue")

    def _shutdown(self) -> None:
        if self.beat is not None:
            self.beat.stop()
        # After a warm stop no child is left; on any other way out (an
        # error, a cold stop) remaining children are killed: their messages
        # come back through the lease.
        self.pool.terminate()
        signals.worker_shutdown.send(sender=self)
        logger.info("%s stopped", self.hostname)

    def _widen_prefetch(self) -> None:
        """The prefetch window: ``prefetch_count`` plus the ETA messages held."""
        if self._consumer is not None:
            self._consumer.qos(prefetch_count=self.prefetch_count + self.holding.eta_count)

    # -- pool events -----------------------------------------------------------------

    def _on_pool_event(self, event: Event) -> None:
        # Results thread: hand over to the main thread and wake it.
        self._pool_events.append(event)
        self._wake()

    def _process_events(self, write_acks: bool = True) -> None:
        if not self._pool_events:
            return
        with broker_of(self._active).batched_acks(write_acks):  # one statement for all
            self.settler.apply_all(self._pool_events)

    # -- what remote control may change (see control.py) ---------------------------------

    def revoke(self, task_id: str, terminate: bool = False) -> None:
        """Revoke ``task_id``: never start it; with ``terminate``, cancel it if running."""
        self.ledger.revoked.add(task_id)
        for job in self.pool.queued():
            if job.task_id == task_id and self.pool.unqueue(job.tag):
                message, task = self.ledger.inflight.pop(job.tag)
                self.settler.discard(message, task, task_id, "revoked")
        if terminate:
            for tag, (_pid, _started, job) in self.pool.running().items():
                if job.task_id == task_id:
                    self.limits.cancel(tag, task_id, "revoked")

    def reset_rate_limit(self, task_name: str) -> None:
        self.holding.reset_rate_limit(task_name)

    def held_by_broker(self) -> list[dict[str, Any]]:
        return broker_of(self._active).scheduled(self.hostname)

    def pause_queue(self, queue: Any, paused: bool) -> dict[str, str]:
        broker = broker_of(self._active)
        return pause_reply(broker if isinstance(broker, HoldsTasks) else None, queue, paused)
