"""``celery-pg worker`` as a subprocess, running the same tasks unchanged."""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg
import pytest

from tests.workers import E2E

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_plain_tasks(e2e: E2E, start_method):
    e2e.pg_worker("--start-method", start_method)
    for i in range(20):
        e2e.send("record", f"t{i}")
    for i in range(20):
        assert e2e.wait_events(f"t{i}", ["run"]) == ["run"]


def test_retries_and_countdown(e2e: E2E):
    e2e.pg_worker()
    sent = time.monotonic()
    e2e.send("flaky", "f", 2)
    e2e.send("record", "later", countdown=2)
    assert e2e.wait_events("f", ["a"] * 4) == ["attempt-0", "attempt-1", "attempt-2", "done"]
    assert e2e.wait_events("later", ["run"]) == ["run"]
    assert time.monotonic() - sent >= 1.9


def test_long_task_does_not_hold_up_others_while_a_child_is_free(e2e: E2E):
    e2e.pg_worker()
    e2e.send("slow", "long", 6)
    e2e.wait_events("long", ["start"])
    started = time.monotonic()
    for i in range(5):
        e2e.send("record", f"quick{i}")
    for i in range(5):
        assert e2e.wait_events(f"quick{i}", ["run"], timeout=10) == ["run"]
    assert time.monotonic() - started < 5  # not queued behind the 6 s task


def test_child_sigkilled_mid_task_with_reject_on_worker_lost_runs_again(e2e: E2E):
    worker = e2e.pg_worker()
    e2e.send("slow_requeued", "victim", 2)
    assert e2e.wait_events("victim", ["start"]) == ["start"]
    pid = child_running(e2e, "victim")
    import os

    os.kill(pid, signal.SIGKILL)
    events = e2e.wait_events("victim", ["start", "start", "done"], timeout=30)
    assert events == ["start", "start", "done"]
    assert "lost with its child" in worker.output()


def test_child_sigkilled_mid_task_without_reject_on_worker_lost_is_not_rerun(e2e: E2E):
    worker = e2e.pg_worker()
    e2e.send("slow", "once", 2)
    assert e2e.wait_events("once", ["start"]) == ["start"]
    import os

    os.kill(child_running(e2e, "once"), signal.SIGKILL)
    worker.wait_for("marked failed")
    e2e.send("record", "after")  # the pool replaced the child and goes on
    assert e2e.wait_events("after", ["run"]) == ["run"]
    assert e2e.events("once") == ["start"]


def test_main_process_sigkilled_messages_come_back_after_the_lease(e2e: E2E):
    first = e2e.pg_worker()
    e2e.send("slow", "orphan", 3)
    assert e2e.wait_events("orphan", ["start"]) == ["start"]
    first.kill()  # main process and children
    first.stop()
    e2e.pg_worker(name="w2")
    events = e2e.wait_events("orphan", ["start", "start", "done"], timeout=40)
    assert events == ["start", "start", "done"]


def test_warm_shutdown_finishes_running_and_returns_waiting(e2e: E2E):
    worker = e2e.pg_worker("-c", "1")
    e2e.send("slow", "running", 2)
    e2e.wait_events("running", ["start"])
    e2e.send("record", "waiting")
    time.sleep(0.5)  # received and queued in the manager behind the running task
    worker.kill(signal.SIGTERM)
    worker.proc.wait(30)
    assert e2e.events("running") == ["start", "done"]
    assert e2e.events("waiting") == []
    with psycopg.connect(e2e.dsn) as conn:
        row = conn.execute(
            f'SELECT count(*) FROM "{e2e.options["schema"]}".messages WHERE consumer_id IS NULL'
        ).fetchone()
    assert row == (1,)
    e2e.pg_worker(name="w2")
    assert e2e.wait_events("waiting", ["run"]) == ["run"]


def test_max_tasks_per_child_replaces_children(e2e: E2E):
    e2e.pg_worker("-c", "1", "--max-tasks-per-child", "1")
    for i in range(3):
        e2e.send("whoami", f"who{i}")
        e2e.wait_events(f"who{i}", ["pid"])
    pids = {e2e.events(f"who{i}")[0] for i in range(3)}
    assert len(pids) == 3


def test_children_are_forked_on_the_main_thread_only(e2e: E2E):
    """A child forked on the results thread while the main thread imports a
    module (Celery loads the result backend on first use) inherits that
    import's lock and hangs on its first import of the module: replacement
    children, too, are forked on the main thread."""
    e2e.pg_worker("-c", "1", "--max-tasks-per-child", "1")
    for i in range(3):
        e2e.send("forked_by", f"fork{i}")
        assert e2e.wait_events(f"fork{i}", ["?"]) != []
    assert [e2e.events(f"fork{i}") for i in range(3)] == [["MainThread"]] * 3


