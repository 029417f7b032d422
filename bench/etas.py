"""Scheduled-task benchmark: many countdowns published into running workers.

Run it with ``python bench/etas.py --tasks 1000000``. For each broker that
answers, in one run: a worker is started, ``--tasks`` tasks with countdowns
spread uniformly over the day after the first hour are published into it,
and the resident memory of the worker's processes (main process and pool
children, summed) is sampled throughout; then ``--probes`` tasks due within
the next minute are published, and how late each starts after its ETA is
recorded.

- pgnotify: the stock ``celery worker -c 2`` and ``celery-pg worker -c 2``
  run side by side on the queue (the scheduled tasks wait in the database);
- Redis (a throwaway ``redis-server``, so a day of tasks never lands in the
  shared one) and RabbitMQ: the stock ``celery worker -c 2``, which holds
  every ETA task in memory, as on every broker but pgnotify.

``--kill`` runs the durability check instead: ``--tasks`` tasks due 20 to
40 s ahead, both pgnotify workers SIGKILLed ``--kill-at`` seconds from the
first ETA (before any is due by default; while they run with a positive
value) and started again; every task must run exactly once and none before
its ETA.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import PG, Broker, Worker, cleanup, reachable  # noqa: E402

DAY = 86400.0


class PlainRedis:
    """A throwaway ``redis-server`` (no persistence), removed afterwards."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str | None:
        exe = shutil.which("redis-server")
        if exe is None:
            return "redis-server is not on PATH"
        argv = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir]
        self.proc = subprocess.Popen(
            argv + ["--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return None
            except OSError:
                time.sleep(0.05)
        return "redis-server did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_mib(group: int) -> float:
    """Resident memory of every process in session ``group``, MiB."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != group:  # the session id (workers start their own)
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1024


class Sampler(threading.Thread):
    """Samples the workers' memory every second until stopped."""

    def __init__(self, workers: dict[str, Worker]) -> None:
        super().__init__(daemon=True)
        self.workers = workers
        self.samples: dict[str, list[float]] = {name: [] for name in workers}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for name, worker in self.workers.items():
                self.samples[name].append(rss_mib(worker.proc.pid))
            self.done.wait(1.0)


def sender(broker: Broker, queue: str):  # type: ignore[no-untyped-def]
    from celery import Celery

    app = Celery("bench-etas", broker=broker.url)
    app.conf.broker_transport_options = broker.options
    app.conf.task_ignore_result = True
    return app


def send_due(app, queue: str, countdown: float) -> str:  # type: ignore[no-untyped-def]
    """Publish a task due in ``countdown`` seconds; returns its id."""
    eta = time.time() + countdown
    when = datetime.fromtimestamp(eta, timezone.utc)
    return str(app.send_task("bench.due", args=(eta,), eta=when, queue=queue).id)


def read_due(workdir: str) -> list[tuple[str, float, int]]:
    path = os.path.join(workdir, "due")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return [(r[0], float(r[1]), int(r[2])) for r in rows]


def wait_ready(workdir: str, seconds: float = 6.0) -> None:
    time.sleep(seconds)  # the workers connect and declare their queues


def memory_run(broker: Broker, kinds: list[str], tasks: int, probes: int) -> dict[str, str]:
    queue = f"etas_{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="bench-etas-")
    workers = {kind: Worker(broker, queue, workdir, 10**9, kind=kind) for kind in kinds}
    app = sender(broker, queue)
    out: dict[str, str] = {}
    try:
        wait_ready(workdir)
        sampler = Sampler(workers)
        sampler.start()
        time.sleep(2)
        started = time.monotonic()
        for _ in range(tasks):  # none due before the run ends
            send_due(app, queue, random.uniform(3600.0, DAY))
        publish_s = time.monotonic() - started
        # Let the workers take in what they will (the stock worker on
        # Redis and RabbitMQ receives every ETA task and holds it).
        time.sleep(30)
        probe_ids = {
            send_due(app, queue, 5.0 + 55.0 * i / max(probes - 1, 1)) for i in range(probes)
        }
        deadline = time.monotonic() + 120
        while len(read_due(workdir)) < probes and time.monotonic() < deadline:
            time.sleep(1)
        sampler.done.set()
        sampler.join()
        late = sorted(lateness for i, lateness, _pid in read_due(workdir) if i in probe_ids)
        for kind, samples in sampler.samples.items():
            start, peak, end = samples[0], max(samples), samples[-1]
            out[kind] = (
                f"RSS {start:7.0f} -> peak {peak:7.0f} -> end {end:7.0f} MiB"
                f" (growth {peak - start:+.0f} MiB)"
            )
        if late:
            p50 = late[len(late) // 2]
            p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
            out["probes"] = (
                f"{len(late)}/{probes} probes ran; lateness after ETA: p50 {p50 * 1000:.0f} ms,"
                f" p99 {p99 * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms,"
                f" min {late[0] * 1000:.0f} ms"
            )
        else:
            out["probes"] = f"0/{probes} probes ran"
        out["publish"] = f"{tasks} published in {publish_s:.0f} s ({tasks / publish_s:.0f}/s)"
    finally:
        for worker in workers.values():
            if broker.name == "pgnotify":
                worker.stop()
            else:  # a warm shutdown would hand back a day of tasks one by one
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait()
                worker.log.close()
        app.close()
        if broker.name == "rabbitmq":
            from kombu import Connection

            with Connection(broker.url) as conn:
                conn.default_channel.queue_delete(queue)
        elif broker.name == "pgnotify":
            cleanup(broker, [queue])
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def kill_run(tasks: int, kill_at: float) -> None:
    schema = f"etas_{uuid.uuid4().hex[:8]}"
    broker = Broker("pgnotify", f"pgnotify://{PG}", {"schema": schema})
    queue = "etas"
    workdir = tempfile.mkdtemp(prefix="bench-etas-")
    kinds = ["celery", "celery-pg"]
    workers = [Worker(broker, queue, workdir, 10**9, kind=k) for k in kinds]
    app = sender(broker, queue)
    try:
        wait_ready(workdir)
        etas = {}
        started = time.monotonic()
        for _ in range(tasks):
            countdown = random.uniform(20.0, 40.0)
            eta = time.time() + countdown
            result = app.send_task(
                "bench.due",
                args=(eta,),
                eta=datetime.fromtimestamp(eta, timezone.utc),
                queue=queue,
            )
            etas[result.id] = eta
        print(f"  {tasks} tasks due 20-40 s ahead published in {time.monotonic() - started:.1f} s")
        first_due = min(etas.values())
        time.sleep(max(0.0, first_due + kill_at - time.time()))
        for worker in workers:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
            worker.log.close()
        print(f"  SIGKILLed both workers {time.time() - first_due:+.1f} s from the first ETA")
        ran_before = len(read_due(workdir))
        workers = [Worker(broker, queue, workdir, 10**9, kind=k) for k in kinds]
        deadline = time.time() + 120
        while len(read_due(workdir)) < tasks and time.time() < deadline:
            time.sleep(1)
        time.sleep(10)  # a duplicate, were there one, would have run by now
        runs = read_due(workdir)
        seen: dict[str, int] = {}
        for task_id, _late, _pid in runs:
            seen[task_id] = seen.get(task_id, 0) + 1
        early = [late for _id, late, _pid in runs if late < 0]
        lost = [t for t in etas if t not in seen]
        dups = [t for t, n in seen.items() if n > 1]
        kind_of = {w.proc.pid: k for w, k in zip(workers, kinds, strict=True)}
        for kind in kinds:
            mine = sorted(late for _id, late, group in runs if kind_of.get(group) == kind)
            if mine:
                p50, p99 = mine[len(mine) // 2], mine[int(len(mine) * 0.99)]
                print(
                    f"  {kind}: {len(mine)} runs, lateness p50 {p50 * 1000:.0f} ms,"
                    f" p99 {p99 * 1000:.0f} ms, max {mine[-1] * 1000:.0f} ms"
                )
        late = sorted(late for _id, late, _pid in runs)
        print(
            f"  ran before the kill: {ran_before}; runs {len(runs)}, distinct {len(seen)},"
            f" lost {len(lost)}, duplicated {len(dups)}, early {len(early)}"
            + (f" (earliest {min(early) * 1000:.1f} ms)" if early else "")
        )
        if late:
            print(
                f"  lateness after ETA: p50 {late[len(late) // 2] * 1000:.0f} ms,"
                f" p99 {late[int(len(late) * 0.99)] * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms"
            )
    finally:
        for worker in workers:
            worker.stop()
        app.close()
        cleanup(broker, [queue])
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--brokers", default="pgnotify,redis,rabbitmq")
    parser.add_argument("--kill", action="store_true", help="the SIGKILL durability check")
    parser.add_argument(
        "--kill-at",
        type=float,
        default=-8.0,
        help="with --kill: when, in seconds from the first ETA (positive: while tasks run)",
    )
    args = parser.parse_args()
    if args.kill:
        print(f"SIGKILL of every worker with {args.tasks} ETA tasks waiting (pgnotify)")
        kill_run(args.tasks, args.kill_at)
        return
    redis = PlainRedis()
    candidates = {
        "pgnotify": (
            Broker("pgnotify", f"pgnotify://{PG}", {"schema": f"etas_{uuid.uuid4().hex[:8]}"}),
            ["celery", "celery-pg"],
        ),
        "redis": (Broker("redis", redis.url), ["celery"]),
        "rabbitmq": (Broker("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//"), ["celery"]),
    }
    try:
        for name in args.brokers.split(","):
            broker, kinds = candidates[name]
            why = redis.start() if name == "redis" else None
            why = why or reachable(broker)
            if why:
                print(f"{name}: skipped ({why})")
                continue
            print(f"{name}: {args.tasks} countdowns over a day into {' + '.join(kinds)} -c 2")
            for key, line in memory_run(broker, kinds, args.tasks, args.probes).items():
                print(f"  {key:10} {line}", flush=True)
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
