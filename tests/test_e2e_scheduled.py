"""What the broker holds, with real workers of both kinds: ETAs (on time,
listed by ``celery inspect scheduled``, neither early nor twice when every
worker is SIGKILLed while they wait) and paused queues (by remote control)."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest

from tests.workers import E2E

pytestmark = pytest.mark.e2e

KINDS = ["worker", "pg_worker"]


def start(e2e: E2E, kind: str, **kwargs: Any) -> Any:
    worker = e2e.worker(**kwargs) if kind == "worker" else e2e.pg_worker(**kwargs)
    worker.wait_for("ready")
    return worker


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_scheduled_lists_what_the_broker_holds(e2e: E2E, kind: str) -> None:
    start(e2e, kind)
    later = e2e.send("record", "listed", countdown=600)
    replies = e2e.app.control.inspect(timeout=5, limit=1).scheduled()
    entries = [entry for per_worker in replies.values() for entry in per_worker]
    assert [e["request"]["id"] for e in entries] == [later.id]
    assert entries[0]["request"]["name"] == "tests.e2e_app.record"
    assert entries[0]["request"]["held_by"] == "broker"


@pytest.mark.parametrize("kind", KINDS)
def test_a_backlog_of_etas_survives_sigkill_of_every_worker(
    e2e: E2E, db: psycopg.Connection[Any], kind: str
) -> None:
    schema = e2e.options["schema"]
    # Due 11 to 14 s from now: past broker_eta_threshold, so they wait in
    # the database; the first worker is killed before any is due.
    sent = {}
    for i in range(40):
        countdown = 11 + (i % 4)
        sent[f"eta-{i}"] = (
            time.time() + countdown,
            e2e.send("record", f"eta-{i}", countdown=countdown),
        )
    first = start(e2e, kind)
    row = db.execute(f'SELECT count(*) FROM "{schema}".scheduled').fetchone()
    assert row == (40,)
    time.sleep(3)
    first.kill()
    first.stop()
    start(e2e, kind, name="second")
    for tag in sent:
        assert e2e.wait_events(tag, ["run"], timeout=40) == ["run"]
    time.sleep(1.5)  # a second run, were there one, would have happened by now
    for tag, (eta, _result) in sent.items():
        (ran_at,) = e2e.times(tag)  # exactly once
        # Never early: the clocks are this machine's. A little slack for the
        # rounding of the ETA header to microseconds.
        assert ran_at >= eta - 0.01, (tag, ran_at, eta)
    row = db.execute(f'SELECT count(*) FROM "{schema}".scheduled').fetchone()
    assert row == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_remote_control_pauses_and_resumes_a_queue(
    e2e: E2E, db: psycopg.Connection[Any], kind: str
) -> None:
    schema = e2e.options["schema"]
    start(e2e, kind)
    control = e2e.app.control
    replies = control.broadcast(
        "pause_queue", arguments={"queue": "celery"}, reply=True, timeout=5, limit=1
    )
    assert [next(iter(r.values())) for r in replies] == [{"ok": "queue 'celery' paused"}]
    paused = e2e.send("record", "while-paused")
    time.sleep(2)
    assert e2e.events("while-paused") == []  # published, not claimed
    row = db.execute(f'SELECT count(*) FROM "{schema}".messages WHERE task_id = %s', (paused.id,))
    assert row.fetchone() == (1,)
    replies = control.broadcast(
        "resume_queue", arguments={"queue": "celery"}, reply=True, timeout=5, limit=1
    )
    assert [next(iter(r.values())) for r in replies] == [{"ok": "queue 'celery' resumed"}]
    assert e2e.wait_events("while-paused", ["run"]) == ["run"]
    replies = control.broadcast("pause_queue", arguments={}, reply=True, timeout=5, limit=1)
    assert "error" in next(iter(replies[0].values()))


@pytest.mark.parametrize("kind", KINDS)
def test_celerys_command_line_pauses_and_resumes_a_queue(
    e2e: E2E, db: psycopg.Connection[Any], kind: str
) -> None:
    """``celery control pause_queue`` was refused by Celery's command line,
    which accepts only the commands its own process registered (the
    broadcast worked)."""
    schema = e2e.options["schema"]
    start(e2e, kind)

    def control(*args: str) -> str:
        argv = [sys.executable, "-m", "celery", "-A", "tests.e2e_app", "control", *args]
        done = subprocess.run(
            [*argv, "--timeout", "5"], env=e2e.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "queue 'celery' paused" in control("pause_queue", "celery")
    paused = db.execute(f'SELECT name FROM "{schema}".paused_queues').fetchall()
    assert paused == [("celery",)]
    assert "queue 'celery' resumed" in control("resume_queue", "celery")
    paused = db.execute(f'SELECT name FROM "{schema}".paused_queues').fetchall()
    assert paused == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_scheduled_task_that_expires_before_it_is_due_never_runs(
    e2e: E2E, db: psycopg.Connection[Any], kind: str
) -> None:
    schema = e2e.options["schema"]
    start(e2e, kind)
    doomed = e2e.send("record", "expired-while-scheduled", countdown=11, expires=5)
    assert db.execute(f'SELECT count(*) FROM "{schema}".scheduled').fetchone() == (1,)
    e2e.send("record", "due-control", countdown=11)
    assert e2e.wait_events("due-control", ["run"], timeout=30) == ["run"]
    time.sleep(1)
    assert e2e.events("expired-while-scheduled") == []
    row = db.execute(f'SELECT count(*) FROM "{schema}".messages WHERE task_id = %s', (doomed.id,))
    assert row.fetchone() == (0,)  # discarded and acked, as Celery does
