"""The consumer's session: LISTEN, liveness and the reaper, on one thread.

One :class:`Listener` runs per consuming transport, on its own dedicated
connection (never pooled: LISTEN does not survive PgBouncer's transaction
mode). It

- LISTENs on the NOTIFY channel of every queue the process consumes, and on
  a channel of its own per queue (a publish wakes one consumer that has room
  there, see ``fragments.wake``), and wakes the consuming side through a
  pipe (a file descriptor Celery's event loop or ``select()`` can watch);
- registers the consumer (a row in ``consumers``) and holds a session-level
  advisory lock keyed by the consumer id, so the consumer's liveness is the
  liveness of this session: a SIGKILLed process drops the session and with
  it the lock;
- heartbeats every ``heartbeat_interval`` from this thread, so a task that
  blocks the main thread (``-P solo``) or runs for hours never loses its
  lease;
- offers to reap dead consumers after each heartbeat (``reaper.py``): their
  leased messages return to their queues. A stall is not a death: its
  statements give up on a lock after ``heartbeat_interval`` (``lock_timeout``)
  and are bounded by ``statement_timeout``, and after a gap in its own
  heartbeats (the database, a lock or this process was slow) it judges
  nobody for ``lease_timeout``: the others were most likely held up too;
- moves its queues' scheduled tasks to them when due (``promoter.py``);
- reconnects with capped exponential backoff, and after any gap or change of
  its queues marks every queue as notified so the consumer re-reads the
  tables, then does so again twice shortly after (``RELOOKS``);
- can take over a consumer whose connection was lost (given its id, see
  ``Transport.park``): its leases stay its own unless it was reaped meanwhile.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, NoReturn

import psycopg
from psycopg.conninfo import make_conninfo

from celery_pgnotify.connect import SERVER_KEEPALIVES, forget_after_fork, session_options
from celery_pgnotify.errors import DatabaseUnavailable
from celery_pgnotify.latency import ClaimTimes
from celery_pgnotify.listening import Listening
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.promoter import Promoter
from celery_pgnotify.reaper import STALLED, Reaper
from celery_pgnotify.statements import Statements
from celery_pgnotify.turns import Turns
from celery_pgnotify.wakeup import WakePipe

logger = logging.getLogger(__name__)

#: ``application_name`` of listener sessions (visible in pg_stat_activity).
LISTENER_APP_NAME = "celery-pgnotify-listener"

#: Seconds after its queues changed (a start, a reconnection, a queue added)
#: at which a consumer looks at them again. A publish judges as its statement
#: runs whether any consumer reads its queue; one that judged "nobody" just
#: before the consumer said it did notified nobody, and if its commit was held
#: up (a slow WAL flush) past the consumer's first look, only these find it
#: before the fallback re-read (``polling_interval``).
RELOOKS = (0.05, 1.0)


class _Reaped(Exception):
    """Ends the thread: the consumer was declared dead (see _declared_dead)."""


class Listener:
    """A consumer session running on a daemon thread (see module docstring)."""

    def __init__(
        self,
        conninfo: str,
        stmts: Statements,
        opts: TransportOptions,
        consumer_id: int | None = None,
    ) -> None:
        self._conninfo = conninfo
        self.claim_times = ClaimTimes()  # reported with each heartbeat
        self._stmts = stmts
        self._opts = opts
        self._hostname = socket.gethostname()
        self._lock = threading.Lock()
        self._queues: dict[str, str] = {}  # channel -> queue
        self._turns = Turns(stmts, opts)  # this consumer's own channels
        self._listen = Listening(self._on_channel)
        self._notified: set[str] = set()
        self._woken = WakePipe()  # for the consuming side: queues were notified
        self._ctrl = WakePipe()  # for the thread: queues changed, or stop
        self._stopping = threading.Event()
        self._first_session = threading.Event()
        self._first_error: BaseException | None = None
        self._pid = os.getpid()
        self._relooks = _Relooks()
        self._reaper = Reaper(stmts, opts)
        self._last_beat = 0.0  # monotonic time of the last heartbeat that committed
        self._promoter = Promoter(stmts, opts.heartbeat_interval / 2, opts.fresh)
        #: The consumer id leases are taken under (set once the first session
        #: is up, or given: a parked consumer's, taken over).
        self.consumer_id: int | None = consumer_id
        self._adopting = consumer_id is not None
        #: True when the consumer taken over still existed, leases and all.
        self.resumed = False
        #: True once this consumer found it was declared dead by another
        #: (reaped): the session ends, and the consuming side must reconnect.
        self.reaped = False
        self._thread = threading.Thread(
            target=self._run, name="celery-pgnotify-listener", daemon=True
        )
        forget_after_fork(self)

    # -- API for the consuming side ----------------------------------------

    @property
    def wake_fd(self) -> int:
        """Readable when queues were notified; drain with :meth:`take_notified`."""
        return self._woken.fd

    def start(self) -> int:
        """Start the thread; returns the consumer id once registered.

        Raises the connection error if the first session cannot be opened.
        """
        self._thread.start()
        if not self._first_session.wait(self._opts.connect_timeout * 2 + 5):
            self.stop(release=False)
            raise DatabaseUnavailable("the LISTEN session could not be opened in time")
        if self._first_error is not None:
            # A consumer being taken over keeps its leases: its process still
            # holds (and may be running) what is leased to it.
            self.stop(release=not self._adopting)
            raise self._first_error
        assert self.consumer_id is not None
        return self.consumer_id

    def heartbeat_age(self) -> float:
        """Seconds since this consumer last proved itself alive (0 before
        its first session)."""
        return time.monotonic() - self._last_beat if self._last_beat else 0.0

    def is_alive(self) -> bool:
        """False once the thread has ended (it only ends when stopped, or
        when the very first session could not be opened)."""
        return self._thread.is_alive()

    def set_queues(self, queues: Iterable[str]) -> None:
        """LISTEN on exactly these queues (and advertise them for routing/expiry)."""
        with self._lock:
            self._queues = {self._stmts.channel(q): q for q in queues}
        self._poke()

    def wake(self) -> None:
        """Make :attr:`wake_fd` readable without notifying any queue."""
        self._woken.poke()

    def take_notified(self) -> set[str]:
        """The queues notified since the last call (drains the wake pipe)."""
        self._woken.drain()
        self._turns.taken()
        with self._lock:
            notified, self._notified = self._notified, set()
        return notified

    def stop(self, release: bool = True) -> None:
        """Stop the thread; with ``release``, leased messages go back at once."""
        if os.getpid() != self._pid:
            return
        self._stopping.set()
        self._poke()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._opts.connect_timeout + 5)
        conn = self._listen.conn
        if conn is not None and not conn.closed:
            if release and self.consumer_id is not None:
                try:
                    conn.execute(
                        self._stmts.unregister_consumer,
                        {
                            "id": self.consumer_id,
                            "prefix": self._stmts.channel_prefix,
                        },
                    )
                except psycopg.Error as exc:
                    logger.warning("Could not release leases on shutdown: %s", exc)
        self._listen.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            # Still in a statement or a connect: its pipes stay open (a few
            # descriptors leak) rather than be closed under it, since a
            # descriptor closed too early is soon another file's number.
            logger.warning("The LISTEN thread did not stop in time; its pipes stay open")
            return
        self._close_pipes()

    def _close_pipes(self) -> None:
        """Close the pipes once: later calls, and :meth:`wake` or
        :meth:`take_notified` after it, touch no descriptor (see wakeup.py)."""
        self._woken.close()
        self._ctrl.close()

    def _forget_after_fork(self) -> None:
        # The thread does not exist in the child; its connection belongs to
        # the parent. Drop references without closing anything.
        self._listen.forget()
        self._stopping.set()

    # -- the thread --------------------------------------------------------

    def _poke(self) -> None:
        self._ctrl.poke()

    def _queue_names(self) -> list[str]:
        with self._lock:
            return list(self._queues.values())

    def _wake(self, queues: Iterable[str]) -> None:
        with self._lock:
            was_empty = not self._notified
            self._notified.update(queues)
            wake = was_empty and bool(self._notified)
        if wake:
            self.wake()

    def _run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            try:
                self._open_session()
                delay = 0.1
                self._serve()
            except _Reaped:
                if not self._first_session.is_set():
                    self._first_session.set()
                return
            except psycopg.Error as exc:
                if not self._first_session.is_set():
                    self._first_error = exc
                    self._first_session.set()
                    return
                if self._stopping.is_set():
                    break
                logger.warning("LISTEN session lost (%s); reconnecting in %.1fs", exc, delay)
                self._listen.close()
                self._stopping.wait(delay)
                delay = min(delay * 2, self._opts.reconnect_max_delay)
            except Exception as exc:  # a bug must not end liveness: start over
                logger.exception("Listener thread failed; starting a new session")
                if not self._first_session.is_set():
                    self._first_error = exc
                    self._first_session.set()
                    return
                self._listen.close()
                self._stopping.wait(delay)
                delay = min(delay * 2, self._opts.reconnect_max_delay)

    def _open_session(self) -> None:
        # LISTEN comes once the consumer holds its session lock (_sync_listen).
        conn = self._listen.open(_session_conninfo(self._conninfo, self._opts))
        queues = self._queue_names()
        params = {"hostname": self._hostname, "pid": os.getpid(), "queues": queues}
        if self.consumer_id is None:
            row = conn.execute(self._stmts.register_consumer, params).fetchone()
            assert row is not None
            self.consumer_id = int(row[0])
        else:
            # Reconnecting, or a parked consumer taken over: its leases are
            # intact unless it was reaped meanwhile (which deletes its row).
            found = conn.execute(
                self._stmts.resume_consumer, {"id": self.consumer_id, **params}
            ).fetchone()
            if found is None and not self._adopting:
                self._declared_dead()
            if found is None:
                conn.execute(
                    self._stmts.reregister_consumer,
                    {"id": self.consumer_id, "prefix": self._stmts.channel_prefix, **params},
                )
            self.resumed = found is not None
            self._adopting = False
        _take_session_lock(conn, self._stmts, self.consumer_id, self._opts.lock_grace / 2)
        self._sync_listen()
        # Give every other consumer the time to come back before judging them
        # (after a server restart all session locks vanish at once).
        self._reaper.hold_off()
        self._last_beat = time.monotonic()
        logger.info("Consumer %s listening (pid %s)", self.consumer_id, os.getpid())
        self._first_session.set()
        # After any gap notifications may have been missed: re-read everything.
        self._wake(queues)

    def _sync_listen(self) -> None:
        with self._lock:
            wanted = dict(self._queues)
        if self.consumer_id is not None:
            # Its own channel per queue: a publish wakes one consumer.
            wanted.update(self._turns.channels(list(wanted.values()), self.consumer_id))
        if self._listen.sync(wanted):
            self._heartbeat()
            # Messages may have arrived before the LISTEN: look now, and
            # again in a moment (see RELOOKS).
            self._wake(wanted.values())
            self._relooks.plan()

    def _on_channel(self, channel: str) -> None:
        with self._lock:
            queue = self._queues.get(channel)
        queue = queue or self._turns.woken(channel)
        if queue is not None:
            self._wake((queue,))

    def _heartbeat(self) -> bool:
        """Prove this consumer alive; False when a lock or a slow database
        held the statement up past its timeout (tried again next beat)."""
        conn = self._listen.conn
        assert conn is not None and self.consumer_id is not None
        queues = self._queue_names()
        params = {"id": self.consumer_id, "queues": queues, **self.claim_times.report()}
        try:
            alive = conn.execute(self._stmts.heartbeat, params).fetchone()
        except STALLED as exc:
            logger.warning("Heartbeat held up (%s); trying again", exc)
            return False
        if alive is None:
            self._declared_dead()
        self._promoter.plan(alive[1])
        now = time.monotonic()
        if now - self._last_beat > 2 * self._opts.heartbeat_interval:
            # A gap of our own: whatever held us up most likely held the
            # others too. Let them beat again before judging anyone.
            logger.warning(
                "No heartbeat for %.1fs; judging no other consumer for %.1fs",
                now - self._last_beat,
                self._opts.lease_timeout,
            )
            self._reaper.hold_off()
        self._last_beat = now
        if queues:
            try:
                conn.execute(self._stmts.touch_queues, {"queues": queues})
            except STALLED as exc:
                logger.debug("Queues not touched this beat (%s)", exc)
        return True

    def _declared_dead(self) -> NoReturn:
        """This consumer was reaped while it lived (a stall or a partition
        longer than lease_timeout): its messages went back to their queues
        and may be running elsewhere. It must not go on as if nothing
        happened: the session ends, and the consuming side reconnects,
        dropping what it had not started yet."""
        logger.error(
            "Consumer %s was declared dead while it lived (silent for lease_timeout); "
            "its messages went back to their queues: reconnecting",
            self.consumer_id,
        )
        self.reaped = True
        self._stopping.set()
        self.wake()  # the consuming side finds out now, not at its next poll
        raise _Reaped

    def _serve(self) -> None:
        conn = self._listen.conn
        assert conn is not None
        interval = self._opts.heartbeat_interval
        next_beat = time.monotonic() + interval
        while not self._stopping.is_set():
            wake_at = next_beat
            for at in (self._promoter.next_at, self._turns.next_at(), self._relooks.next_at):
                if at is not None:
                    wake_at = min(wake_at, at)
            timeout = max(0.0, wake_at - time.monotonic())
            notified, readable = self._listen.wait(timeout, self._ctrl.fd)
            if self._ctrl.fd in readable:
                self._ctrl.drain()
                if self._stopping.is_set():
                    return
                self._sync_listen()
            if notified:
                self._listen.read()
            if self._relooks.due():
                self._wake(self._queue_names())
            if time.monotonic() >= next_beat:
                if self._heartbeat():
                    self._reaper.reap(conn)
                next_beat = time.monotonic() + interval
            if self._promoter.is_due():
                self._promoter.promote(conn, self._queue_names())
            if self.consumer_id is not None:
                self._turns.step_aside(conn, self.consumer_id)


class _Relooks:
    """When a consumer looks at its queues again after they changed (RELOOKS)."""

    def __init__(self) -> None:
        self._at: list[float] = []  # monotonic times, in order

    @property
    def next_at(self) -> float | None:
        return self._at[0] if self._at else None

    def plan(self) -> None:
        now = time.monotonic()
        self._at = [now + delay for delay in RELOOKS]

    def due(self) -> bool:
        """True once per planned time that has come (and drops it)."""
        now = time.monotonic()
        if not self._at or self._at[0] > now:
            return False
        self._at = [at for at in self._at if at > now]
        return True


def _session_conninfo(conninfo: str, opts: TransportOptions) -> str:
    """The listener session's conninfo. Its statements must never hang: a
    lock is given up after one heartbeat interval, any statement after
    lease_timeout, and the server drops the session (and its lock) once
    this host is silent."""
    timeouts = {
        "lock_timeout": int(opts.heartbeat_interval * 1000),
        "statement_timeout": int(opts.lease_timeout * 1000),
        **SERVER_KEEPALIVES,
    }
    return make_conninfo(
        conninfo,
        application_name=LISTENER_APP_NAME,
        options=session_options(conninfo, timeouts),
    )


def _take_session_lock(
    conn: psycopg.Connection[Any], stmts: Statements, consumer_id: int, patience: float
) -> None:
    """Take the consumer's session lock, the proof of its liveness. A
    session that just ended (a parked connection's, or this listener's
    previous one) may hold it a moment longer: wait up to ``patience``."""
    lock = {"ns": stmts.lock_namespace, "id": consumer_id}
    deadline = time.monotonic() + patience
    locked = conn.execute(stmts.take_lock, lock).fetchone()
    while not (locked and locked[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
        locked = conn.execute(stmts.take_lock, lock).fetchone()
    if not (locked and locked[0]):
        # The previous session of this consumer is still on its way out.
        raise psycopg.OperationalError(
            f"consumer {consumer_id}'s session lock is still held elsewhere"
        )
