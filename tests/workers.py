"""Running real worker processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
from celery import Celery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerProcess:
    """A worker subprocess in its own process group, with its output kept."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.name = next((a.split("@")[0] for a in argv if "@%h" in a), "worker")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker did not print {text!r}:\n{self.output()}")

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def worker_env(
    broker_url: str, options: dict[str, Any], log_dsn: str, log_table: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PGNOTIFY_BROKER_URL=broker_url,
        PGNOTIFY_OPTIONS=json.dumps(options),
        PGNOTIFY_LOG_DSN=log_dsn,
        PGNOTIFY_LOG_TABLE=log_table,
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


#: The line each kind of worker prints once it consumes.
READY = {"celery": " ready.", "celery-pg": " ready: "}


def celery_worker(
    env: dict[str, str],
    *args: str,
    pool: str = "prefork",
    concurrency: int = 2,
    name: str = "w1",
    app: str = "tests.e2e_app",
    prefix: tuple[str, ...] = (),
) -> WorkerProcess:
    """The stock ``celery worker`` (wait for ``READY["celery"]``); ``prefix``
    runs it through another command (a network namespace's)."""
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-l",
        "info",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        *args,
    ]
    return WorkerProcess(argv, env)


def celery_pg_worker(
    env: dict[str, str],
    *args: str,
    concurrency: int = 2,
    name: str = "w1",
    app: str = "tests.e2e_app",
    loglevel: str = "debug",
    prefix: tuple[str, ...] = (),
) -> WorkerProcess:
    """``celery-pg worker`` (wait for ``READY["celery-pg"]``)."""
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "celery_pgnotify.cli",
        "worker",
        "-A",
        app,
        "-l",
        loglevel,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        *args,
    ]
    return WorkerProcess(argv, env)


def beat_process(
    env: dict[str, str], kind: str = "celery-pg", app: str = "tests.e2e_app"
) -> WorkerProcess:
    """A beat process on the PostgreSQL scheduler: ``celery-pg beat``, or
    Celery's own ``celery beat -S pgnotify`` (``kind="celery"``)."""
    if kind == "celery":
        argv = [sys.executable, "-m", "celery", "-A", app, "beat", "-S", "pgnotify", "-l", "info"]
    else:
        argv = [sys.executable, "-m", "celery_pgnotify.cli", "beat", "-A", app, "-l", "info"]
    return WorkerProcess(argv, env)


FAST = {"heartbeat_interval": 0.5, "lease_timeout": 2.0}


def close_app(app: Celery) -> None:
    """Close ``app`` with the broker connections it opened: Celery's own
    ``close()`` (5.5+) only forgets its pools, leaving their connections open
    until the process ends, and a test session would hold one per test.

    kombu keeps those pools process-wide, keyed by URL and transport options:
    this is for apps whose options name a schema of the test's own (the
    compatibility suite's Redis and RabbitMQ apps share theirs)."""
    backend = getattr(app._local, "backend", None)  # this thread's, if made
    if backend is not None and hasattr(backend, "close"):
        backend.close()
    amqp = app.__dict__.get("amqp")
    producers = getattr(amqp, "_producer_pool", None)
    if producers is not None:
        producers.force_close_all()
        amqp._producer_pool = None  # made anew if the app is used again
    if app._pool is not None:
        app._pool.force_close_all()
    app.close()


class E2E:
    """A sending app, the worker environment and the execution log."""

    def __init__(self, broker_url: str, pg_dsn: str, schema: str) -> None:
        self.options: dict[str, Any] = {"schema": schema, **FAST}
        self.table = f"{schema}_log"
        self.dsn = pg_dsn
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{self.table}" (tag text, event text, pid int,'
                " at timestamptz DEFAULT clock_timestamp())"
            )
        self.env = worker_env(broker_url, self.options, pg_dsn, self.table)
        self.app = Celery("sender", broker=broker_url)
        self.app.conf.broker_transport_options = self.options
        self.app.conf.task_ignore_result = True
        self.workers: list[WorkerProcess] = []

    def worker(self, *args: str, **kwargs: Any) -> WorkerProcess:
        worker = celery_worker(self.env, *args, **kwargs)
        self.workers.append(worker)
        worker.wait_for(READY["celery"])
        return worker

    def pg_worker(self, *args: str, **kwargs: Any) -> WorkerProcess:
        worker = celery_pg_worker(self.env, *args, **kwargs)
        self.workers.append(worker)
        worker.wait_for(READY["celery-pg"])
        return worker

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"tests.e2e_app.{name}", args=args, **options)

    def events(self, tag: str) -> list[str]:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                f'SELECT event FROM "{self.table}" WHERE tag = %s ORDER BY at', (tag,)
            ).fetchall()
        return [r[0] for r in rows]

    def times(self, tag: str) -> list[float]:
        """When each event of ``tag`` happened (UNIX time), in order."""
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                f'SELECT extract(epoch FROM at) FROM "{self.table}" WHERE tag = %s ORDER BY at',
                (tag,),
            ).fetchall()
        return [float(r[0]) for r in rows]

    def wait_events(self, tag: str, expected: list[str], timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events(tag)
            if len(got) >= len(expected):
                return got
            time.sleep(0.1)
        return self.events(tag)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        close_app(self.app)
