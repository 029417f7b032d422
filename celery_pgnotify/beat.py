"""A celery beat scheduler with its state in PostgreSQL and one leader at a time.

Use it with ``celery-pg beat -A proj`` (the default there and for
``celery-pg worker -B``), or with Celery's own command:
``celery -A proj beat -S pgnotify`` (or ``-S celery_pgnotify.beat:Scheduler``).
The app's ``beat_schedule`` runs as written: ``timedelta``/seconds,
``crontab``, ``solar``, args/kwargs/options and the app's timezone settings
are Celery's own, evaluated by Celery's schedule classes.

State
=====
One row per entry in ``<schema>.beat_entries``: the schedule as text, the
last run, the last due time and the run count. The broker must be
``pgnotify://``: the state lives in its database and schema.

Several beat processes
======================
Any number may run. Leadership is a lease in ``<schema>.beat_leader``,
``pgnotify_beat_retry`` seconds long (default 1.0), renewed by the leader
three times per lease; the others try to take it every half lease, and do
once it has run out. Nothing ties it to a session or a socket: a leader
SIGKILLed, frozen, cut off by the network, or whose forked children still
hold its sockets, stops renewing, and another fires within twice that
interval, by the database's clock only. Every change of holder raises the
lease's ``term``, and every firing is fenced by it: a firing is one
transaction holding the lease row (shared) and checking that this process
holds the current term, with a compare-and-set of the entry's
``last_run_at`` from the value the firing was computed from, and the task's
message, inserted through that same transaction. A process that lost the
lease without knowing it fires nothing; two that both believe they lead
still publish each firing once; a crash before COMMIT publishes nothing and
leaves the entry due, and so does a publish that failed in the database
(it is fired again at the next tick). Any database error ends the process's
leadership until it has reconnected.

Catch-up rule (Celery's)
========================
An entry that fell due while no beat ran fires once when beat is back, not
once per missed due time; its next run is then counted from that firing.
An entry that is not yet due is not fired by a restart. A changed schedule
applies from the entry's recorded last run; an entry removed from
``beat_schedule`` is forgotten by the next leader.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from celery import beat

from celery_pgnotify import migrations, statements
from celery_pgnotify.connect import close_quietly, conninfo_from_url
from celery_pgnotify.enqueue import enqueue_in
from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.options import AppSettings, TransportOptions

logger = logging.getLogger(__name__)


class Scheduler(beat.Scheduler):  # type: ignore[misc]
    """celery beat scheduler: state in PostgreSQL, fires once across processes."""

    #: never sleep longer than this, so schedule changes and leadership are seen
    max_interval = 5

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        self._conn: psycopg.Connection[Any] | None = None
        #: who this scheduler is in the lease table (one per scheduler)
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._term: int | None = None
        self._renew_at = 0.0  # monotonic time of the next renewal
        self.leader = False
        self._configure(app)
        super().__init__(app, *args, **kwargs)
        self.max_interval = min(self.max_interval, type(self).max_interval)

    def _configure(self, app: Any) -> None:
        conf = app.conf
        url = str(conf.broker_url or "")
        if not url.startswith("pgnotify://"):
            raise ConfigurationError(
                "broker_url",
                "celery_pgnotify.beat.Scheduler keeps its state in the pgnotify broker's "
                f"database; the broker is {url.split('://')[0] or 'unset'!r}",
            )
        self.opts = TransportOptions.from_mapping(conf.broker_transport_options or {})
        self.conninfo = conninfo_from_url(
            url, self.opts.dsn, self.opts.connect_timeout, application_name="celery-pgnotify-beat"
        )
        self.stmts = statements.statements(self.opts.schema)
        # The lease's length: a leader renews it three times per lease, a
        # follower tries to take it every half lease.
        self.retry = AppSettings.from_conf(conf).beat_retry

    # -- Celery's scheduler interface -------------------------------------------

    def setup_schedule(self) -> None:
        self.install_default_entries(self.data)
        self.merge_inplace(self.app.conf.beat_schedule)
        try:
            self._register()
        except psycopg.OperationalError as exc:
            # Not fatal: tick() keeps trying, as beat does with its broker.
            logger.warning("beat: PostgreSQL not reachable yet (%s); will retry", exc)
            self._drop()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Fire what is due if leading; returns the seconds to sleep."""
        try:
            if not self._lead():
                return self.retry / 2
            sleep = self._fire_due()
            return max(min(sleep, self._renew_at - time.monotonic()), 0.0)
        except psycopg.Error as exc:
            # Any database error, not only a lost connection: start over (the
            # lease runs out unrenewed if this process cannot get back).
            logger.warning("beat: database error (%s); reconnecting", exc)
            self._drop()
            return self.retry

    def sync(self) -> None:
        # Every firing is already committed: nothing to flush.
        pass

    def close(self) -> None:
        try:
            super().close()
        finally:
            # Celery before 5.5 keeps the publishing connection open on close.
            self.__dict__.pop("producer", None)
            connection = self.__dict__.pop("connection", None)
            if connection is not None:
                connection.release()
            self._drop(clean=True)

    @property
    def info(self) -> str:
        role = "leader" if self.leader else "waiting to lead"
        return f"    . db -> {self.opts.schema} schema (pgnotify), {role}"

    # -- leadership ----------------------------------------------------------

    def _state_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = migrations.connect_current(
                self.conninfo, self.opts.schema, self.opts.auto_migrate
            )
        return self._conn

    def _lead(self) -> bool:
        """Take or renew the lease when it is time to; True while leading."""
        now = time.monotonic()
        if self.leader and now < self._renew_at:
            return True
        row = (
            self._state_conn()
            .execute(self.stmts.beat_lead, {"holder": self._holder, "lease": self.retry})
            .fetchone()
        )
        if row is None:
            if self.leader:
                logger.warning("beat: the lease went to another process")
            self.leader, self._term = False, None
            return False
        was_leader, self.leader, self._term = self.leader, True, int(row[0])
        self._renew_at = now + self.retry / 3
        if not was_leader:
            logger.info("beat: this process leads (schema %s, term %s)", self.opts.schema, row[0])
            # Another leader may have fired while this one waited.
            self._register(forget_others=True)
        return True

    def _drop(self, clean: bool = False) -> None:
        conn, self._conn = self._conn, None
        if self.leader and clean and conn is not None:
            # Hand over now rather than when the lease runs out.
            try:
                conn.execute(self.stmts.beat_resign, {"holder": self._holder})
                logger.info("beat: stopped leading")
            except psycopg.Error:
                pass
        elif self.leader:
            logger.warning("beat: no longer leading")
        self.leader, self._term = False, None
        close_quietly(conn)

    # -- state -----------------------------------------------------------------

    def _register(self, forget_others: bool = False) -> None:
        """Record this schedule's entries and load their state from the table."""
        conn = self._state_conn()
        entries = list(self.schedule.values())
        names = [e.name for e in entries]
        with conn.transaction():
            conn.execute(
                self.stmts.beat_register,
                {
                    "names": names,
                    "schedules": [_describe(e) for e in entries],
                    "last_runs": [_aware(e.last_run_at) for e in entries],
                },
            )
            if forget_others:
                conn.execute(self.stmts.beat_forget_others, {"names": names})
            rows = conn.execute(self.stmts.beat_state, {"names": names}).fetchall()
        tz = self.app.timezone
        for name, _schedule, last_run_at, count in rows:
            entry = self.schedule[name]
            # In the app's timezone, as Celery's own entries are: crontab
            # reads wall-clock fields off it (before Celery 5.5 without
            # converting first).
            entry.last_run_at = last_run_at.astimezone(tz) if last_run_at else None
            entry.total_run_count = count

    def _fire_due(self) -> float:
        sleep = float(self.max_interval)
        for entry in list(self.schedule.values()):
            due, next_in = self.is_due(entry)
            if due:
                self._fire(entry)
                due, next_in = self.is_due(self.schedule[entry.name])
            sleep = min(sleep, float(next_in))
        return max(sleep, 0.0)

    def _fire(self, entry: Any) -> None:
        now = self.app.now()
        old = _aware(entry.last_run_at)
        with _frozen(entry.schedule, now):
            due_at = now + _seconds(entry.schedule.remaining_estimate(entry.last_run_at))
            # Keep the cadence (next run counted from the due time) unless the
            # next due time has already passed too: then count from now, firing
            # once for all the missed runs (Celery's catch-up rule).
            behind = _seconds(entry.schedule.remaining_estimate(due_at)) <= timedelta(0)
        new = now if behind else due_at
        conn = self._state_conn()
        advance = {
            "name": entry.name,
            "old": old,
            "new": _aware(new),
            "due": _aware(due_at),
            "holder": self._holder,
            "term": self._term,
        }
        logger.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            with conn.transaction():
                row = conn.execute(self.stmts.beat_advance, advance).fetchone()
                if row is None:
                    raise _AlreadyFired
                with enqueue_in(conn):
                    result = self.apply_async(entry, producer=self.producer, advance=False)
        except _AlreadyFired:
            logger.info(
                "beat: %s was fired elsewhere, or the lease was lost; reloading", entry.name
            )
            self._renew_at = 0.0  # check the lease at once
            self._register()
            return
        except psycopg.Error:
            raise  # tick() reconnects; the entry is still due
        except Exception as exc:  # noqa: BLE001 - as Celery's apply_entry: log, keep beating
            failure = _database_failure(exc)
            if failure is not None:
                # Celery wraps a failed publish in SchedulingError: the
                # transaction rolled back, the entry is still due.
                raise failure from exc
            # Like Celery, a firing that cannot be published (bad arguments,
            # unknown route) counts as run, so it is not retried in a loop.
            logger.error("Message Error: %s (entry %s)", exc, entry.name, exc_info=True)
            row = conn.execute(self.stmts.beat_advance, advance).fetchone()
            if row is None:
                self._register()
                return
            result = None
        entry.last_run_at = new
        entry.total_run_count = row[0]
        logger.debug("%s sent. id->%s", entry.task, getattr(result, "id", None))


