"""The main process of ``celery-pg worker``: consume, hold ETAs, dispatch, ack.

A kombu :class:`~kombu.mixins.ConsumerMixin` receives task messages over the
app's broker connection and submits them to the :class:`~.pool.Pool`. The
pool's results thread reports what children do; the main thread acts on it
(acks, requeues) between two ``drain_events`` calls, woken at once through
the transport. Ack rules are Celery's: early by default (when a child takes
the task), after the task with ``acks_late``, requeued when a child is lost
and ``reject_on_worker_lost`` is set. A lost broker connection is not a
closed one: the manager goes on as the same consumer on the next, keeping
the messages it holds (see :meth:`Manager._carry_over`).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import signal
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from celery import signals
from celery.utils.collections import LimitedSet
from celery.utils.time import rate
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.mixins import ConsumerMixin
from kombu.serialization import prepare_accept_content
from kombu.utils.limits import TokenBucket

from celery_pgnotify.deadletters import reject_with_reason
from celery_pgnotify.envelope import parse_time
from celery_pgnotify.worker import control, outcomes
from celery_pgnotify.worker.broker import broker_of
from celery_pgnotify.worker.child import Job
from celery_pgnotify.worker.pool import Event, Pool, PoolSettings
from celery_pgnotify.worker.validate import Refused, check_task_headers, decode_body

logger = logging.getLogger(__name__)


#: Seconds without waiting jobs before an idle child is let go (as Celery's).
AUTOSCALE_KEEPALIVE = 30.0

#: Seconds between worker-heartbeat events (Celery's default frequency).
HEARTBEAT_FREQ = 2.0


def _request_view(message: Message, name: str, body: tuple[Any, Any, Any], hostname: str) -> Any:
    """What ``task_received`` handlers read of Celery's Request: id, name,
    args, kwargs, eta, expires, hostname, delivery_info, message."""
    from celery.app.task import Context

    headers = message.headers
    return Context(
        headers,
        name=name,
        task_name=name,
        args=body[0],
        kwargs=body[1],
        hostname=hostname,
        delivery_info=message.delivery_info,
        message=message,
    )


class Manager(ConsumerMixin):
    """Consumes task messages and runs them on the pool."""

    #: dead letters it makes already carry their reason (see deadletters.py)
    gives_reject_reasons = True

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
    ) -> None:
        self.app = app
        self.connection = app.connection_for_read()
        self.queues = list(queues)
        self.hostname = hostname
        self.prefetch_count = prefetch_count
        self.pool = Pool(pool_settings, self._on_pool_event)
        self.pool.may_start = self._alive_for_sure
        self._events: collections.deque[Event] = collections.deque()
        #: delivery tag -> (message, task) of every job given to the pool
        self._inflight: dict[int, tuple[Message, Any]] = {}
        #: messages held until a time: (when, seq, message, is_eta); rate-limited
        #: ones wait here too, but only ETA ones widen the prefetch window
        self._eta: list[tuple[float, int, Message, bool]] = []
        self._eta_held = 0
        self._lost = False  # the last connection was lost, not closed
        self._eta_seq = itertools.count()
        self._consumer: Consumer | None = None
        self._active: Any = None  # the connection consumed on (the mixin clones ours)
        self._cold = False
        self._stop_requested = 0
        #: ids revoked by broadcast (Celery's own bounded, expiring set)
        self.revoked = LimitedSet(maxlen=50_000, expires=3 * 3600)
        #: delivery tag -> (why, monotonic time to SIGKILL if still running)
        self._cancelling: dict[int, tuple[str, float]] = {}
        self._started: dict[int, float] = {}  # delivery tag -> monotonic start
        self._total: collections.Counter[str] = collections.Counter()
        self._born = time.time()
        self.node: Any = None
        self.send_events = send_events
        #: an embedded beat service (``-B``), started once the pool has forked
        self.beat = beat
        self._accept: set[str] = prepare_accept_content(app.conf.accept_content)
        #: (max, min) children, or None for a fixed size
        self.autoscale = autoscale
        self._buckets: dict[str, TokenBucket | None] = {}  # task name -> rate limit
        self._last_busy = time.monotonic()
        self._eventer: Any = None
        self._next_heartbeat = 0.0

    # -- ConsumerMixin ---------------------------------------------------------

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        consumer = consumer_cls(
            queues=self.queues,
            on_message=self.on_message,
            accept=self.app.conf.accept_content,
            prefetch_count=self.prefetch_count,
        )
        self._consumer = consumer
        consumers = [consumer]
        if self.app.conf.worker_enable_remote_control:
            mailbox = self.app.control.mailbox
            self.node = mailbox.Node(
                self.hostname, state=self, handlers=control.HANDLERS, channel=channel
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
        if self.send_events:
            self._eventer = self.app.events.Dispatcher(
                connection, hostname=self.hostname, enabled=True, groups=["worker", "task"]
            )
            self._event("worker-online", **self._worker_info())
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
            self._event("worker-offline", **self._worker_info())
        if self._eventer is not None:
            self._eventer.close()
            self._eventer = None
        self._active = None

    def _alive_for_sure(self) -> bool:
        # Nothing new starts while this consumer may have been declared dead
        # (a stall or a freeze past lease_timeout): a thawed process cannot
        # know before its next heartbeat, and its jobs may be running elsewhere.
        return broker_of(self._active).alive_for_sure()

    def on_iteration(self) -> None:
        # drain_events comes next: the acks leave with its claim.
        self.pool.kick()  # jobs held back while liveness was in doubt
        self._process_events(write_acks=False)
        self._release_due_etas()
        # Neither may cost the pool: a failure is logged and retried next turn.
        for step in (self._enforce_limits, self._autoscale):
            try:
                step()
            except Exception:  # noqa: BLE001 - logged; the loop goes on
                logger.exception("celery-pg worker: %s failed", step.__name__)
        if self._eventer is not None and time.monotonic() >= self._next_heartbeat:
            self._next_heartbeat = time.monotonic() + HEARTBEAT_FREQ
            self._event("worker-heartbeat", **self._worker_info())

    def _carry_over(self, connection: Any, channel: Any) -> None:
        """After a lost connection: settle what this manager holds through the
        new one, or let go of what the old one gave back."""
        broker = broker_of(connection)
        if broker.resumed:
            # The same consumer, its leases intact: waiting, running and held
            # messages carry on; those not acked yet are settled on the new
            # channel (acks the old one could not write, the new one wrote).
            held = [message for message, _ in self._inflight.values()]
            held += [message for _, _, message, _ in self._eta]
            held = [message for message in held if not message.acknowledged]
            for message in held:
                message.channel = channel
                channel.qos.append(message, message.delivery_tag)
            # The table, not this process's memory, says what is leased to
            # it: whatever it does not hold goes back to its queue.
            tags = [message.delivery_tag for message, _ in self._inflight.values()]
            tags += [message.delivery_tag for _, _, message, _ in self._eta]
            returned = broker.reconcile(tags)
            if returned:
                logger.warning("Reconnected: %d message(s) leased but not held went back", returned)
            self._set_prefetch(self.prefetch_count + self._eta_held)
            logger.warning(
                "Reconnected as the same consumer: %d message(s) in hand carry on", len(held)
            )
            return
        # A new consumer: the old one's leases were released (or run out), so
        # messages not started are back in their queues; running them too
        # would run them twice.
        waiting = self.pool.waiting()
        for job in waiting:
            self._inflight.pop(job.tag, None)
        dropped = len(waiting) + len(self._eta)
        self._eta.clear()
        self._eta_held = 0
        logger.warning("Reconnected: %d waiting message(s) left to their queues", dropped)

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

    def _wake(self) -> None:
        broker_of(self._active).wakeup()

    def _return_unstarted(self) -> None:
        """Jobs no child started, and ETA tasks held here, go back at once."""
        for job in self.pool.waiting():
            entry = self._inflight.pop(job.tag, None)
            if entry is not None:
                self._settle(entry[0], "requeue")
        for _, _, message, _ in self._eta:
            self._settle(message, "requeue")
        self._eta.clear()
        self._eta_held = 0

    def _settle(self, message: Message, action: str, reason: str = "") -> None:
        """ack/requeue/reject (dead-letter, saying ``reason``), tolerating a
        connection lost meanwhile.

        A message of a lost connection was returned to its queue when that
        connection closed (or comes back when its lease runs out).
        """
        try:
            if action == "ack":
                message.ack()
            elif action == "requeue":
                message.requeue()
            elif reason:
                reject_with_reason(message, reason)
            else:
                message.reject(requeue=False)
        except Exception as exc:  # noqa: BLE001 - logged; the lease covers the message
            logger.warning("Could not %s message %s: %s", action, message.delivery_tag, exc)

    def _shutdown(self) -> None:
        if self.beat is not None:
            self.beat.stop()
        # After a warm stop no child is left; on any other way out (an
        # error, a cold stop) remaining children are killed: their messages
        # come back through the lease.
        self.pool.terminate()
        signals.worker_shutdown.send(sender=self)
        logger.info("%s stopped", self.hostname)

    # -- messages ------------------------------------------------------------------

    def on_message(self, message: Message, held: bool = False) -> None:
        """A task message arrived (``held``: one this manager held for its ETA
        or rate limit comes due).

        Whatever goes wrong here costs this message only: it is dead-lettered
        with the reason, and the worker goes on.
        """
        try:
            self._receive(message, held)
        except Exception as exc:  # noqa: BLE001 - one message, never the pool
            logger.exception("celery-pg worker failed on message %s", message.delivery_tag)
            if not message.acknowledged:
                self._refuse(message, f"celery-pg worker failed on this message: {exc!r}")

    def _receive(self, message: Message, held: bool) -> None:
        headers = message.headers
        try:
            check_task_headers(headers)
            name, task_id = headers["task"], headers["id"]
            task = self.app.tasks.get(name)
            if task is None:
                self._refuse(message, f"unregistered task {name!r}")
                # As Celery's worker: the signal follows the reject.
                signals.task_unknown.send(
                    sender=self, message=message, exc=None, name=name, id=task_id
                )
                return
            body = decode_body(message, self._accept)
        except Refused as exc:
            self._refuse(message, str(exc))
            return
        if not held:
            logger.debug("Received %s[%s]", name, task_id)
            if signals.task_received.receivers:  # the request view costs a copy
                signals.task_received.send(
                    sender=self, request=_request_view(message, name, body, self.hostname)
                )
        if task_id in self.revoked:
            self._discard_revoked(message, task, task_id, "revoked")
            return
        expires = parse_time(headers.get("expires"))
        if expires is not None and expires < time.time():
            self._discard_revoked(message, task, task_id, "expired")
            return
        eta = parse_time(headers.get("eta"))
        if eta is not None and eta > time.time():
            # Held here, unacked: the lease keeps it safe however long; the
            # prefetch window grows so held tasks do not starve the pool.
            self._hold(eta, message, is_eta=True)
            return
        wait = self._rate_limited(task)
        if wait:
            # Over the task's rate_limit: held here until a token is due,
            # within the prefetch window (as Celery's worker does).
            self._hold(time.time() + wait, message, is_eta=False)
            return
        self._dispatch(message, task, name, task_id, headers, body, expires)

    def _hold(self, when: float, message: Message, is_eta: bool) -> None:
        heapq.heappush(self._eta, (when, next(self._eta_seq), message, is_eta))
        if is_eta:
            self._eta_held += 1
            self._set_prefetch(self.prefetch_count + self._eta_held)

    def reset_rate_limit(self, task_name: str) -> None:
        """Forget ``task_name``'s token bucket: its (new) rate_limit applies next."""
        self._buckets.pop(task_name, None)

    def _rate_limited(self, task: Any) -> float:
        """Seconds to wait for ``task``'s rate_limit (0: go now, token taken)."""
        if self.app.conf.worker_disable_rate_limits:
            return 0.0
        if task.name not in self._buckets:
            limit = rate(task.rate_limit or self.app.conf.task_default_rate_limit)
            self._buckets[task.name] = TokenBucket(limit, capacity=1) if limit else None
        bucket = self._buckets[task.name]
        if bucket is None or bucket.can_consume(1):
            return 0.0
        return max(float(bucket.expected_time(1)), 0.001)

    def _refuse(self, message: Message, reason: str) -> None:
        """Dead-letter a message no worker can run, saying why."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        logger.error(
            "Dead-lettering message %s (task %r, id %r): %s",
            message.delivery_tag,
            headers.get("task"),
            headers.get("id"),
            reason,
        )
        try:
            reject_with_reason(message, reason)
        except Exception as exc:  # noqa: BLE001 - logged; the lease covers the message
            logger.warning("Could not dead-letter message %s: %s", message.delivery_tag, exc)

    def _dispatch(
        self,
        message: Message,
        task: Any,
        name: str,
        task_id: str,
        headers: dict[str, Any],
        body: tuple[Any, Any, Any],
        expires: float | None,
    ) -> None:
        props = message.properties
        info = message.delivery_info
        request = dict(headers)
        request.update(
            reply_to=props.get("reply_to"),
            correlation_id=props.get("correlation_id"),
            hostname=self.hostname,
            delivery_info={
                "exchange": info.get("exchange"),
                "routing_key": info.get("routing_key"),
                "priority": props.get("priority"),
                "redelivered": info.get("redelivered"),
            },
        )
        limits = headers.get("timelimit") or (None, None)
        soft = limits[1] if len(limits) > 1 else None
        job = Job(
            task_id,
            name,
            request,
            body,  # decoded once, here; the child does not decode again
            soft_time_limit=soft or task.soft_time_limit or self.app.conf.task_soft_time_limit,
            tag=message.delivery_tag,
            expires=expires,
        )
        self._inflight[message.delivery_tag] = (message, task)
        self._event(
            "task-received",
            uuid=task_id,
            name=name,
            args=headers.get("argsrepr"),
            kwargs=headers.get("kwargsrepr"),
            root_id=headers.get("root_id"),
            parent_id=headers.get("parent_id"),
            retries=headers.get("retries", 0),
            eta=headers.get("eta"),
            expires=headers.get("expires"),
        )
        self.pool.submit(job)

    def _release_due_etas(self) -> None:
        now = time.time()
        released = False
        while self._eta and self._eta[0][0] <= now:
            _, _, message, is_eta = heapq.heappop(self._eta)
            if is_eta:
                self._eta_held -= 1
                released = True
            self.on_message(message, held=True)
        if released:
            self._set_prefetch(self.prefetch_count + self._eta_held)

    def _set_prefetch(self, count: int) -> None:
        if self._consumer is not None:
            self._consumer.qos(prefetch_count=count)

    # -- pool events -----------------------------------------------------------------

    def _on_pool_event(self, event: Event) -> None:
        # Results thread: hand over to the main thread and wake it.
        self._events.append(event)
        self._wake()

    def _process_events(self, write_acks: bool = True) -> None:
        if not self._events:
            return
        with broker_of(self._active).batched_acks(write_acks):  # one statement for all
            self._apply_events()

    def _apply_events(self) -> None:
        while self._events:
            event = self._events.popleft()
            entry = self._inflight.get(event.tag)
            if entry is None:
                continue
            try:
                self._apply_event(event, *entry)
            except Exception as exc:  # noqa: BLE001 - one message, never the pool
                logger.exception("celery-pg worker failed on %s of %s", event.kind, event.task_id)
                self._inflight.pop(event.tag, None)
                if not entry[0].acknowledged:
                    self._refuse(entry[0], f"celery-pg worker failed on this message: {exc!r}")

    def _apply_event(self, event: Event, message: Message, task: Any) -> None:
        tag = event.tag
        if event.kind == "accepted":
            self._started[tag] = time.monotonic()
            self._event("task-started", uuid=event.task_id)
            if not task.acks_late:
                self._settle(message, "ack")
            return
        del self._inflight[tag]
        if event.kind == "expired":
            self._discard_revoked(message, task, event.task_id, "expired")
            return
        started = tag in self._started
        why = self._finished(tag, event.task_id, task)
        if event.kind == "lost" and why is None:
            self._on_lost(message, task, event, started)
            return
        outcome = event.outcome or "failure"
        if why is not None:  # we cancelled it: revoked, or out of time
            outcome = "revoked" if why == "revoked" else "timeout"
        self._task_ended_event(event, outcome)
        action = outcomes.settle(outcome, outcomes.AckRules.of(task), requeue=event.requeue)
        if not message.acknowledged:
            self._settle(message, action, f"task {outcome}: {event.summary or why}"[:2000])
        logger.debug(
            "Finished %s[%s] (%s) in %.4fs", task.name, event.task_id, outcome, event.runtime
        )

    def _task_ended_event(self, event: Event, outcome: str) -> None:
        uuid = event.task_id
        if outcome == "success":
            self._event("task-succeeded", uuid=uuid, result=event.summary, runtime=event.runtime)
        elif outcome == "retry":  # a new message carries the retry
            self._event("task-retried", uuid=uuid, exception=event.summary, traceback="")
        elif outcome == "reject":
            self._event("task-rejected", uuid=uuid, requeue=event.requeue)
            if not event.requeue:
                self._event("task-failed", uuid=uuid, exception=event.summary, traceback="")
        elif outcome in ("failure", "timeout"):
            self._event("task-failed", uuid=uuid, exception=event.summary, traceback="")

    def _finished(self, tag: int, task_id: str, task: Any) -> str | None:
        """Bookkeeping of an ended task; returns why it was cancelled, if it was."""
        self._started.pop(tag, None)
        self._total[task.name] += 1
        cancelled = self._cancelling.pop(tag, None)
        if cancelled is None:
            return None
        why = cancelled[0]
        if not task.ignore_result:
            if why == "revoked":
                task.backend.mark_as_revoked(task_id, "terminated")
            else:
                from celery.exceptions import TimeLimitExceeded

                task.backend.mark_as_failure(task_id, TimeLimitExceeded(why))
        return why

    # -- revoke, time limits, remote control state ------------------------------------

    def _discard_revoked(self, message: Message, task: Any, task_id: str, why: str) -> None:
        logger.info("Discarding %s task %s[%s]", why, task.name, task_id)
        self._settle(message, "ack")
        if not task.ignore_result:
            task.backend.mark_as_revoked(task_id, why)
        self._event(
            "task-revoked", uuid=task_id, terminated=False, signum=None, expired=why == "expired"
        )
        signals.task_revoked.send(
            sender=task, request=None, terminated=False, signum=None, expired=why == "expired"
        )

    def revoke(self, task_id: str, terminate: bool = False) -> None:
        """Revoke ``task_id``: never start it; with ``terminate``, cancel it if running."""
        self.revoked.add(task_id)
        for job in self.pool.queued():
            if job.task_id == task_id and self.pool.unqueue(job.tag):
                message, task = self._inflight.pop(job.tag)
                self._discard_revoked(message, task, task_id, "revoked")
        if terminate:
            for tag, (_pid, _started, job) in self.pool.running().items():
                if job.task_id == task_id:
                    self._cancel(tag, task_id, "revoked")

    def _cancel(self, tag: int, task_id: str, why: str) -> None:
        if tag in self._cancelling:
            return
        logger.warning("Cancelling %s (%s): SIGUSR1 to its child", task_id, why)
        grace = float(self.app.conf.get("pgnotify_cancel_grace", 5.0))
        self._cancelling[tag] = (why, time.monotonic() + grace)
        self.pool.cancel(tag, signal.SIGUSR1)

    def _enforce_limits(self) -> None:
        now = time.monotonic()
        running = self.pool.running()
        for tag, (_why, kill_at) in list(self._cancelling.items()):
            if now >= kill_at and tag in running:
                logger.error("Task %s ignored SIGUSR1; killing its child", running[tag][2].task_id)
                self.pool.cancel(tag, signal.SIGKILL)
        for tag, started in list(self._started.items()):
            entry = self._inflight.get(tag)
            if entry is None:
                continue
            limit = self._hard_limit(entry)
            if limit and now - started > limit:
                self._cancel(tag, entry[0].headers["id"], f"hard time limit ({limit}s) exceeded")

    def _autoscale(self) -> None:
        """Grow while jobs wait for a child; shrink one idle child at a time."""
        if self.autoscale is None:
            return
        most, least = self.autoscale
        size = self.pool.settings.concurrency
        waiting = len(self.pool.queued())
        now = time.monotonic()
        if waiting:
            self._last_busy = now
            if size < most:
                logger.info("Autoscale: %d -> %d children", size, min(most, size + waiting))
                self.pool.resize(min(most, size + waiting))
        elif size > least and now - self._last_busy > self._autoscale_keepalive():
            if len(self.pool.running()) < size:
                logger.info("Autoscale: %d -> %d children", size, size - 1)
                self.pool.resize(size - 1)
                self._last_busy = now

    def _autoscale_keepalive(self) -> float:
        return float(self.app.conf.get("pgnotify_autoscale_keepalive", AUTOSCALE_KEEPALIVE))

    def _hard_limit(self, entry: tuple[Message, Any]) -> float | None:
        message, task = entry
        limits = (message.headers or {}).get("timelimit") or (None, None)
        limit = limits[0] or task.time_limit or self.app.conf.task_time_limit
        return float(limit) if limit else None

    def _event(self, type_: str, **fields: Any) -> None:
        """Send a Celery event (with -E), never letting it break the worker."""
        if self._eventer is None:
            return
        try:
            self._eventer.send(type_, **fields)
        except Exception as exc:  # noqa: BLE001 - events are best effort, as in Celery
            logger.warning("Could not send %s event: %s", type_, exc)

    def _worker_info(self) -> dict[str, Any]:
        import platform

        from celery import __version__

        return {
            "freq": HEARTBEAT_FREQ,
            "sw_ident": "celery-pg",
            "sw_ver": __version__,
            "sw_sys": platform.system(),
            "active": len(self.pool.running()),
            "processed": sum(self._total.values()),
        }

    def request_stop(self, reason: str) -> None:
        logger.warning("%s: warm shutdown", reason)
        self._stop_requested += 1
        self.should_stop = True
        self._wake()

    def task_info(
        self, job: Job, pid: int | None = None, started: float | None = None
    ) -> dict[str, Any]:
        entry = self._inflight.get(job.tag)
        headers = (entry[0].headers or {}) if entry else {}
        return {
            "id": job.task_id,
            "name": headers.get("task"),
            "args": headers.get("argsrepr"),
            "kwargs": headers.get("kwargsrepr"),
            "type": headers.get("task"),
            "hostname": self.hostname,
            "time_start": started,
            "acknowledged": bool(entry and entry[0].acknowledged),
            "delivery_info": dict(entry[0].delivery_info) if entry else {},
            "worker_pid": pid,
        }

    def scheduled_info(self) -> list[dict[str, Any]]:
        out = []
        for eta, _, message, _ in sorted(self._eta, key=lambda held: held[:2]):
            headers = message.headers or {}
            out.append(
                {
                    "eta": datetime.fromtimestamp(eta, timezone.utc).isoformat(),
                    "priority": message.properties.get("priority"),
                    "request": {
                        "id": headers.get("id"),
                        "name": headers.get("task"),
                        "args": headers.get("argsrepr"),
                        "kwargs": headers.get("kwargsrepr"),
                        "hostname": self.hostname,
                    },
                }
            )
        return out

    def stats(self) -> dict[str, Any]:
        import os

        return {
            "pid": os.getpid(),
            "clock": "0",
            "uptime": int(time.time() - self._born),
            "total": dict(self._total),
            "pool": {
                "implementation": "celery_pgnotify.worker.pool:Pool",
                "max-concurrency": self.pool.settings.concurrency,
                "processes": self.pool.pids(),
                "start-method": self.pool.settings.start_method,
            },
            "prefetch_count": self.prefetch_count,
            "broker": {"transport": "pgnotify"},
        }

    def _on_lost(self, message: Message, task: Any, event: Event, started: bool) -> None:
        from billiard.exceptions import WorkerLostError

        exc = WorkerLostError(
            f"Worker exited prematurely: exitcode {event.exitcode} Job: {event.task_id}."
        )
        action = outcomes.settle("lost", outcomes.AckRules.of(task), started=started)
        requeued = action == outcomes.REQUEUE and not message.acknowledged
        if not message.acknowledged:
            self._settle(message, action, f"task lost: {exc}")
        if not requeued:  # as Celery: a requeued task has not failed
            self._event("task-failed", uuid=event.task_id, exception=repr(exc), traceback="")
            if not task.ignore_result:
                task.backend.mark_as_failure(event.task_id, exc, request=None)
        logger.error(
            "Task %s[%s] lost with its child (pid %s); %s",
            task.name,
            event.task_id,
            event.pid,
            "requeued" if requeued else "marked failed",
        )