def test_a_retiring_child_is_never_handed_a_task(e2e: E2E):
    """With a backlog, the next task is waiting the moment a child finishes
    its last one: it must go to the next child, not to the retiring one
    (which would exit without running it, and the task be reported lost)."""
    worker = e2e.pg_worker("-c", "1", "--max-tasks-per-child", "1")
    for i in range(12):
        e2e.send("record", f"retire{i}")
    for i in range(12):
        assert e2e.wait_events(f"retire{i}", ["run"]) == ["run"], worker.output()[-3000:]
    assert "while running" not in worker.output()


def test_max_lifetime_per_child_replaces_children(e2e: E2E):
    # Long enough for two tasks to run in the first child on a loaded machine.
    e2e.pg_worker("-c", "1", "--max-lifetime-per-child", "3")
    e2e.send("whoami", "young")
    e2e.wait_events("young", ["pid"])
    e2e.send("whoami", "still-young")
    e2e.wait_events("still-young", ["pid"])
    time.sleep(3.2)
    e2e.send("whoami", "old")  # runs in the child that outlived its second
    e2e.wait_events("old", ["pid"])
    e2e.send("whoami", "replaced")
    e2e.wait_events("replaced", ["pid"])
    pids = [e2e.events(t)[0] for t in ("young", "still-young", "old", "replaced")]
    assert pids[0] == pids[1] == pids[2] != pids[3], pids


