"""Prometheus metrics, read from the tables at each scrape.

``celery-pg metrics --port 9808`` serves them; :func:`wsgi_app` and
:func:`asgi_app` mount them in an existing web application; :class:`Collector`
joins any ``prometheus_client`` registry. ``prometheus_client`` is an
optional extra: ``pip install celery-pgnotify[metrics]``.

A scrape is a handful of bounded statements, whatever the queues hold
(``statements/observing.py``): per queue, counts are exact up to
:data:`CAP` rows; beyond, they are estimated from a sample of about
:data:`SAMPLE_PAGES` pages of the table (``pgnotify_queue_estimated`` says
so). The README states what a scrape costs with a million ready messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from celery_pgnotify.connect import close_quietly, close_with, connect, conninfo_from_url
from celery_pgnotify.latency import CLAIM_BUCKETS
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.statements import Statements, statements

logger = logging.getLogger(__name__)

#: Counts per queue are exact up to this many rows ...
CAP = 10_000
#: ... and beyond, estimated from a sample of about this many pages.
SAMPLE_PAGES = 1_000
#: The tables whose statistics and sizes are shown: those that churn.
TABLES = (
    "messages",
    "scheduled",
    "dead_letters",
    "consumers",
    "results",
    "result_groups",
    "chord_counters",
    "chord_parts",
    "revoked",
)


@dataclass
class Queue:
    """One queue's figures."""

    name: str
    ready: int = 0
    leased: int = 0
    scheduled: int = 0
    dead_letters: int = 0
    oldest_ready_s: float | None = None
    paused: bool = False
    #: some count is an estimate (over :data:`CAP`)
    estimated: bool = False


@dataclass
class Snapshot:
    """What one scrape read."""

    queues: list[Queue] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    notify_queue_usage: float = 0.0
    #: rows ever stored in ``messages``, ``scheduled``, ``dead_letters``
    stored: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


def queue_figures(
    conn: psycopg.Connection[Any],
    stmts: Statements,
    cap: int = CAP,
    sample_pages: int = SAMPLE_PAGES,
) -> list[Queue]:
    """Every queue's counts, exact up to ``cap`` and estimated beyond, by name
    (``celery-pg status`` shows the same)."""
    queues: dict[str, Queue] = {}
    for name, ready, scheduled, dead, oldest, paused in conn.execute(
        stmts.metrics_queues, {"cap": cap}
    ).fetchall():
        queues[name] = Queue(name, ready, 0, scheduled, dead, oldest, paused)
    for name, leased in conn.execute(stmts.metrics_leased, {"cap": cap}).fetchall():
        queues.setdefault(name, Queue(name)).leased = leased
    leased_total = sum(q.leased for q in queues.values())
    over = {
        "messages": any(q.ready >= cap for q in queues.values()) or leased_total >= cap,
        "scheduled": any(q.scheduled >= cap for q in queues.values()),
        "dead_letters": any(q.dead_letters >= cap for q in queues.values()),
    }
    for table, needed in over.items():
        if needed:
            _estimate(conn, stmts, table, queues, cap, sample_pages)
    return sorted(queues.values(), key=lambda q: q.name)


def snapshot(
    conn: psycopg.Connection[Any],
    stmts: Statements,
    cap: int = CAP,
    sample_pages: int = SAMPLE_PAGES,
) -> Snapshot:
    """Read every figure the metrics show (a handful of bounded statements)."""
    out = Snapshot()
    out.queues = queue_figures(conn, stmts, cap, sample_pages)
    out.consumers = [
        {
            "id": cid,
            "hostname": host,
            "pid": pid,
            "heartbeat_age_s": age,
            "hungry": hungry,
            "clock_offset_s": offset,
            "claims": list(claims or []),
            "claim_seconds": claim_seconds or 0.0,
            "queues": list(names),
        }
        for cid, host, pid, age, hungry, offset, claims, claim_seconds, names in conn.execute(
            stmts.metrics_consumers
        ).fetchall()
    ]
    out.tables = [
        {
            "table": name,
            "live_rows": live,
            "dead_rows": dead,
            "inserted": ins,
            "updated": upd,
            "deleted": deleted,
            "size_bytes": size,
            "last_vacuum": vacuumed,
        }
        for name, live, dead, ins, upd, deleted, size, vacuumed in conn.execute(
            stmts.metrics_tables, {"schema": stmts.schema, "tables": list(TABLES)}
        ).fetchall()
    ]
    tables = {t: f'"{stmts.schema}".{t}' for t in ("messages", "scheduled", "dead_letters")}
    row = conn.execute(stmts.metrics_server, tables).fetchone()
    assert row is not None
    usage, messages, scheduled, dead, counters = row
    out.notify_queue_usage = float(usage)
    out.stored = {"messages": messages or 0, "scheduled": scheduled or 0, "dead_letters": dead or 0}
    out.counters = {str(k): int(v) for k, v in counters.items()}
    return out


