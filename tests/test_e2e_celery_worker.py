"""The stock ``celery worker`` on ``broker_url = pgnotify://...``, as subprocesses."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_plain_tasks_on_each_pool(e2e, pool):
    e2e.worker(pool=pool)
    for i in range(20):
        e2e.send("record", f"t{i}")
    for i in range(20):
        assert e2e.wait_events(f"t{i}", ["run"]) == ["run"]


def test_retries(e2e):
    e2e.worker()
    e2e.send("flaky", "f", 2)
    events = e2e.wait_events("f", ["attempt-0", "attempt-1", "attempt-2", "done"])
    assert events == ["attempt-0", "attempt-1", "attempt-2", "done"]


def test_countdown_and_eta(e2e):
    e2e.worker()
    sent = time.monotonic()
    e2e.send("record", "later", countdown=2)
    assert e2e.wait_events("later", ["run"]) == ["run"]
    assert time.monotonic() - sent >= 1.9


def test_acks_late_task_runs_again_after_the_worker_is_sigkilled(e2e):
    first = e2e.worker()
    e2e.send("slow", "victim", 3)
    assert e2e.wait_events("victim", ["start"]) == ["start"]
    first.kill()  # main process and pool children, mid-task
    first.stop()
    e2e.worker(name="w2")
    events = e2e.wait_events("victim", ["start", "start", "done"], timeout=40)
    assert events == ["start", "start", "done"]


def test_inspect_ping_and_active(e2e):
    e2e.worker()
    inspect = e2e.app.control.inspect(timeout=5)
    replies = inspect.ping()
    assert replies and all(r == {"ok": "pong"} for r in replies.values())
    e2e.send("slow", "busy", 4)
    e2e.wait_events("busy", ["start"])
    active = inspect.active()
    assert active
    names = [task["name"] for tasks in active.values() for task in tasks]
    assert "tests.e2e_app.slow" in names


def test_revoke(e2e):
    e2e.worker()
    result = e2e.send("record", "revoked", countdown=3)
    e2e.app.control.revoke(result.id)
    e2e.send("record", "control")
    assert e2e.wait_events("control", ["run"]) == ["run"]
    time.sleep(4)
    assert e2e.events("revoked") == []


def test_eta(e2e):
    from datetime import datetime, timedelta, timezone

    e2e.worker()
    when = datetime.now(timezone.utc) + timedelta(seconds=2)
    e2e.send("record", "eta", eta=when)
    assert e2e.wait_events("eta", ["run"]) == ["run"]
    assert datetime.now(timezone.utc) >= when


def test_task_events_reach_an_event_receiver(e2e):
    """With -E, events flow as Flower and `celery events` consume them."""
    e2e.worker("-E")
    seen: list[str] = []
    with e2e.app.connection_for_read() as conn:
        receiver = e2e.app.events.Receiver(conn, handlers={"*": lambda ev: on_event(ev)})

        def on_event(event: dict[str, Any]) -> None:
            seen.append(event["type"])
            if event["type"] == "task-succeeded":
                receiver.should_stop = True

        capture = receiver.itercapture(limit=None, timeout=20, wakeup=False)
        next(capture)  # the event queue is declared and consumed from now on
        e2e.send("record", "evented")
        for _ in capture:
            pass
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen)
