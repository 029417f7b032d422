"""A ``group`` of 1,000 tasks: publish time and committed transactions.

    python bench/groups.py --size 1000 --rounds 7

On pgnotify a group's tasks are stored by one statement (``batching.py``);
``pgnotify one-by-one`` is the same group published a task at a time (as
before, with Celery's own ``group._apply_tasks``), in the same run. The
reference brokers run the same group. Commits are counted in a database of
the run's own (pg_stat_database), over ``--rounds`` groups.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fleet import database_commits, drop_database, fresh_database  # noqa: E402

from bench import DURABLE_REDIS, Broker, reachable  # noqa: E402


def publish_groups(broker: Broker, size: int, rounds: int, gathered: bool = True) -> list[float]:
    from celery import Celery, group
    from celery.canvas import group as group_class

    app = Celery("bench-groups", broker=broker.url)
    app.conf.broker_transport_options = broker.options
    app.conf.task_ignore_result = True
    queue = f"groups_{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = queue
    noop = app.signature("bench.noop")
    wrapped = group_class._apply_tasks
    if not gathered:
        group_class._apply_tasks = wrapped.__wrapped__
    times = []
    try:
        noop.delay()  # connects and declares
        for _ in range(rounds):
            g = group(noop.clone() for _ in range(size))
            started = time.perf_counter()
            g.apply_async()
            times.append((time.perf_counter() - started) * 1000)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)
    finally:
        group_class._apply_tasks = wrapped
        app.close()
    return times


def commits(dsn: str) -> int:
    return database_commits(dsn, 11)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--references", default="redis,redis-fsync,rabbitmq")
    args = parser.parse_args()
    import celery_pgnotify.transport  # noqa: F401 - wraps group publishing

    name, pg = fresh_database()
    DURABLE_REDIS.start()
    rows: dict[str, list[float]] = {}
    counted: dict[str, float] = {}
    try:
        for gathered, label in ((True, "pgnotify"), (False, "pgnotify one-by-one")):
            broker = Broker("pgnotify", f"pgnotify://{pg}", {"schema": f"g_{uuid.uuid4().hex[:8]}"})
            publish_groups(broker, args.size, 0, gathered)  # creates the schema
            base = commits(f"postgresql://{pg}")
            publish_groups(broker, args.size, 0, gathered)  # what a run costs besides groups
            setup = commits(f"postgresql://{pg}") - base - 1
            base = commits(f"postgresql://{pg}")
            rows[label] = publish_groups(broker, args.size, args.rounds, gathered)
            total = commits(f"postgresql://{pg}") - base - 1
            counted[label] = (total - setup - 1) / args.rounds  # -1: the purge
        references = {
            "redis": "redis://127.0.0.1:6379/0",
            "redis-fsync": DURABLE_REDIS.url,
            "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
        }
        for ref in filter(None, args.references.split(",")):
            broker = Broker(ref, references[ref])
            reason = reachable(broker)
            if reason or (ref == "redis-fsync" and DURABLE_REDIS.reason):
                print(f"SKIP {ref}: {reason or DURABLE_REDIS.reason}")
                continue
            rows[ref] = publish_groups(broker, args.size, args.rounds)
    finally:
        DURABLE_REDIS.stop()
        drop_database(name)
    print(f"\ngroup of {args.size}, {args.rounds} rounds: median ms (best), commits per group")
    for label, times in rows.items():
        c = counted.get(label)
        shown = "-" if c is None else f"{c:.1f}"
        print(f"  {label:<22} {statistics.median(times):8.1f} ({min(times):.1f})  {shown:>7}")
    mine = statistics.median(rows["pgnotify"])
    for label, times in rows.items():
        if label != "pgnotify":
            ratio = statistics.median(times) / mine
            print(f"  pgnotify is {ratio:.2f}x as fast as {label}")


if __name__ == "__main__":
    main()
