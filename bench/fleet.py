"""Fleet benchmark: K consumer processes, M producers, and what each task
costs the database.

    python bench/fleet.py --consumers 1,4,8,16 --rate 200 --seconds 10

Each consumer is a worker process running one task at a time (``celery-pg
worker -c 1`` or ``celery worker -P solo``), or ``--concurrency`` N at a
time (``-c N``, prefork for the stock worker: still one consumer, one
LISTEN session, whatever N); M producer processes publish
no-op tasks at a steady total ``--rate`` for ``--seconds``. pgnotify runs in
a database of its own, created for the run, so that PostgreSQL's own
statistics count this workload alone:

  commits/task   committed transactions per task (pg_stat_database), the
                 publish included, and the transaction each listening session
                 runs to read a notification
  scans/task     index scans of ``messages_ready`` per task (claims, empty ones
                 included)

The workers' heartbeats while idle are measured before the run and taken
out of the tail the statistics need to settle (not out of the run itself).
Reference brokers run the same fleet (counts do not apply to them); the
latency (publish to start) and tasks run are printed for every row. Counts
do not move with the machine's noise; rates and latencies do.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import PG, Broker, Worker, percentile, reachable  # noqa: E402

SETTLE = 11.0  # seconds: an idle backend's statistics reach the server within 10 s


@dataclass
class Row:
    label: str
    consumers: int
    producers: int
    sent: int
    ran: int
    p50: float
    p99: float
    commits: float | None = None
    scans: float | None = None


def _produce(url: str, options: dict[str, Any], queue: str, rate: float, seconds: float) -> None:
    from celery import Celery

    app = Celery("fleet-producer", broker=url)
    app.conf.broker_transport_options = options
    app.conf.task_ignore_result = True
    noop = app.signature("bench.noop", queue=queue)
    n = int(rate * seconds)
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            noop.apply_async(kwargs={"sent_at": time.time()}, producer=producer)
    app.close()


def produce(broker: Broker, queue: str, producers: int, rate: float, seconds: float) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_produce, args=(broker.url, broker.options, queue, rate / producers, seconds)
        )
        for _ in range(producers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return producers * int(rate / producers * seconds)


def executions(workdir: str) -> list[float]:
    path = os.path.join(workdir, "latency")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [float(x) * 1000 for x in f if x.strip()]


def wait_ran(workdir: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(executions(workdir)) < count:
        time.sleep(0.1)


def database_commits(dsn: str, settle: float) -> int:
    """The database's committed transactions, read after ``settle`` seconds
    (a session reports its statistics when it ends or within 10 s idle)."""
    time.sleep(settle)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


class Statistics:
    """PostgreSQL's own counters for the run's database and schema."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema

    def read(self) -> tuple[int, int]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            commits = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            scans = conn.execute(
                "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes"
                " WHERE schemaname = %s AND indexrelname = 'messages_ready'",
                (self.schema,),
            ).fetchone()
        assert commits is not None and scans is not None
        # This reading's own connection commits once; it is not the workload's.
        return int(commits[0]) - 1, int(scans[0])