#: Celery's default ``beat_scheduler``: a local shelve file, one beat only.
CELERY_DEFAULT_SCHEDULER = "celery.beat:PersistentScheduler"
SCHEDULER_PATH = "celery_pgnotify.beat:Scheduler"


def scheduler_for(app: Any, requested: str | None = None) -> str:
    """The scheduler ``celery-pg`` runs: ``requested``, else the app's
    ``beat_scheduler`` if set to anything but Celery's default, else this one
    when the broker is pgnotify."""
    if requested:
        return requested
    configured = str(app.conf.beat_scheduler or CELERY_DEFAULT_SCHEDULER)
    if configured != CELERY_DEFAULT_SCHEDULER:
        return configured
    if str(app.conf.broker_url or "").startswith("pgnotify://"):
        return SCHEDULER_PATH
    return configured


class _AlreadyFired(Exception):
    """The compare-and-set lost: the firing is another process's (or this
    process no longer holds the lease)."""


def _database_failure(exc: BaseException) -> psycopg.Error | None:
    """The database error behind ``exc`` (Celery wraps publish errors), if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, psycopg.Error):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@contextmanager
def _frozen(schedule: Any, now: datetime) -> Iterator[None]:
    """Evaluate ``schedule`` at the instant ``now`` (exact due times, no drift)."""
    previous = getattr(schedule, "nowfun", None)
    schedule.nowfun = lambda: now
    try:
        yield
    finally:
        schedule.nowfun = previous


def _describe(entry: Any) -> str:
    return f"{entry.schedule!r} {entry.task} {entry.args!r} {entry.kwargs!r} {entry.options!r}"


def _seconds(delta: Any) -> timedelta:
    return delta if isinstance(delta, timedelta) else timedelta(seconds=float(delta))


def _aware(moment: datetime | None) -> datetime | None:
    """Naive datetimes from Celery are UTC (``enable_utc``); store instants."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)
