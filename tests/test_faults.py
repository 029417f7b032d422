"""The fault suite: a stream of tasks, a fault, and every task accounted for.

Each test sends numbered tasks, causes one kind of fault while they flow,
and counts executions (written to files, so counting survives database
faults): none may be missing; duplicates are counted and allowed only where
at-least-once delivery allows them (a task running when its worker died).
The figures are printed at the end of the run.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from celery import Celery

from tests.pgserver import as_broker_url, restart
from tests.workers import (
    FAST,
    READY,
    WorkerProcess,
    celery_pg_worker,
    celery_worker,
    close_app,
    worker_env,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TASK = "tests.e2e_app.mark"


class Stream:
    """Workers, a producer of numbered tasks, and the execution count."""

    def __init__(self, broker_url: str, options: dict[str, Any], tmp_path: Any) -> None:
        self.url = broker_url
        self.options = options
        self.marks = str(tmp_path)
        self.env = worker_env(broker_url, options, "", "")
        self.env["PGNOTIFY_MARK_DIR"] = self.marks
        self.app = Celery("fault-producer", broker=broker_url)
        self.app.conf.broker_transport_options = options
        self.app.conf.task_ignore_result = True
        self.workers: list[WorkerProcess] = []
        self.sent: list[int] = []
        self.raised: list[int] = []

    def worker(self, kind: str, *args: str, name: str = "w1") -> WorkerProcess:
        build: Callable[..., WorkerProcess] = (
            celery_pg_worker if kind == "celery-pg" else celery_worker
        )
        kwargs: dict[str, Any] = {"name": name}
        if kind == "celery-pg":
            kwargs["loglevel"] = "info"
        worker = build(self.env, *args, **kwargs)
        self.workers.append(worker)
        worker.wait_for(READY[kind])
        return worker

    def produce(self, count: int, pause: float = 0.0, seconds: float = 0.0) -> threading.Thread:
        """Send tasks 0..count-1 from a thread, with Celery's publish retry."""
        policy = {
            "max_retries": 50,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }

        def run() -> None:
            start = len(self.sent) + len(self.raised)
            for i in range(start, start + count):
                try:
                    self.app.send_task(TASK, args=(i, seconds), retry=True, retry_policy=policy)
                    self.sent.append(i)
                except Exception:  # noqa: BLE001 - counted: a producer may raise, never lose
                    self.raised.append(i)
                if pause:
                    time.sleep(pause)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def executions(self) -> Counter[int]:
        counts: Counter[int] = Counter()
        for path in glob.glob(os.path.join(self.marks, "*.marks")):
            with open(path) as f:
                counts.update(int(line) for line in f if line.strip())
        return counts

    def wait_all(self, timeout: float = 90) -> Counter[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.executions()
            if all(i in counts for i in self.sent):
                return counts
            time.sleep(0.2)
        return self.executions()

    def account(self, fault: str, figures: list[str], duplicates_allowed: bool) -> None:
        counts = self.wait_all()
        lost = [i for i in self.sent if i not in counts]
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        figures.append(
            f"{fault}: sent {len(self.sent)}, producer raised {len(self.raised)}, "
            f"executed {len(counts)}, lost {len(lost)}, duplicates {duplicates}"
        )
        assert not lost, f"{fault}: lost {len(lost)} task(s), e.g. {lost[:10]}"
        if not duplicates_allowed:
            assert duplicates == 0, f"{fault}: {duplicates} duplicate execution(s)"
        unexpected = set(counts) - set(self.sent) - set(self.raised)
        assert not unexpected, f"{fault}: executions of tasks never sent: {sorted(unexpected)[:10]}"

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        close_app(self.app)


@pytest.fixture
def stream(broker_url: str, schema: str, tmp_path: Any) -> Any:
    s = Stream(broker_url, {"schema": schema, **FAST}, tmp_path)
    yield s
    s.close()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_sigkill_children_and_main_during_acks_late_stream(
    stream: Stream, kind: str, figures: list[str]
) -> None:
    worker = stream.worker(kind, "-c", "2")
    producing = stream.produce(400, pause=0.005, seconds=0.01)
    time.sleep(1.0)
    children = _children(worker.proc.pid)
    assert children, "no pool children found"
    os.kill(children[0], signal.SIGKILL)
    time.sleep(1.5)
    worker.kill(signal.SIGKILL)  # the main process and every child
    worker.proc.wait()
    stream.worker(kind, "-c", "2", name="w2")
    producing.join()
    stream.account(f"SIGKILL child, then main ({kind} worker, acks_late)", figures, True)


# "immediate" is a crash: the acks and claims committed without waiting for
# the WAL flush (async_acks) may be undone, which may only run tasks again.
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_during_a_task_stream(
    own_server: Any, tmp_path: Any, figures: list[str], mode: str
) -> None:
    url = as_broker_url(own_server.get_uri())
    s = Stream(url, {"schema": "faults", **FAST}, tmp_path)
    try:
        s.worker("celery-pg", "-c", "2")
        producing = s.produce(5_000)  # the restart at 2,000: 3,000 more after it
        while len(s.sent) < 2_000:
            time.sleep(0.05)
        down = restart(own_server, mode)
        producing.join()
        what = "restarted" if mode == "fast" else "crashed (immediate stop) and restarted"
        s.account(
            f"PostgreSQL {what} ({down:.1f} s) during a 5,000-task stream (celery-pg worker)",
            figures,
            True,
        )
    finally:
        s.close()


def _kill_listeners(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'celery-pgnotify-listener' AND datname = current_database()"
        ).fetchall()
    return len(rows)


@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_listen_connection_killed_idle_and_under_load(
    stream: Stream, kind: str, pg_dsn: str, figures: list[str]
) -> None:
    stream.worker(kind, "-c", "2")
    assert _kill_listeners(pg_dsn) >= 1  # idle
    time.sleep(0.5)
    producing = stream.produce(2_000)
    kills = 1
    for _ in range(3):  # under load
        time.sleep(0.7)
        kills += _kill_listeners(pg_dsn)
    producing.join()
    stream.account(
        f"LISTEN session killed {kills} times, idle and under load ({kind} worker)", figures, False
    )


def test_notifications_never_arriving(
    broker_url: str, schema: str, tmp_path: Any, figures: list[str]
) -> None:
    """Messages appear without any NOTIFY: only the fallback poll finds them."""
    options = {"schema": schema, **FAST, "polling_interval": 1.0}
    s = Stream(broker_url, options, tmp_path)
    try:
        s.app.conf.task_default_queue = "staging"  # nobody consumes it: no NOTIFY is sent
        s.produce(300).join()
        s.worker("celery-pg", "-c", "2")
        with psycopg.connect("postgresql" + broker_url[len("pgnotify") :], autocommit=True) as conn:
            moved_at = time.monotonic()
            conn.execute(
                f'UPDATE "{schema}".messages SET queue = %s WHERE queue = %s', ("celery", "staging")
            )
        counts = s.wait_all()
        took = time.monotonic() - moved_at
        s.account(
            f"no notifications, fallback poll every 1 s (all ran within {took:.1f} s)",
            figures,
            False,
        )
        assert len(counts) == 300
    finally:
        s.close()


def test_tables_locked_three_leases_long_run_nothing_twice(
    stream: Stream, pg_dsn: str, figures: list[str]
) -> None:
    """Two workers of each kind (two children each) run acks_late tasks of
    3 s while another session holds ``consumers`` and ``messages`` locked
    for three times lease_timeout. Every consumer is stalled, none is dead:
    no lease may be taken from anyone, so no task runs twice."""
    for kind in ("celery", "celery-pg"):
        for n in (1, 2):
            stream.worker(kind, "-c", "2", name=f"{kind}-{n}")
    stream.produce(16, seconds=3.0).join()
    time.sleep(1.0)  # every child is busy, the rest are leased and waiting
    schema = stream.options["schema"]
    held = 3 * FAST["lease_timeout"]
    with psycopg.connect(pg_dsn) as locker, locker.transaction():
        locker.execute(
            f'LOCK TABLE "{schema}".consumers, "{schema}".messages IN ACCESS EXCLUSIVE MODE'
        )
        time.sleep(held)
    stream.account(
        f"consumers and messages locked {held:.0f} s (3 x lease_timeout), "
        "2 workers of each kind, acks_late tasks of 3 s",
        figures,
        False,
    )


@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_a_worker_frozen_past_its_lease_drops_what_it_had_not_started(
    stream: Stream, kind: str, figures: list[str]
) -> None:
    """A worker frozen (SIGSTOP: its sessions stay open, it says nothing) for
    2.5 x lease_timeout is declared dead and its messages go to another
    worker. When it thaws it finds out, reconnects, and drops the tasks it
    had not started: only the one it was running may run twice. (The stock
    worker may start one more: Celery hands its next reserved task to the
    pool the moment the running one ends, before the transport's next
    heartbeat can say the consumer was declared dead.)"""
    frozen = stream.worker(kind, "-c", "1", "--prefetch-multiplier", "4", name="frozen")
    stream.produce(12, seconds=1.0).join()
    time.sleep(1.5)  # frozen runs one task and holds the next ones
    frozen.kill(signal.SIGSTOP)
    stream.worker(kind, "-c", "2", name="other")
    time.sleep(2.5 * FAST["lease_timeout"])
    frozen.kill(signal.SIGCONT)
    counts = stream.wait_all()
    time.sleep(3)  # whatever the thawed worker would still run
    counts = stream.executions()
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    stream.account(
        f"{kind} worker (-c 1) frozen {2.5 * FAST['lease_timeout']:.0f} s, "
        f"then thawed: {duplicates} run twice",
        figures,
        True,
    )
    assert duplicates <= (1 if kind == "celery-pg" else 2), (
        f"only the task running when it froze may run twice: {counts}\n" + frozen.output()[-6000:]
    )


@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_a_worker_partitioned_past_its_lease_drops_what_it_had_not_started(
    stream: Stream, kind: str, pg_dsn: str, figures: list[str]
) -> None:
    """A worker in its own network namespace, cut off from PostgreSQL (every
    packet dropped both ways: TCP sees silence) for 2.5 x lease_timeout
    while another worker runs. It is declared dead and its messages run
    elsewhere; when the link heals it finds out, reconnects and drops what
    it had not started: lost 0. What may run twice: the tasks it ran while
    cut off, whose acks could not reach the database, up to the moment its
    own silence made it stop starting tasks (lease_timeout): with 1 s tasks
    on one child, at most 1 + lease_timeout / 1 s of them."""
    from tests import netpart

    why = netpart.available()
    if why is not None:
        pytest.skip(f"no network namespaces here: {why}")
    link = netpart.Link()
    relay = netpart.Relay(link.host_ip, netpart.upstream_of(pg_dsn))
    try:
        url = netpart.through(stream.url, link.host_ip, relay.port)
        env = dict(stream.env, PGNOTIFY_BROKER_URL=url)
        build = celery_pg_worker if kind == "celery-pg" else celery_worker
        cut_off = build(
            env, "-c", "1", "--prefetch-multiplier", "10", name="cut-off", prefix=link.prefix()
        )
        stream.workers.append(cut_off)
        cut_off.wait_for(READY[kind])
        stream.produce(20, seconds=1.0).join()
        time.sleep(1.5)  # it runs one task and holds the next ones
        link.partition()
        stream.worker(kind, "-c", "2", name="other")
        time.sleep(2.5 * FAST["lease_timeout"])
        link.heal()
        stream.wait_all()
        time.sleep(5)  # what the healed worker would still run
        counts = stream.executions()
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        stream.account(
            f"{kind} worker (-c 1) partitioned {2.5 * FAST['lease_timeout']:.0f} s "
            "(network namespace, every packet dropped), then healed",
            figures,
            True,
        )
        most = 1 + int(FAST["lease_timeout"] / 1.0)
        assert duplicates <= most, f"only tasks run while cut off may run twice: {counts}"
    finally:
        if link.cut:
            link.heal()
        for worker in stream.workers:
            worker.stop()
        relay.close()
        link.close()
