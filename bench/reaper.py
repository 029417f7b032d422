"""What liveness costs at rest: row visits per second on ``messages`` while
K consumers heartbeat and reap, with N messages leased (as ETA tasks held by
a live worker are).

    python bench/reaper.py --consumers 16 --leased 0,100000 --seconds 20

Counts come from the database's own statistics for the table
(``pg_stat_user_tables``: tuples read by sequential and index scans), which
a noisy machine does not move. The consumers are in-process kombu
connections, each with its LISTEN session heartbeating every
``heartbeat_interval`` (2 s) and reaping.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import psycopg
from kombu import Connection
from psycopg import sql

PG = "postgresql://postgres@127.0.0.1:5432/test"


def _visits(db: psycopg.Connection[Any], schema: str) -> int:
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
        " FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'messages'",
        (schema,),
    ).fetchone()
    return int(row[0]) if row else 0


def measure(dsn: str, consumers: int, leased: int, seconds: float) -> float:
    schema = f"reaper_{uuid.uuid4().hex[:8]}"
    url = dsn.replace("postgresql://", "pgnotify://", 1)
    conns = [Connection(url, transport_options={"schema": schema}) for _ in range(consumers)]
    try:
        holder = conns[0].default_channel
        holder.basic_get("held")  # schema, and the first consumer's session
        consumer_id = conns[0].transport.consumer_id()
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(
                sql.SQL(
                    "INSERT INTO {}.messages (queue, payload, consumer_id, leased_at)"
                    " SELECT 'held', '{{}}', %s, now() FROM generate_series(1, %s)"
                ).format(sql.Identifier(schema)),
                (consumer_id, leased),
            )
            for conn in conns[1:]:
                conn.transport.consumer_id()  # starts each LISTEN session
            time.sleep(10)  # past every session's first lease_timeout: reaping runs
            before = _visits(db, schema)
            time.sleep(seconds)
            time.sleep(1)  # statistics are flushed within a second
            after = _visits(db, schema)
        return (after - before) / seconds
    finally:
        for conn in conns:
            conn.release()
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=PG)
    parser.add_argument("--consumers", type=int, default=16)
    parser.add_argument("--leased", default="0,100000")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    print(f"{'consumers':>9} {'leased':>8} {'row visits/s on messages':>26}")
    for leased in (int(n) for n in args.leased.split(",")):
        rate = measure(args.dsn, args.consumers, leased, args.seconds)
        print(f"{args.consumers:>9} {leased:>8} {rate:>26.1f}")


if __name__ == "__main__":
    main()
