"""Benchmark: the same no-op Celery workload on pgnotify and on reference brokers.

Run it with ``tox -e bench`` or ``python bench/bench.py``. Every broker that
answers is measured in the same run, with the stock ``celery worker -c 2``
(prefork); pgnotify is also measured with ``celery-pg worker -c 2``, with
publishes durable and, as ``pgnotify-fast``, with ``durable_publish`` off; the
ratios of both to each reference are printed. The machines this runs on
are shared and noisy: compare ratios within one run, not absolute figures
across runs.

Reference brokers: Redis and RabbitMQ as they run here (neither waits for
the disk), ``redis-fsync`` (a throwaway ``redis-server`` with ``appendfsync
always``, started when ``redis-server`` is on PATH: Redis as durable as a
pgnotify publish) and kombu's ``sqla+postgresql``.

Measured for each broker:
  publish    ``.delay()`` calls per second with no worker running
  drain      tasks per second a freshly started worker executes from that backlog
  e2e        tasks per second when publishing into an idle running worker
  p50 / p99  latency from ``.delay()`` to the task starting, one task at a time
  cpu        during e2e, milliseconds of CPU per task spent by the producer,
             the worker's processes and the broker's server (``cpu.py``): with
             every core busy, e2e/s is the cores divided by their sum

and, for the result backends (pgnotify and Redis, on the same broker and worker):
  get p50 / p99  round trip of ``.delay(x).get()``, one task at a time
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import cpu

OURS_PG_WORKER = "pgnotify + celery-pg worker"
#: the same with the ``durable_publish`` transport option off (see README, Durability)
OURS_FAST = "pgnotify-fast + celery-pg worker"
OURS = ("pgnotify", OURS_PG_WORKER, OURS_FAST)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG = os.environ.get("BENCH_PG", "postgres@127.0.0.1:5432/test")


@dataclass
class Broker:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    tasks: int | None = None  # cap for slow brokers
    latency_samples: int | None = None  # cap for brokers that poll once a second


class DurableRedis:
    """A throwaway ``redis-server`` that fsyncs every write (``appendfsync
    always``): Redis with the durability pgnotify's publish has."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.reason = ""
        self.url = "redis://127.0.0.1:1/0"  # unreachable until started
        self.dir = ""

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            self.reason = "redis-server is not on PATH"
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", self.dir]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.reason = "redis-server did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


DURABLE_REDIS = DurableRedis()


def brokers(args: argparse.Namespace) -> list[Broker]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    every = [
        Broker("pgnotify", f"pgnotify://{PG}", {"schema": schema}),
        Broker(
            "pgnotify-fast",
            f"pgnotify://{PG}",
            {"schema": f"{schema}_fast", "durable_publish": False},  # each run drops its own
        ),
        Broker("redis", "redis://127.0.0.1:6379/0"),
        Broker("redis-fsync", DURABLE_REDIS.url),
        Broker("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//"),
        Broker("sqla+postgresql", f"sqla+postgresql+psycopg://{PG}", {}, args.sqla_tasks, 20),
    ]
    wanted = set(args.brokers.split(",")) if args.brokers else None
    return [b for b in every if wanted is None or b.name in wanted]


