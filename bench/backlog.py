"""Backlog benchmark: drain 100,000 queued tasks; is the rate steady, do tables bloat?

Run it with ``python bench/backlog.py`` (or ``tox -e bench -- ...`` for the
main benchmark). The backlog is written by the schema's ``send_task`` SQL
function in one statement, then a worker (``celery-pg worker -c 2`` and the
stock ``celery worker -c 2``) drains it. Printed for each worker: the drain
rate over the first and the last 10% of the backlog, and the size of the
``messages`` table (with its dead rows) when full, when drained, and once
autovacuum has run; a second backlog on the same table shows whether the
space is reused (no growth without bound).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

import psycopg
import psycopg.sql

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import PG, Broker, Worker, wait_status  # noqa: E402

STATE = (
    "SELECT pg_total_relation_size(c.oid), coalesce(s.n_dead_tup, 0), coalesce(s.n_live_tup, 0),"
    " coalesce(s.autovacuum_count, 0)"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
    " WHERE n.nspname = %s AND c.relname = 'messages'"
)


def table_state(conn: psycopg.Connection, schema: str) -> str:
    size, dead, live, _ = conn.execute(STATE, (schema,)).fetchone()
    return f"{size / 2**20:7.1f} MiB ({live} live, {dead} dead rows)"


def wait_autovacuum(conn: psycopg.Connection, schema: str, runs: int, limit: float) -> float:
    """Seconds until autovacuum has run ``runs`` times on the table (or ``limit``)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if conn.execute(STATE, (schema,)).fetchone()[3] >= runs:
            break
        time.sleep(1)
    return time.monotonic() - started


def drain(kind: str, count: int, timeout: float, rounds: int) -> None:
    schema = f"backlog_{uuid.uuid4().hex[:8]}"
    queue = "backlog"
    broker = Broker("pgnotify", f"pgnotify://{PG}", {"schema": schema})
    every = max(count // 10, 1)
    with psycopg.connect(f"postgresql://{PG}", autocommit=True) as conn:
        from celery_pgnotify import migrations

        migrations.migrate(conn, schema)
        autovacuum = conn.execute("SHOW autovacuum").fetchone()[0] == "on"
        if not autovacuum:
            print(f"[{kind}] autovacuum is off on this server: VACUUM is run by hand instead")
        fill = psycopg.sql.SQL(
            "SELECT {}.send_task(%s, queue => %s) FROM generate_series(1, %s)"
        ).format(psycopg.sql.Identifier(schema))
        for round_ in range(1, rounds + 1):
            tag = f"[{kind}, round {round_}]"
            started = time.perf_counter()
            conn.execute(fill, ("bench.noop", queue, count))
            print(f"\n{tag} backlog of {count} written in {time.perf_counter() - started:.1f} s")
            print(f"{tag} messages table full:     {table_state(conn, schema)}")
            workdir = tempfile.mkdtemp(prefix="pgnotify-backlog-")
            worker = Worker(broker, queue, workdir, every, kind)
            try:
                marks = [wait_status(workdir, every * k, timeout) for k in range(1, 11)]
            finally:
                worker.stop()
            stamps = [marks[0][0]] + [at for _, at in marks]
            first = every / (stamps[1] - stamps[0])
            last = every / (stamps[10] - stamps[9])
            total = count / (stamps[10] - stamps[0])
            print(
                f"{tag} drain rate: first 10% {first:.0f}/s, last 10% {last:.0f}/s "
                f"(last/first {last / first:.2f}), overall {total:.0f}/s"
            )
            print(f"{tag} messages table drained:  {table_state(conn, schema)}")
            if autovacuum:
                waited = wait_autovacuum(conn, schema, round_, 120)
                print(f"{tag} after autovacuum ({waited:.0f} s): {table_state(conn, schema)}")
            else:  # do what autovacuum would have done
                conn.execute(
                    psycopg.sql.SQL("VACUUM {}.messages").format(psycopg.sql.Identifier(schema))
                )
                print(f"{tag} after VACUUM:           {table_state(conn, schema)}")
        conn.execute(
            psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(psycopg.sql.Identifier(schema))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", default="celery-pg,celery")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--rounds", type=int, default=2, help="backlogs in a row on one table (bloat check)"
    )
    args = parser.parse_args()
    for kind in args.workers.split(","):
        drain(kind, args.tasks, args.timeout, args.rounds)


if __name__ == "__main__":
    main()
