"""Celery's own worker is the specification: every way a task can end leaves
its message and its result as ``celery worker`` leaves them.

The same tasks (``tests/semantics_app.py``) run on the stock worker and on
``celery-pg worker``; for each, the test records how often it ran, where its
message ended (gone, still queued, dead-lettered) and its state in the
result backend, and asserts both workers agree, and agree with Celery's
documented rules.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.workers import E2E, close_app

pytestmark = pytest.mark.e2e

APP = "tests.semantics_app"

#: task -> (runs, message, result state) as Celery documents them.
EXPECTED: dict[str, tuple[int, str, str]] = {
    "succeed": (1, "gone", "SUCCESS"),
    "fail": (1, "gone", "FAILURE"),
    "fail_late": (1, "gone", "FAILURE"),
    "fail_late_unacked": (1, "dead", "FAILURE"),
    "retry_now": (3, "gone", "SUCCESS"),
    "retry_later": (2, "gone", "SUCCESS"),
    "reject_requeue": (2, "gone", "SUCCESS"),
    "reject_drop": (1, "dead", "*"),
    "reject_early_acked": (1, "gone", "*"),
    "ignore": (1, "gone", "*"),
    "hard_limit": (1, "gone", "FAILURE"),
    "soft_limit": (1, "gone", "SUCCESS"),
    "lost_requeued": (2, "gone", "SUCCESS"),
    "lost_late": (1, "gone", "FAILURE"),
    "retry_in_transaction": (2, "gone", "SUCCESS"),
    "hard_limit_early": (1, "gone", "FAILURE"),
    "revoked_while_running": (1, "gone", "REVOKED"),
}


def _observe(e2e: E2E, db: psycopg.Connection[Any], sent: dict[str, str]) -> dict[str, Any]:
    """task -> (runs, where its message is, its result state), now."""
    schema = e2e.options["schema"]
    out = {}
    for name, task_id in sent.items():
        queued = db.execute(
            f'SELECT count(*) FROM "{schema}".messages WHERE payload LIKE %s', (f"%{task_id}%",)
        ).fetchone()
        dead = db.execute(
            f'SELECT count(*) FROM "{schema}".dead_letters WHERE payload LIKE %s',
            (f"%{task_id}%",),
        ).fetchone()
        state = db.execute(
            f'SELECT status FROM "{schema}".results WHERE task_id = %s', (task_id,)
        ).fetchone()
        where = "queued" if queued != (0,) else ("dead" if dead != (0,) else "gone")
        out[name] = (len(e2e.events(task_id)), where, state[0] if state else "PENDING")
    return out


def _settled(observed: dict[str, Any]) -> bool:
    return all(
        observed[name][:2] == (runs, where) and state in ("*", observed[name][2])
        for name, (runs, where, state) in EXPECTED.items()
    )


def _ended(e2e: E2E, db: psycopg.Connection[Any], sent: dict[str, str]) -> dict[str, Any]:
    """What every task ended as: waits until all are as expected (an early
    acked message leaves the table before its task ends), or 90 s, then
    waits a little more for anything that would still change (a retry on
    its way, a second run)."""
    deadline = time.monotonic() + 90
    while not _settled(_observe(e2e, db, sent)) and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.5)
    return _observe(e2e, db, sent)


def _run_all(e2e: E2E, db: psycopg.Connection[Any], kind: str) -> dict[str, Any]:
    start = e2e.worker if kind == "celery" else e2e.pg_worker
    worker = start(concurrency=4, app=APP)
    sent = {}
    for name in EXPECTED:
        task_id = str(uuid.uuid4())
        # The task id doubles as the log tag: runs are counted by it.
        e2e.app.send_task(f"{APP}.{name}", args=(task_id,), task_id=task_id, ignore_result=False)
        sent[name] = task_id
    revoked = sent["revoked_while_running"]
    assert e2e.wait_events(revoked, ["run"]) == ["run"]
    e2e.app.control.revoke(revoked, terminate=True)
    ended = _ended(e2e, db, sent)
    worker.stop()
    return ended


def test_every_outcome_ends_as_on_celery_worker(e2e: E2E, db: psycopg.Connection[Any]) -> None:
    stock = _run_all(e2e, db, "celery")
    ours = _run_all(e2e, db, "celery-pg")
    for name, (runs, where, state) in EXPECTED.items():
        assert stock[name][:2] == (runs, where), (name, "celery worker", stock[name])
        assert ours[name][:2] == (runs, where), (name, "celery-pg worker", ours[name])
        if state != "*":
            assert stock[name][2] == state, (name, "celery worker", stock[name])
            assert ours[name][2] == state, (name, "celery-pg worker", ours[name])
        else:  # what Celery stores here differs across its versions: the same as it
            assert ours[name][2] in (stock[name][2], "FAILURE"), (name, stock[name], ours[name])


@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_a_task_expired_while_queued_is_revoked_never_run(
    e2e: E2E, db: psycopg.Connection[Any], kind: str
) -> None:
    from celery import Celery
    from celery.exceptions import TaskRevokedError

    start = e2e.worker if kind == "celery" else e2e.pg_worker
    start("--prefetch-multiplier", "1", concurrency=1, app=APP)
    app = Celery("waiter", broker=e2e.app.conf.broker_url, backend=e2e.app.conf.broker_url)
    app.conf.broker_transport_options = e2e.options
    try:
        for i in range(3):
            app.send_task(f"{APP}.sleep_for", args=(f"ahead-{i}", 1.5))
        late = app.send_task(f"{APP}.succeed", args=("expired",), expires=1)
        with pytest.raises(TaskRevokedError):
            late.get(timeout=30)
        assert late.state == "REVOKED"
        assert e2e.events("expired") == [], "an expired task never runs"
    finally:
        close_app(app)


def test_a_child_whose_task_was_cancelled_is_retired(e2e: E2E) -> None:
    """A hard time limit interrupts the task anywhere (inside a database
    driver's protocol too): its process never runs another task."""
    e2e.pg_worker(concurrency=1, app=APP)
    e2e.app.send_task(f"{APP}.hard_limit", args=("cut",))
    e2e.app.send_task(f"{APP}.succeed", args=("next",))
    assert e2e.wait_events("next", ["run"], timeout=30) == ["run"]
    with psycopg.connect(e2e.dsn) as conn:
        pids = dict(conn.execute(f'SELECT tag, pid FROM "{e2e.table}"').fetchall())
    assert pids["cut"] != pids["next"]


def test_rate_limited_messages_do_not_widen_the_prefetch_window(
    e2e: E2E, db: psycopg.Connection[Any]
) -> None:
    e2e.pg_worker("--prefetch-multiplier", "2", concurrency=1)
    for i in range(40):
        e2e.send("limited", f"limited-{i}")  # rate_limit 2/s
    schema = e2e.options["schema"]
    most = 0
    for _ in range(30):  # 6 s, while the tasks trickle out at 2/s
        time.sleep(0.2)
        row = db.execute(
            f'SELECT count(*) FROM "{schema}".messages WHERE consumer_id IS NOT NULL'
        ).fetchone()
        most = max(most, row[0] if row else 0)
    # The window (2), the task running, and one claimed as acks free room.
    assert most <= 4, most


def test_a_manager_failure_costs_one_message_never_the_pool(
    e2e: E2E, db: psycopg.Connection[Any]
) -> None:
    """An unexpected error while the manager handles one message (here: a
    rate_limit Celery cannot parse) dead-letters that message; the running
    task finishes and the worker goes on serving."""
    e2e.env["PGNOTIFY_SEMANTICS_BAD_RATE"] = "1"
    worker = e2e.pg_worker(concurrency=1, app=APP)
    e2e.app.send_task(f"{APP}.sleep_for", args=("running", 2))
    e2e.wait_events("running", ["run"])
    bad = e2e.app.send_task(f"{APP}.badly_limited", args=("bad",))
    e2e.app.send_task(f"{APP}.succeed", args=("after",))
    assert e2e.wait_events("after", ["run"]) == ["run"], worker.output()[-3000:]
    assert e2e.events("running") == ["run", "done"], "the running task was not cut short"
    assert e2e.events("bad") == []
    dead = db.execute(
        f'SELECT reason FROM "{e2e.options["schema"]}".dead_letters WHERE payload LIKE %s',
        (f"%{bad.id}%",),
    ).fetchall()
    assert len(dead) == 1 and "failed on this message" in dead[0][0], dead
