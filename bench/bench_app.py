"""The Celery app the benchmark runs on every broker: one no-op task.

The task counts executions in shared memory (created before the pool forks)
and reports milestones to a file, so measuring costs the task almost nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

from celery import Celery

app = Celery("bench")
app.conf.broker_url = os.environ.get("BENCH_BROKER", "pgnotify://localhost/postgres")
app.conf.broker_transport_options = json.loads(os.environ.get("BENCH_OPTIONS", "{}"))
app.conf.task_default_queue = os.environ.get("BENCH_QUEUE", "bench")
app.conf.task_ignore_result = True
if os.environ.get("BENCH_BACKEND"):
    app.conf.result_backend = os.environ["BENCH_BACKEND"]
    # Read back at once: not kept in the shared reference Redis for a day.
    app.conf.result_expires = 600
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True

STATUS = os.path.join(os.environ.get("BENCH_DIR", "."), "status")
LATENCY = os.path.join(os.environ.get("BENCH_DIR", "."), "latency")
EVERY = int(os.environ.get("BENCH_EVERY", "1000"))

_count = multiprocessing.Value("q", 0)
_first = multiprocessing.Value("d", 0.0)


@app.task(name="bench.noop")
def noop(sent_at: float | None = None) -> None:
    now = time.time()
    if sent_at is not None:
        with open(LATENCY, "a") as f:
            f.write(f"{now - sent_at}\n")
    with _count.get_lock():
        _count.value += 1
        count = _count.value
        if count == 1:
            _first.value = now
    if count % EVERY == 0:
        with open(STATUS, "a") as f:
            f.write(f"{count} {_first.value} {now}\n")


@app.task(name="bench.echo", ignore_result=False)
def echo(value: int) -> int:
    return value


DUE = os.path.join(os.environ.get("BENCH_DIR", "."), "due")


@app.task(name="bench.due")
def due(eta: float) -> None:
    """Record how late (seconds after its ETA) this run started, and in which
    worker (its process group: the benchmark starts each in a session of its own)."""
    late = time.time() - eta
    with open(DUE, "a") as f:  # one short line per write: appends do not interleave
        f.write(f"{due.request.id} {late:.6f} {os.getpgid(0)}\n")
