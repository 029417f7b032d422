"""Publishing alone: ``.delay()`` per second from M producer processes.

    python bench/publish.py --producers 1,4 --tasks 3000

Every broker in the same run: pgnotify durable (each publish waits for the
WAL flush, the default), pgnotify with ``durable_publish: False`` (it does
not: a server crash may lose the last 3 x ``wal_writer_delay`` of them),
Redis as it runs here and with ``appendfsync always`` (``redis-fsync``),
RabbitMQ without and with publisher confirms. No worker runs; each
producer publishes ``--tasks`` no-op tasks as fast as it can, and the rate
is the total over the slowest producer's time.

Beside each rate, the CPU one publish cost: the producers' own (each
measures its loop, ``time.process_time``) and the broker's server processes
(``cpu.py``). With every core busy (four producers and a broker on two
cores) the rate is bounded by the cores over their sum: what a broker can
gain is only its own share.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu  # noqa: E402

from bench import DURABLE_REDIS, PG, Broker, cleanup, reachable, server_command  # noqa: E402


def _publish(url: str, options: dict[str, Any], queue: str, n: int, start: Any, out: Any) -> None:
    from celery import Celery

    app = Celery("publish-bench", broker=url)
    app.conf.broker_transport_options = options
    app.conf.task_ignore_result = True
    app.conf.task_default_queue = queue
    noop = app.signature("bench.noop")
    noop.delay()  # connected and declared before the clock starts
    start.wait()
    began, began_cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        noop.delay()
    out.put((time.perf_counter() - began, time.process_time() - began_cpu))
    app.close()


@dataclass
class Rate:
    """Publishes per second, and the CPU milliseconds one publish cost."""

    per_second: float
    producer_ms: float
    broker_ms: float


def rate(broker: Broker, producers: int, tasks: int) -> Rate:
    ctx = multiprocessing.get_context("spawn")
    queue = f"publish_{uuid.uuid4().hex[:8]}"
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_publish, args=(broker.url, broker.options, queue, tasks, start, out))
        for _ in range(producers)
    ]
    for p in procs:
        p.start()
    time.sleep(3)  # every producer connected
    # No process has pid -1 (nor is below it): the server counts as "broker".
    with cpu.CpuSplit(-1, server_command(broker)) as split:
        start.set()
        done = [out.get(timeout=600) for _ in procs]
    slowest = max(elapsed for elapsed, _ in done)
    published = producers * tasks
    for p in procs:
        p.join()
    try:
        from kombu import Connection

        with Connection(broker.url, transport_options=broker.options) as conn:
            conn.default_channel.queue_purge(queue)
    finally:
        cleanup(broker, [queue])
    return Rate(
        published / slowest,
        1000 * sum(used for _, used in done) / published,
        split.per_task(published).get("broker", float("nan")),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--producers", default="1,4")
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    DURABLE_REDIS.start()
    brokers = [
        Broker("pgnotify", f"pgnotify://{PG}", {"schema": schema}),
        Broker(
            "pgnotify durable_publish=False",
            f"pgnotify://{PG}",
            {"schema": schema, "durable_publish": False},
        ),
        Broker("redis", "redis://127.0.0.1:6379/0"),
        Broker("redis-fsync", DURABLE_REDIS.url),
        Broker("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//"),
        Broker(
            "rabbitmq confirms", "amqp://guest:guest@127.0.0.1:5672//", {"confirm_publish": True}
        ),
    ]
    rows: dict[tuple[str, int], Rate] = {}
    try:
        for producers in [int(p) for p in args.producers.split(",")]:
            for broker in brokers:
                reason = DURABLE_REDIS.reason if broker.name == "redis-fsync" else ""
                reason = reason or reachable(broker)
                if reason:
                    print(f"SKIP {broker.name}: {reason}", flush=True)
                    continue
                print(f"measuring {broker.name}, {producers} producer(s) ...", flush=True)
                rows[broker.name, producers] = rate(broker, producers, args.tasks)
    finally:
        DURABLE_REDIS.stop()
        cleanup(brokers[0], [])
    print(f"\n{'broker':<32} {'producers':>9} {'publish/s':>10}   cpu ms/publish: producers broker")
    for (name, producers), r in rows.items():
        print(
            f"{name:<32} {producers:>9} {r.per_second:>10.0f}"
            f"   {r.producer_ms:>25.3f} {r.broker_ms:>6.3f}"
        )
    for producers in sorted({p for _, p in rows}):
        for mine in ("pgnotify", "pgnotify durable_publish=False"):
            if (mine, producers) not in rows:
                continue
            ratios = ", ".join(
                f"{name} {rows[mine, producers].per_second / r.per_second:.2f}x"
                for (name, p), r in rows.items()
                if p == producers and not name.startswith("pgnotify")
            )
            print(f"{producers} producer(s), {mine} against: {ratios}")


if __name__ == "__main__":
    main()
