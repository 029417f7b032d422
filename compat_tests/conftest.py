"""The compatibility matrix: broker x worker, each scenario written once.

Brokers: pgnotify (always, on the test PostgreSQL), Redis and RabbitMQ on
localhost when they answer (else skipped, with the reason shown in the
summary). Workers: the stock ``celery worker`` on every broker, and
``celery-pg worker`` on pgnotify, which it is built for (``MATRIX``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Queue

from tests import pgserver
from tests.workers import (
    READY,
    ROOT,
    WorkerProcess,
    celery_pg_worker,
    celery_worker,
    close_app,
)

REFERENCE = {
    "redis": os.environ.get("COMPAT_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "rabbitmq": os.environ.get("COMPAT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}


@dataclass
class Broker:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)


def _unreachable(url: str) -> str | None:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure: skip with the reason
        return f"{type(exc).__name__}: {exc}"
    return None


#: (broker, worker) pairs of the matrix.
MATRIX = [
    ("pgnotify", "celery"),
    ("pgnotify", "celery-pg"),
    ("redis", "celery"),
    ("rabbitmq", "celery"),
]


#: Result backends of the scenarios that read results.
BACKENDS = ["pgnotify", "redis"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "compat" in metafunc.fixturenames or "compat_results" in metafunc.fixturenames:
        metafunc.parametrize(
            "matrix", MATRIX, ids=[f"{b}-{w}" for b, w in MATRIX], scope="function"
        )
    if "compat_results" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", BACKENDS, ids=[f"{b}-results" for b in BACKENDS])


@pytest.fixture
def broker(matrix: tuple[str, str], pg_dsn: str) -> Broker:
    name = matrix[0]
    if name == "pgnotify":
        schema = f"c_{uuid.uuid4().hex[:10]}"
        return Broker(name, pgserver.as_broker_url(pg_dsn), {"schema": schema})
    url = REFERENCE[name]
    reason = _unreachable(url)
    if reason:
        pytest.skip(f"reference broker {name} not reachable at {url}: {reason}")
    # Redis redelivers an unacked message only after its visibility timeout
    # (an hour by default): short here so the killed-worker scenario can run.
    return Broker(name, url, {"visibility_timeout": 5} if name == "redis" else {})


@pytest.fixture
def worker_kind(matrix: tuple[str, str]) -> str:
    return matrix[1]


class Compat:
    """One scenario's world: a sending app, a worker, the execution log."""

    def __init__(
        self, broker: Broker, worker_kind: str, pg_dsn: str, backend: Broker | None = None
    ) -> None:
        self.broker = broker
        self.prefix = f"compat-{uuid.uuid4().hex[:8]}"
        self.table = f"log_{uuid.uuid4().hex[:10]}"
        self.dsn = pg_dsn
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{self.table}" (tag text, event text, data jsonb,'
                " at timestamptz DEFAULT clock_timestamp())"
            )
        self.env = dict(
            os.environ,
            COMPAT_BROKER_URL=broker.url,
            COMPAT_OPTIONS=json.dumps(broker.options),
            COMPAT_QUEUE_PREFIX=self.prefix,
            COMPAT_LOG_DSN=pg_dsn,
            COMPAT_LOG_TABLE=self.table,
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        self.backend = backend
        if backend is not None:
            self.env.update(
                COMPAT_RESULT_BACKEND=backend.url, COMPAT_RESULT_OPTIONS=json.dumps(backend.options)
            )
        # A sender configured as the worker's app is, sending tasks by name.
        self.app = Celery("compat-sender", broker=broker.url)
        self.app.conf.broker_transport_options = broker.options
        self.app.conf.task_default_queue = f"{self.prefix}-default"
        self.app.conf.task_routes = {"compat_tests.app.routed": {"queue": f"{self.prefix}-other"}}
        self.app.conf.task_queue_max_priority = 10
        self.app.conf.task_ignore_result = True
        if backend is not None:
            self.app.conf.result_backend = backend.url
            self.app.conf.result_backend_transport_options = backend.options
        self.queues = [f"{self.prefix}-default", f"{self.prefix}-other"]
        self.kind = worker_kind
        #: this scenario's worker, as remote control names it
        self.node = f"{self.prefix}@{socket.gethostname()}"
        self.extra_processes: list[WorkerProcess] = []
        self.worker = self._start(worker_kind)

    def _start(self, kind: str, *extra: str) -> WorkerProcess:
        queues = ",".join(self.queues)
        if kind == "celery":
            worker = celery_worker(
                self.env,
                "-Q",
                queues,
                "--without-mingle",
                "--without-gossip",
                *extra,
                name=self.prefix,
                app="compat_tests.app",
            )
        else:
            worker = celery_pg_worker(
                self.env,
                "-Q",
                queues,
                *extra,
                name=self.prefix,
                app="compat_tests.app",
                loglevel="info",
            )
        worker.wait_for(READY[kind])
        return worker

    def restart_worker(self, *extra: str) -> None:
        self.worker.stop()
        self.worker = self._start(self.kind, *extra)

    def beat(self, schedule_file: str) -> WorkerProcess:
        """Celery's own ``celery beat`` on this broker (the app's 1-second schedule)."""
        env = dict(self.env, COMPAT_BEAT="1")
        argv = [sys.executable, "-m", "celery", "-A", "compat_tests.app", "beat"]
        beat = WorkerProcess([*argv, "-s", schedule_file, "-l", "info"], env)
        self.extra_processes.append(beat)
        return beat

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"compat_tests.app.{name}", args=args, **options)

    def events(self, tag: str) -> list[tuple[str, Any]]:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                f'SELECT event, data FROM "{self.table}" WHERE tag = %s ORDER BY at', (tag,)
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def wait(self, tag: str, count: int, timeout: float = 30) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events(tag)
            if len(got) >= count:
                return got
            time.sleep(0.1)
        return self.events(tag)

    def close(self) -> None:
        self.worker.stop()
        for process in self.extra_processes:
            process.stop()
        close_backend = getattr(self.app.backend, "close", None) if self.backend else None
        if close_backend is not None:
            close_backend()
        with self.app.connection_for_write() as conn:
            for name in self.queues:
                try:
                    Queue(name, no_declare=True)(conn.default_channel).delete()
                except Exception:  # noqa: BLE001 - cleanup is best effort
                    pass
            if self.broker.name == "redis":
                # Deleting a queue leaves kombu's binding sets (keyed by the
                # exchange, named after the queue here) behind, and a message
                # sent meanwhile (by beat) may have re-created the queue.
                client = conn.default_channel.client
                keys = [*client.scan_iter(f"{self.prefix}*")]
                for name in self.queues:
                    keys += [f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"]
                client.delete(*keys)
        if self.broker.name == "pgnotify":
            close_app(self.app)  # its pools are keyed by this test's own schema
        else:
            # Not force_close_all(): Celery's producer pools are shared,
            # process-wide, by every app on the same broker URL.
            self.app.close()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{self.table}"')
            for options in (self.broker.options, self.backend.options if self.backend else {}):
                schema = options.get("schema")
                if schema:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def compat(broker: Broker, worker_kind: str, pg_dsn: str) -> Iterator[Compat]:
    world = Compat(broker, worker_kind, pg_dsn)
    yield world
    world.close()


@pytest.fixture
def result_backend(backend_name: str, pg_dsn: str) -> Broker:
    if backend_name == "pgnotify":
        schema = f"r_{uuid.uuid4().hex[:10]}"
        return Broker(backend_name, pgserver.as_broker_url(pg_dsn), {"schema": schema})
    url = REFERENCE["redis"].rsplit("/", 1)[0] + "/1"
    reason = _unreachable(url)
    if reason:
        pytest.skip(f"reference result backend redis not reachable at {url}: {reason}")
    return Broker(backend_name, url)


@pytest.fixture
def compat_results(
    broker: Broker, worker_kind: str, pg_dsn: str, result_backend: Broker
) -> Iterator[Compat]:
    """A scenario's world whose tasks store results in ``result_backend``."""
    world = Compat(broker, worker_kind, pg_dsn, result_backend)
    yield world
    world.close()