def _estimate(
    conn: psycopg.Connection[Any],
    stmts: Statements,
    table: str,
    queues: dict[str, Queue],
    cap: int,
    sample_pages: int,
) -> None:
    """Replace the capped counts of ``table`` by estimates from a sample of
    its pages (all of them when the table is small: then exact)."""
    row = conn.execute(stmts.table_pages, {"table": f'"{stmts.schema}".{table}'}).fetchone()
    pages = int(row[0]) if row else 0
    pct = min(100.0, 100.0 * sample_pages / max(pages, 1))
    sample = {
        "messages": stmts.sample_messages,
        "scheduled": stmts.sample_scheduled,
        "dead_letters": stmts.sample_dead_letters,
    }[table]
    rows = conn.execute(sample, {"pct": pct}).fetchall()
    scale = 100.0 / pct
    seen = {name: (round(a * scale), round(b * scale)) for name, a, b in rows}
    leased_over = table == "messages" and sum(q.leased for q in queues.values()) >= cap
    if leased_over:
        for name in seen:
            queues.setdefault(name, Queue(name))
    for q in queues.values():
        first, second = seen.get(q.name, (0, 0))
        if table == "messages" and q.ready >= cap:
            q.ready, q.estimated = max(first, cap), True
        if leased_over:
            q.leased, q.estimated = second, True
        if table == "scheduled" and q.scheduled >= cap:
            q.scheduled, q.estimated = max(first, cap), True
        if table == "dead_letters" and q.dead_letters >= cap:
            q.dead_letters, q.estimated = max(first, cap), True