def run(
    broker: Broker, kind: str, consumers: int, args: argparse.Namespace, stats: Statistics | None
) -> Row:
    queue = f"fleet_{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="pgnotify-fleet-")
    if args.concurrency > 1:
        size: tuple[str, ...] = ("-c", str(args.concurrency))
    else:
        size = ("-c", "1") if kind == "celery-pg" else ("-P", "solo")
    workers = [Worker(broker, queue, workdir, 10**9, kind, size=size) for _ in range(consumers)]
    try:
        # Every worker is up once a warm-up task per worker has run.
        warmup = consumers * max(4, 2 * args.concurrency)
        produce(broker, queue, 1, 50, warmup / 50)
        wait_ran(workdir, warmup, 120)
        time.sleep(3)
        idle_rate = 0.0
        if stats is not None:
            c0, _ = stats.read()
            time.sleep(SETTLE)
            c1, _ = stats.read()
            idle_rate = (c1 - c0) / SETTLE
        warm = len(executions(workdir))
        before = stats.read() if stats is not None else (0, 0)
        sent = produce(broker, queue, args.producers, args.rate, args.seconds)
        wait_ran(workdir, warm + sent, 60 + args.seconds)
        lat = executions(workdir)[warm:]
        row = Row(
            label=broker.name if kind == "celery" else f"{broker.name} + celery-pg worker",
            consumers=consumers,
            producers=args.producers,
            sent=sent,
            ran=len(lat),
            p50=percentile(lat, 50) if lat else float("nan"),
            p99=percentile(lat, 99) if lat else float("nan"),
        )
        if stats is not None:
            time.sleep(SETTLE)
            after = stats.read()
            commits = after[0] - before[0] - idle_rate * SETTLE
            row.commits = commits / max(sent, 1)
            row.scans = (after[1] - before[1]) / max(sent, 1)
        return row
    finally:
        for w in workers:
            w.stop()


def fresh_database() -> tuple[str, str]:
    """A database of the run's own (its statistics are this workload's)."""
    name = f"fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"postgresql://{PG}", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(f"postgresql://{PG}", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def references(args: argparse.Namespace) -> list[Broker]:
    every = [
        Broker("redis", "redis://127.0.0.1:6379/0"),
        Broker("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//"),
        Broker(
            "rabbitmq-confirm",
            "amqp://guest:guest@127.0.0.1:5672//",
            {"confirm_publish": True},
        ),
    ]
    wanted = set(args.references.split(",")) if args.references else set()
    return [b for b in every if b.name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--consumers", default="1,4,8,16")
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=200.0, help="tasks per second, in all")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", default="celery-pg,celery")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="tasks each consumer runs at a time"
    )
    parser.add_argument(
        "--references", default="", help="redis,rabbitmq,rabbitmq-confirm (same fleet)"
    )
    parser.add_argument("--options", default="", help="pgnotify transport options, k=v,...")
    args = parser.parse_args()
    sizes = [int(k) for k in args.consumers.split(",")]
    options: dict[str, Any] = {}
    for item in filter(None, args.options.split(",")):
        key, _, value = item.partition("=")
        options[key] = value
    rows: list[Row] = []
    name, pg = fresh_database()
    try:
        for consumers in sizes:
            for kind in args.workers.split(","):
                schema = f"fleet_{uuid.uuid4().hex[:8]}"
                broker = Broker("pgnotify", f"pgnotify://{pg}", {"schema": schema, **options})
                print(f"measuring pgnotify, {kind}, {consumers} consumers ...", flush=True)
                stats = Statistics(f"postgresql://{pg}", schema)
                rows.append(run(broker, kind, consumers, args, stats))
            for broker in references(args):
                reason = reachable(broker)
                if reason:
                    print(f"SKIP {broker.name}: not reachable ({reason})", flush=True)
                    continue
                print(f"measuring {broker.name}, {consumers} consumers ...", flush=True)
                rows.append(run(broker, "celery", consumers, args, None))
    finally:
        drop_database(name)
    report(rows, args)


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\n{args.rate:g} tasks/s for {args.seconds:g} s, {args.producers} producer(s),"
        f" consumers running {args.concurrency} task(s) at a time"
    )
    header = (
        f"{'broker / worker':<34} {'K':>3} {'sent':>6} {'ran':>6} {'commits/task':>13} "
        f"{'scans/task':>11} {'p50 ms':>7} {'p99 ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        commits = "-" if r.commits is None else f"{r.commits:.2f}"
        scans = "-" if r.scans is None else f"{r.scans:.2f}"
        print(
            f"{r.label:<34} {r.consumers:>3} {r.sent:>6} {r.ran:>6} {commits:>13} "
            f"{scans:>11} {r.p50:>7.2f} {r.p99:>7.2f}"
        )


if __name__ == "__main__":
    main()