def reachable(broker: Broker) -> str | None:
    """None if the broker answers, else the reason it is skipped."""
    from kombu import Connection

    try:
        with Connection(broker.url, transport_options=broker.options, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            _ = conn.default_channel
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, with the reason
        return f"{type(exc).__name__}: {exc}"
    return None


def sender_app(broker: Broker, queue: str) -> Any:
    from celery import Celery

    app = Celery("bench-sender", broker=broker.url)
    app.conf.broker_transport_options = broker.options
    app.conf.task_default_queue = queue
    app.conf.task_ignore_result = True

    return app, app.task(name="bench.noop")(_noop)


def _noop(sent_at: float | None = None) -> None:
    """The sender's stand-in for bench_app's task (runs only in the worker)."""
    return None


class Worker:
    def __init__(
        self,
        broker: Broker,
        queue: str,
        workdir: str,
        every: int,
        kind: str = "celery",
        backend: str = "",
        size: tuple[str, ...] = ("-c", "2"),
    ) -> None:
        env = dict(os.environ)
        env.update(
            BENCH_BACKEND=backend,
            BENCH_BROKER=broker.url,
            BENCH_OPTIONS=json.dumps(broker.options),
            BENCH_QUEUE=queue,
            BENCH_DIR=workdir,
            BENCH_EVERY=str(every),
            PYTHONPATH=os.path.join(ROOT, "bench") + os.pathsep + ROOT,
        )
        if kind == "celery-pg":
            argv = [sys.executable, "-m", "celery_pgnotify.cli", "worker", "-A", "bench_app"]
        else:
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench_app",
                "worker",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ]
        node = queue.replace(",", "-")
        node += f"-{uuid.uuid4().hex[:6]}"  # several workers of one queue
        argv += [*size, "-Q", queue, "-l", "warning", "-n", f"bench-{node}-{kind}@%h"]
        self.log = open(os.path.join(workdir, "worker.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def wait_status(workdir: str, count: int, timeout: float) -> tuple[float, float]:
    """(first execution, time ``count`` executions were reached)."""
    path = os.path.join(workdir, "status")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    n, first, at = line.split()
                    if int(n) == count:
                        return float(first), float(at)
        time.sleep(0.01)
    raise TimeoutError(f"{count} executions not reached in {timeout}s")


def latencies(noop: Any, workdir: str, samples: int) -> list[float]:
    path = os.path.join(workdir, "latency")
    seen = 0
    for _ in range(samples):
        noop.delay(sent_at=time.time())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    if sum(1 for _ in f) > seen:
                        break
            time.sleep(0.0002)
        seen += 1
        time.sleep(0.005)
    with open(path) as f:
        return [float(x) * 1000 for x in f]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def measure(
    broker: Broker, args: argparse.Namespace, queue: str, kind: str = "celery"
) -> dict[str, float]:
    n = min(args.tasks, broker.tasks or args.tasks)
    workdir = tempfile.mkdtemp(prefix="pgnotify-bench-")
    app, noop = sender_app(broker, queue)
    with app.connection_for_write() as conn:
        noop.delay()  # declares the queue; then start from an empty queue
        app.control.purge(connection=conn)
        conn.default_channel.queue_purge(queue)
    started = time.perf_counter()
    for _ in range(n):
        noop.delay()
    publish = n / (time.perf_counter() - started)

    worker = Worker(broker, queue, workdir, n, kind)
    try:
        first, last = wait_status(workdir, n, args.timeout)
        drain = n / max(last - first, 1e-9)
        started_wall = time.time()
        with cpu.CpuSplit(worker.proc.pid, server_command(broker)) as split:
            for _ in range(n):
                noop.delay()
            _, last = wait_status(workdir, 2 * n, args.timeout)
        e2e = n / max(last - started_wall, 1e-9)
        lat = latencies(
            noop, workdir, min(args.latency_samples, broker.latency_samples or args.latency_samples)
        )
    finally:
        worker.stop()
        app.close()
    return {
        "publish": publish,
        "drain": drain,
        "e2e": e2e,
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "tasks": n,
        **{f"cpu_{part}": ms for part, ms in split.per_task(n).items()},
    }


def server_command(broker: Broker) -> str:
    """The command name of the broker's server processes (see cpu.py)."""
    scheme = broker.url.split(":", 1)[0]
    for prefix, command in (
        ("pgnotify", "postgres"),
        ("sqla+postgresql", "postgres"),
        ("redis", "redis-server"),
        ("amqp", "beam.smp"),
    ):
        if scheme.startswith(prefix):
            return command
    return ""


def result_roundtrips(broker: Broker, backend: str, samples: int) -> dict[str, float]:
    """``.delay(x).get()`` round trips through ``backend``, one at a time."""
    from celery import Celery

    queue = f"bench_{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="pgnotify-bench-")
    app = Celery("bench-sender", broker=broker.url, backend=backend)
    app.conf.broker_transport_options = broker.options
    app.conf.task_default_queue = queue
    echo = app.signature("bench.echo")
    worker = Worker(broker, queue, workdir, 10**9, "celery", backend)
    times: list[float] = []
    try:
        echo.delay(0).get(timeout=60)  # the worker is up
        for i in range(samples + 20):
            started = time.perf_counter()
            assert echo.delay(i).get(timeout=10) == i
            if i >= 20:  # the first ones warm connections up
                times.append((time.perf_counter() - started) * 1000)
    finally:
        worker.stop()
        close = getattr(app.backend, "close", None)  # ours holds connections
        if close is not None:
            close()
        app.close()
    return {"p50": percentile(times, 50), "p99": percentile(times, 99), "samples": samples}


def cleanup(broker: Broker, queues: list[str]) -> None:
    """Leave nothing behind in the shared database (or Redis)."""
    import psycopg

    if broker.name.startswith("redis") and queues:
        from kombu import Connection

        with Connection(broker.url) as conn:
            conn.default_channel.client.delete(
                *queues,
                *(f"_kombu.binding.{q}" for q in queues),
                *(f"_kombu.binding_permanent.{q}" for q in queues),
            )
        return

    with psycopg.connect(f"postgresql://{PG}", autocommit=True) as conn:
        schema = broker.options.get("schema")
        if schema:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if (
            broker.name.startswith("sqla")
            and conn.execute("SELECT to_regclass('kombu_queue') IS NOT NULL").fetchone()[0]
        ):
            # kombu's SQLAlchemy transport keeps consumed rows (visible = false).
            conn.execute(
                "DELETE FROM kombu_message WHERE queue_id IN"
                " (SELECT id FROM kombu_queue WHERE name = ANY(%s))",
                (queues,),
            )
            conn.execute("DELETE FROM kombu_queue WHERE name = ANY(%s)", (queues,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument(
        "--sqla-tasks",
        type=int,
        default=1000,
        help="fewer tasks for kombu's polling SQLAlchemy transport",
    )
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--brokers", help="comma-separated subset of broker names")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    rows: dict[str, dict[str, float]] = {}
    if not args.brokers or "redis-fsync" in args.brokers.split(","):
        DURABLE_REDIS.start()
    try:
        measure_all(args, rows)
    finally:
        DURABLE_REDIS.stop()
    report(rows)
    backends(args)


def measure_all(args: argparse.Namespace, rows: dict[str, dict[str, float]]) -> None:
    for broker in brokers(args):
        reason: str | None = DURABLE_REDIS.reason if broker.name == "redis-fsync" else ""
        reason = reason or reachable(broker)
        if reason:
            print(f"SKIP {broker.name}: not reachable ({reason})", flush=True)
            continue
        kinds = {"pgnotify": ["celery", "celery-pg"], "pgnotify-fast": ["celery-pg"]}.get(
            broker.name, ["celery"]
        )
        queues: list[str] = []
        try:
            for kind in kinds:
                label = broker.name if kind == "celery" else f"{broker.name} + celery-pg worker"
                print(f"measuring {label} ...", flush=True)
                queues.append(f"bench_{uuid.uuid4().hex[:8]}")
                rows[label] = measure(broker, args, queues[-1], kind)
        finally:
            cleanup(broker, queues)


def backends(args: argparse.Namespace) -> None:
    """Result backends side by side, on the pgnotify broker and the same worker."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    broker = Broker("pgnotify", f"pgnotify://{PG}", {"schema": schema})
    if reachable(broker):
        return
    candidates = {"pgnotify": f"pgnotify://{PG}", "redis": "redis://127.0.0.1:6379/1"}
    rows: dict[str, dict[str, float]] = {}
    try:
        for name, url in candidates.items():
            if name == "redis" and reachable(Broker("redis", url)):
                print("SKIP redis result backend: not reachable", flush=True)
                continue
            print(f"measuring result backend {name} ...", flush=True)
            rows[name] = result_roundtrips(broker, url, args.latency_samples)
    finally:
        cleanup(broker, [])
    print(f"\n{'result backend (broker pgnotify)':<34} {'get p50 ms':>10} {'get p99 ms':>10}")
    for name, r in rows.items():
        print(f"{name:<34} {r['p50']:>10.2f} {r['p99']:>10.2f}")
    if "pgnotify" in rows and "redis" in rows:
        ratio = rows["pgnotify"]["p50"] / rows["redis"]["p50"]
        print(f"  pgnotify vs redis: get p50 {ratio:.2f}x (lower is better)")


def cpu_cells(row: dict[str, float]) -> str:
    if "cpu_producer" not in row:
        return "(no /proc here)"
    parts = ("producer", "worker", "broker")
    total = sum(row[f"cpu_{p}"] for p in parts)
    return " ".join(f"{row[f'cpu_{p}']:.3f}" for p in parts) + f" = {total:.3f}"


def report(rows: dict[str, dict[str, float]]) -> None:
    header = (
        f"{'broker / worker':<34} {'tasks':>6} {'publish/s':>10} {'drain/s':>9} "
        f"{'e2e/s':>8} {'p50 ms':>7} {'p99 ms':>7}   cpu ms/task: producer worker broker"
    )
    print("\n" + header)
    print("-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<34} {int(r['tasks']):>6} {r['publish']:>10.0f} {r['drain']:>9.0f} "
            f"{r['e2e']:>8.0f} {r['p50']:>7.2f} {r['p99']:>7.2f}   {cpu_cells(r)}"
        )
    for ours in OURS:
        mine = rows.get(ours)
        if not mine:
            continue
        print(f"\n{ours} relative to each (throughput: higher is better; latency: lower is better)")
        for name, r in rows.items():
            if name in OURS:
                continue
            print(
                f"  vs {name:<30} publish {mine['publish'] / r['publish']:.2f}x  "
                f"drain {mine['drain'] / r['drain']:.2f}x  e2e {mine['e2e'] / r['e2e']:.2f}x  "
                f"p50 {mine['p50'] / r['p50']:.3g}x"
            )


if __name__ == "__main__":
    main()