def families(snap: Snapshot) -> Iterator[Any]:
    """The snapshot as Prometheus metric families."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def per_queue(name: str, text: str, value: Any) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, text, labels=["queue"])
        for q in snap.queues:
            family.add_metric([q.name], float(value(q)))
        return family

    yield per_queue("pgnotify_queue_ready_messages", "Messages ready to be claimed.", _ready)
    yield per_queue("pgnotify_queue_leased_messages", "Messages taken by a worker.", _leased)
    yield per_queue("pgnotify_queue_scheduled_messages", "Tasks waiting for their ETA.", _scheduled)
    yield per_queue("pgnotify_queue_dead_letters", "Dead letters of the queue.", _dead)
    yield per_queue(
        "pgnotify_queue_oldest_ready_age_seconds",
        "Age of the oldest ready message (0: none).",
        lambda q: q.oldest_ready_s or 0.0,
    )
    yield per_queue("pgnotify_queue_paused", "1 when the queue is paused.", lambda q: q.paused)
    yield per_queue(
        "pgnotify_queue_estimated",
        f"1 when a count of the queue is estimated from a sample (over {CAP:,} rows).",
        lambda q: q.estimated,
    )
    yield from _consumer_families(snap, GaugeMetricFamily, HistogramMetricFamily)
    stored = CounterMetricFamily(
        "pgnotify_rows_stored",
        "Rows ever stored in a table (messages: publishes, due scheduled tasks and retried "
        "dead letters; scheduled: tasks published with a distant ETA).",
        labels=["table"],
    )
    for table, value in sorted(snap.stored.items()):
        stored.add_metric([table], float(value))
    yield stored
    for key, name, text in _COUNTERS:
        yield CounterMetricFamily(name, text, value=float(snap.counters.get(key, 0)))
    yield from _table_families(snap, GaugeMetricFamily, CounterMetricFamily)
    yield GaugeMetricFamily(
        "pgnotify_notification_queue_usage_ratio",
        "pg_notification_queue_usage(): the server's NOTIFY queue in use.",
        value=snap.notify_queue_usage,
    )


def _ready(q: Queue) -> int:
    return q.ready


def _leased(q: Queue) -> int:
    return q.leased


def _scheduled(q: Queue) -> int:
    return q.scheduled


def _dead(q: Queue) -> int:
    return q.dead_letters


_COUNTERS = [
    (
        "reaped_consumers",
        "pgnotify_reaper_dead_consumers",
        "Consumers the reaper declared dead.",
    ),
    (
        "reaped_messages",
        "pgnotify_reaper_released_messages",
        "Messages the reaper put back on their queues (their consumer was dead).",
    ),
    (
        "orphaned_messages",
        "pgnotify_reaper_orphaned_messages",
        "Messages put back because their consumer's row was gone.",
    ),
    (
        "expired_messages",
        "pgnotify_expired_messages",
        "Messages deleted past their queue's message TTL.",
    ),
]


def _consumer_families(snap: Snapshot, gauge: Any, histogram: Any) -> Iterator[Any]:
    labels = ["consumer", "hostname", "pid"]
    yield gauge("pgnotify_consumers", "Consumers registered.", value=len(snap.consumers))
    age = gauge(
        "pgnotify_consumer_heartbeat_age_seconds",
        "Since the consumer's last heartbeat.",
        labels=labels,
    )
    hungry = gauge(
        "pgnotify_consumer_hungry", "1 when the consumer's last claim left it room.", labels=labels
    )
    offset = gauge(
        "pgnotify_consumer_clock_offset_seconds",
        "The server's clock minus the consumer's (at its last heartbeat).",
        labels=labels,
    )
    claims = histogram(
        "pgnotify_consumer_claim_seconds",
        "Claims as the consumer timed them (round trip included), since it started.",
        labels=labels,
    )
    for c in snap.consumers:
        key = [str(c["id"]), str(c["hostname"]), str(c["pid"])]
        age.add_metric(key, float(c["heartbeat_age_s"]))
        hungry.add_metric(key, float(bool(c["hungry"])))
        if c["clock_offset_s"] is not None:
            offset.add_metric(key, float(c["clock_offset_s"]))
        counts = c["claims"]
        if len(counts) == len(CLAIM_BUCKETS) + 1:
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, CLAIM_BUCKETS), "+Inf"], counts, strict=True):
                cumulative += int(count)
                buckets.append((bound, float(cumulative)))
            claims.add_metric(key, buckets, float(c["claim_seconds"]))
    yield from (age, hungry, offset, claims)


def _table_families(snap: Snapshot, gauge: Any, counter: Any) -> Iterator[Any]:
    shown = [
        ("live_rows", gauge, "pgnotify_table_live_rows", "Live rows (PostgreSQL's estimate)."),
        ("dead_rows", gauge, "pgnotify_table_dead_rows", "Dead rows vacuum has yet to reclaim."),
        ("size_bytes", gauge, "pgnotify_table_size_bytes", "Table, indexes and TOAST, bytes."),
        (
            "last_vacuum",
            gauge,
            "pgnotify_table_last_vacuum_timestamp_seconds",
            "When the table was last vacuumed (0: never since the statistics reset).",
        ),
        ("inserted", counter, "pgnotify_table_rows_inserted", "Rows inserted."),
        ("updated", counter, "pgnotify_table_rows_updated", "Rows updated."),
        ("deleted", counter, "pgnotify_table_rows_deleted", "Rows deleted (messages: acked...)."),
    ]
    for key, kind, name, text in shown:
        family = kind(name, text, labels=["table"])
        for t in snap.tables:
            family.add_metric([t["table"]], float(t[key] or 0))
        yield family


class Collector:
    """A ``prometheus_client`` collector reading one schema at each scrape.

    It keeps one connection (opened on the first scrape, reopened after an
    error); a scrape that cannot reach the database gives ``pgnotify_up 0``.
    """

    def __init__(self, conninfo: str, schema: str) -> None:
        self._conninfo = conninfo
        self._stmts = statements(schema)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # one scrape at a time on the connection

    @classmethod
    def for_app(cls, app: Any) -> Collector:
        """The collector for Celery ``app``'s broker (its URL and options)."""
        opts = TransportOptions.from_mapping(dict(app.conf.broker_transport_options or {}))
        conninfo = conninfo_from_url(str(app.conf.broker_url), opts.dsn, opts.connect_timeout)
        return cls(conninfo, opts.schema)

    def describe(self) -> list[Any]:
        return []  # no scrape at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        started = time.perf_counter()
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._conninfo)
                    self._conn.execute(self._stmts.no_jit)
                    close_with(self, self._conn)  # a mounted app has no close of its own
                snap = snapshot(self._conn, self._stmts)
            except psycopg.Error as exc:
                logger.warning("Metrics scrape of schema %r failed: %s", self._stmts.schema, exc)
                close_quietly(self._conn)
                self._conn = None
                snap = None
        yield GaugeMetricFamily(
            "pgnotify_up", "1 when the scrape read the database.", value=float(snap is not None)
        )
        if snap is not None:
            yield from families(snap)
        yield GaugeMetricFamily(
            "pgnotify_scrape_duration_seconds",
            "How long reading the database took.",
            value=time.perf_counter() - started,
        )

    def close(self) -> None:
        with self._lock:
            close_quietly(self._conn)
            self._conn = None


def registry(collector: Collector) -> Any:
    """A ``prometheus_client`` registry holding only ``collector``."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def wsgi_app(app: Any) -> Any:
    """A WSGI application serving Celery ``app``'s broker metrics (mount it
    at ``/metrics`` of your own WSGI application)."""
    from prometheus_client import make_wsgi_app

    return make_wsgi_app(registry(Collector.for_app(app)))


def asgi_app(app: Any) -> Any:
    """The same as an ASGI application."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry(Collector.for_app(app)))