def child_running(e2e: E2E, tag: str) -> int:
    with psycopg.connect(e2e.dsn) as conn:
        row = conn.execute(
            f'SELECT pid FROM "{e2e.table}" WHERE tag = %s AND event = %s', (tag, "start")
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_inspect_answers_in_celerys_format(e2e: E2E):
    e2e.pg_worker()
    # One full wait, to see that exactly one node answers (longer than the
    # fallback re-read: a request right after start-up can wait for it, see
    # README, Not there yet); then each request ends at the first reply.
    assert list(e2e.app.control.inspect(timeout=7).ping().values()) == [{"ok": "pong"}]
    inspect = e2e.app.control.inspect(timeout=10, limit=1)
    registered = next(iter(inspect.registered().values()))
    assert "tests.e2e_app.record" in registered
    e2e.send("slow", "busy", 3)
    e2e.wait_events("busy", ["start"])
    active = next(iter(inspect.active().values()))
    assert [t["name"] for t in active] == ["tests.e2e_app.slow"]
    assert active[0]["worker_pid"]
    held = e2e.send("record", "sched", countdown=5)  # the worker holds it
    later = e2e.send("record", "sched", countdown=30)  # waits in the database
    time.sleep(0.5)
    scheduled = next(iter(inspect.scheduled().values()))
    assert [s["request"]["id"] for s in scheduled] == [held.id, later.id]
    assert [s["request"]["name"] for s in scheduled] == ["tests.e2e_app.record"] * 2
    assert scheduled[1]["request"]["held_by"] == "broker"
    stats = next(iter(inspect.stats().values()))
    assert stats["pool"]["max-concurrency"] == 2
    assert len(stats["pool"]["processes"]) == 2


def test_revoke_before_start_and_with_terminate(e2e: E2E):
    worker = e2e.pg_worker()
    later = e2e.send("record", "revoked-later", countdown=2)
    e2e.app.control.revoke(later.id)
    running = e2e.send("slow", "terminated", 30)
    e2e.wait_events("terminated", ["start"])
    e2e.app.control.revoke(running.id, terminate=True)
    worker.wait_for("Cancelling")
    e2e.send("record", "after")
    assert e2e.wait_events("after", ["run"]) == ["run"]
    time.sleep(2.5)
    assert e2e.events("revoked-later") == []
    assert e2e.events("terminated") == ["start"]
    revoked = next(iter(e2e.app.control.inspect(timeout=10, limit=1).revoked().values()))
    assert {later.id, running.id} <= set(revoked)


def test_time_limits(e2e: E2E):
    worker = e2e.pg_worker()
    e2e.send("soft", "soft")
    e2e.send("overrun", "hard")
    assert e2e.wait_events("soft", ["start", "soft-limit"], timeout=15) == ["start", "soft-limit"]
    worker.wait_for("hard time limit", timeout=15)
    time.sleep(1)
    assert e2e.events("hard") == ["start"]
    e2e.send("record", "after")
    assert e2e.wait_events("after", ["run"]) == ["run"]


def test_pool_grow_and_shrink(e2e: E2E):
    e2e.pg_worker()
    control = e2e.app.control
    control.pool_grow(2, reply=True, timeout=10, limit=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = next(iter(control.inspect(timeout=10, limit=1).stats().values()))
        if len(stats["pool"]["processes"]) == 4:
            break
        time.sleep(0.3)
    assert stats["pool"]["max-concurrency"] == 4
    assert len(stats["pool"]["processes"]) == 4
    control.pool_shrink(3, reply=True, timeout=10, limit=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = next(iter(control.inspect(timeout=10, limit=1).stats().values()))
        if len(stats["pool"]["processes"]) == 1:
            break
        time.sleep(0.3)
    assert len(stats["pool"]["processes"]) == 1
    e2e.send("record", "still")
    assert e2e.wait_events("still", ["run"]) == ["run"]


def test_remote_shutdown(e2e: E2E):
    worker = e2e.pg_worker()
    e2e.app.control.shutdown()
    assert worker.proc.wait(20) == 0


def test_max_memory_per_child_replaces_children(e2e: E2E):
    # 1 KiB: every child is over the limit after its first task.
    e2e.pg_worker("-c", "1", "--max-memory-per-child", "1")
    for i in range(3):
        e2e.send("whoami", f"mem{i}")
        e2e.wait_events(f"mem{i}", ["pid"])
    assert len({e2e.events(f"mem{i}")[0] for i in range(3)}) == 3


def test_broker_connection_lost_keeps_the_consumer_and_runs_each_task_once(e2e: E2E):
    """The manager comes back as the same consumer: the messages it holds
    stay leased to it, waiting ones run once, and the running acks_late task
    is acked through the new connection instead of running again."""
    worker = e2e.pg_worker("-c", "1")
    e2e.send("slow", "running", 2)
    e2e.wait_events("running", ["start"])
    e2e.send("record", "waiting-1")
    e2e.send("record", "waiting-2")
    time.sleep(0.5)  # both received and waiting in the manager
    with psycopg.connect(e2e.dsn, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'celery-pgnotify' AND datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    assert killed
    for tag in ("waiting-1", "waiting-2"):
        assert "run" in e2e.wait_events(tag, ["run"], timeout=30)
    worker.wait_for("Connection to broker lost")
    worker.wait_for("Reconnected as the same consumer")
    deadline = time.monotonic() + 30
    while "done" not in e2e.events("running") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # a redelivered copy would have started by now
    runs = {tag: e2e.events(tag).count("run") for tag in ("waiting-1", "waiting-2")}
    assert runs == {"waiting-1": 1, "waiting-2": 1}
    assert e2e.events("running") == ["start", "done"]
    with psycopg.connect(e2e.dsn) as conn:
        left = conn.execute(f'SELECT count(*) FROM "{e2e.options["schema"]}".messages').fetchone()
    assert left == (0,)


def test_task_and_worker_events(e2e: E2E):
    """With -E, Celery's event Receiver (as Flower uses) sees the worker and its tasks."""
    e2e.pg_worker("-E")
    seen: list[dict[str, Any]] = []
    with e2e.app.connection_for_read() as conn:
        receiver = e2e.app.events.Receiver(conn, handlers={"*": lambda ev: on_event(ev)})

        def on_event(event: dict[str, Any]) -> None:
            seen.append(event)
            types = {e["type"] for e in seen}
            if {"task-succeeded", "worker-heartbeat"} <= types:
                receiver.should_stop = True

        capture = receiver.itercapture(limit=None, timeout=20, wakeup=False)
        next(capture)
        e2e.send("flaky", "evented-retry", 1)
        e2e.wait_events("evented-retry", ["attempt-0", "attempt-1", "done"])
        ignored = e2e.send("ignored", "evented-ignore")
        e2e.wait_events("evented-ignore", ["run"])
        e2e.send("record", "evented")
        for _ in capture:
            pass
    types = {e["type"] for e in seen}
    assert {"task-received", "task-started", "task-succeeded", "worker-heartbeat"} <= types
    assert "task-retried" in types
    # Ignore is neither a success nor a failure (as in Celery's worker).
    assert not [e for e in seen if e.get("uuid") == ignored.id and e["type"] == "task-failed"]
    succeeded = next(e for e in seen if e["type"] == "task-succeeded")
    assert succeeded["hostname"].startswith("w1@")
    assert succeeded["runtime"] >= 0


def test_embedded_beat_runs_the_apps_schedule(e2e: E2E, tmp_path):
    e2e.env["PGNOTIFY_E2E_BEAT"] = "1"
    worker = e2e.pg_worker("-B", "-s", str(tmp_path / "schedule"))
    time.sleep(4.5)
    worker.stop()
    fired = e2e.events("beat")
    assert 3 <= len(fired) <= 6, fired


def test_autoscale_grows_on_demand_and_shrinks_when_idle(e2e: E2E):
    e2e.env["PGNOTIFY_E2E_KEEPALIVE"] = "1"
    worker = e2e.pg_worker("--autoscale", "3,1")
    inspect = e2e.app.control.inspect(timeout=10, limit=1)
    assert len(next(iter(inspect.stats().values()))["pool"]["processes"]) == 1
    for i in range(3):
        e2e.send("slow", f"burst{i}", 2)
    for i in range(3):
        assert e2e.wait_events(f"burst{i}", ["start"]) == ["start"]
    starts = []
    with psycopg.connect(e2e.dsn) as conn:
        for i in range(3):
            row = conn.execute(
                f'SELECT at FROM "{e2e.table}" WHERE tag = %s AND event = %s',
                (f"burst{i}", "start"),
            ).fetchone()
            starts.append(row[0])
    # The three ran side by side, not one after another.
    assert (max(starts) - min(starts)).total_seconds() < 1.9
    worker.wait_for("Autoscale: 2 -> 1", timeout=20)


def test_rate_limit(e2e: E2E):
    e2e.pg_worker()
    for _ in range(5):
        e2e.send("limited", "limited")
    events = e2e.wait_events("limited", ["run"] * 5, timeout=20)
    assert len(events) == 5
    with psycopg.connect(e2e.dsn) as conn:
        row = conn.execute(
            f'SELECT max(at) - min(at) FROM "{e2e.table}" WHERE tag = %s', ("limited",)
        ).fetchone()
    # 2 per second: five runs take at least about two seconds.
    assert row[0].total_seconds() >= 1.8


def test_control_rate_limit_at_runtime(e2e: E2E):
    e2e.pg_worker()
    replies = e2e.app.control.rate_limit(
        "tests.e2e_app.record", "2/s", reply=True, timeout=5, limit=1
    )
    assert replies and all(
        r == {"ok": "new rate limit set successfully"} for reply in replies for r in reply.values()
    ), replies
    for _ in range(5):
        e2e.send("record", "throttled")
    assert len(e2e.wait_events("throttled", ["run"] * 5, timeout=20)) == 5
    with psycopg.connect(e2e.dsn) as conn:
        row = conn.execute(
            f'SELECT max(at) - min(at) FROM "{e2e.table}" WHERE tag = %s', ("throttled",)
        ).fetchone()
    assert row[0].total_seconds() >= 1.8
    unknown = e2e.app.control.rate_limit("no.such.task", "1/s", reply=True, timeout=5, limit=1)
    assert all("error" in r for reply in unknown for r in reply.values())


def test_a_warm_shutdown_ends_a_worker_that_cannot_reach_its_broker(e2e: E2E):
    """A worker retrying its first connection kept retrying after SIGTERM
    ("Warm shutdown" logged, the process left running for good), where
    Celery's own worker stops."""
    import socket

    from tests.workers import celery_pg_worker

    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = dict(e2e.env, PGNOTIFY_BROKER_URL=f"pgnotify://nobody@127.0.0.1:{port}/none")
        worker = celery_pg_worker(env, "-Q", "unreachable", loglevel="info")
        try:
            worker.wait_for("Broker connection error", timeout=30)
            worker.kill(signal.SIGTERM)
            code = worker.proc.wait(30)  # it stops within about a second
        finally:
            worker.stop()
    assert code == 0, worker.output()


def test_the_children_of_a_killed_manager_do_not_outlive_it(e2e: E2E):
    """Each child holds copies of the manager's ends of the pipes (a fork
    inherits them), so a SIGKILLed manager's pipes never closed: its idle
    children waited for a next job for good."""
    import os
    import subprocess

    worker = e2e.pg_worker(concurrency=2)
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(worker.proc.pid)], capture_output=True, text=True
    ).stdout
    children = [int(pid) for pid in out.split()]
    assert len(children) == 2, out
    os.kill(worker.proc.pid, signal.SIGKILL)  # the manager alone, not its group
    worker.proc.wait(10)
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    try:
        assert alive == [], f"children {alive} outlived their manager"
    finally:
        worker.kill()  # the group: whatever is left
