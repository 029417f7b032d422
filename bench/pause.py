"""Pausing a queue with a backlog while another queue keeps running.

Run it with ``python bench/pause.py``. A backlog is written to one queue and
the queue paused; the stock ``celery worker -c 2`` and ``celery-pg worker -c
2`` then consume it and a second queue, into which tasks keep arriving, for
``--seconds``. Printed each few seconds: what is ready and leased on each
queue. Then the queue is resumed and the time its backlog takes to drain is
printed. Nothing of the paused queue may be claimed while it is paused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import PG, Broker, Worker, cleanup  # noqa: E402

COUNTS = (
    "SELECT queue, count(*) FILTER (WHERE consumer_id IS NULL),"
    " count(*) FILTER (WHERE consumer_id IS NOT NULL) FROM {s}.messages GROUP BY queue"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=50.0, help="tasks/s into the other queue")
    args = parser.parse_args()

    from celery import Celery

    from celery_pgnotify import migrations, ops
    from celery_pgnotify.statements import statements

    schema = f"pause_{uuid.uuid4().hex[:8]}"
    broker = Broker("pgnotify", f"pgnotify://{PG}", {"schema": schema})
    workdir = tempfile.mkdtemp(prefix="bench-pause-")
    app = Celery("bench-pause", broker=broker.url)
    app.conf.broker_transport_options = broker.options
    app.conf.task_ignore_result = True
    workers: list[Worker] = []
    with psycopg.connect(f"postgresql://{PG}", autocommit=True) as db:
        try:
            migrations.migrate(db, schema)
            stmts = statements(schema)
            ops.pause(db, stmts, "held")
            for _ in range(args.backlog):
                app.send_task("bench.noop", queue="held")
            counts = COUNTS.format(s=f'"{schema}"')
            workers = [
                Worker(broker, "held,busy", workdir, 10**9, kind=kind)
                for kind in ("celery", "celery-pg")
            ]
            print(f"'held' paused with {args.backlog} tasks; both workers consume held,busy")
            started = time.monotonic()
            sent = 0
            claimed_while_paused = 0
            next_report = started
            while time.monotonic() - started < args.seconds:
                due = int((time.monotonic() - started) * args.rate)
                for _ in range(due - sent):
                    app.send_task("bench.noop", queue="busy")
                sent = max(sent, due)
                rows = {q: (ready, leased) for q, ready, leased in db.execute(counts).fetchall()}
                held = rows.get("held", (0, 0))
                claimed_while_paused = max(claimed_while_paused, args.backlog - held[0])
                if time.monotonic() >= next_report:
                    busy = rows.get("busy", (0, 0))
                    print(
                        f"  t={time.monotonic() - started:5.1f} s  held: ready {held[0]},"
                        f" leased {held[1]}   busy: sent {sent}, ready {busy[0]}, leased {busy[1]}"
                    )
                    next_report += 5
                time.sleep(0.1)
            ran = sent - sum(rows.get("busy", (0, 0)))
            print(
                f"while paused for {args.seconds:.0f} s: claimed from 'held'"
                f" {claimed_while_paused}; 'busy' ran {ran} of {sent}"
            )
            resumed = time.monotonic()
            ops.resume(db, stmts, "held")
            while time.monotonic() - resumed < 120:
                rows = {q: (ready, leased) for q, ready, leased in db.execute(counts).fetchall()}
                if "held" not in rows:
                    break
                time.sleep(0.05)
            print(
                f"resumed: the {args.backlog}-task backlog drained in"
                f" {time.monotonic() - resumed:.1f} s"
            )
        finally:
            for worker in workers:
                worker.stop()
            app.close()
            cleanup(broker, [])
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
