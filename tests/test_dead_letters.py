"""Bad input is dead-lettered with its reason; the worker goes on serving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
import pytest
from kombu import Connection, Producer

from celery_pgnotify.errors import MessageTooLarge
from tests.workers import E2E, ROOT

pytestmark = pytest.mark.e2e

SMALL = 64 * 1024


def _headers(**extra: Any) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "tests.e2e_app.record", "id": task_id, "root_id": task_id}
    headers.update(extra)
    return headers


def _raw(e2e: E2E, body: Any, content_type: str = "application/json", **headers: Any) -> None:
    with Connection(e2e.app.conf.broker_url, transport_options=e2e.options) as conn:
        Producer(conn.default_channel).publish(
            body,
            routing_key="celery",
            content_type=content_type,
            content_encoding="utf-8",
            headers=_headers(**headers),
            serializer=None,
        )


def _dead(e2e: E2E, db: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    rows = db.execute(
        f'SELECT queue, reason FROM "{e2e.options["schema"]}".dead_letters ORDER BY id'
    ).fetchall()
    return [(q, r) for q, r in rows]


def _still_serving(e2e: E2E, tag: str) -> None:
    e2e.send("record", tag)
    assert e2e.wait_events(tag, ["run"]) == ["run"], f"the worker stopped serving after {tag}"


def test_each_bad_input_is_dead_lettered_and_the_worker_goes_on(
    e2e: E2E, db: psycopg.Connection[Any]
) -> None:
    e2e.env["PGNOTIFY_OPTIONS"] = json.dumps({**e2e.options, "max_message_size": SMALL})
    worker = e2e.pg_worker()
    schema = e2e.options["schema"]
    cases = [
        ("malformed body", lambda: _raw(e2e, b"[1, 2"), "malformed body"),
        (
            "not protocol 2",
            lambda: _raw(e2e, json.dumps({"args": [1]}).encode()),
            "not [args, kwargs, embed]",
        ),
        (
            "unknown task",
            lambda: e2e.send("no_such_task"),
            "unregistered task 'tests.e2e_app.no_such_task'",
        ),
        (
            "pickle when only JSON is accepted",
            lambda: e2e.send("record", "pickled", serializer="pickle"),
            "content type 'application/x-python-serialize' is not accepted",
        ),
        (
            "forged header",
            lambda: _raw(e2e, b'[["forged"], {}, {}]', eta="tomorrow at noon"),
            "invalid header 'eta'",
        ),
        (
            "forged header type",
            lambda: _raw(e2e, b'[["forged"], {}, {}]', retries="many"),
            "invalid header 'retries'",
        ),
        (
            "huge body",
            lambda: db.execute(
                f'SELECT "{schema}".send_task(%s, jsonb_build_array(repeat(%s, %s)))',
                ("tests.e2e_app.record", "x", 2 * SMALL),
            ),
            "exceeds max_message_size",
        ),
        (
            "not a kombu message at all",
            lambda: db.execute(
                f'INSERT INTO "{schema}".messages (queue, payload) VALUES (%s, %s)',
                ("celery", "this is not JSON"),
            ),
            "malformed message",
        ),
    ]
    for i, (what, send, reason) in enumerate(cases):
        send()
        _still_serving(e2e, f"after-{i}")
        dead = _dead(e2e, db)
        assert len(dead) == i + 1, (what, dead)
        assert dead[-1][0] == "celery" and reason in dead[-1][1], (what, dead[-1])
        worker.wait_for(reason, timeout=10)  # the log says why, too
    assert e2e.events("pickled") == []  # never ran


def test_publishing_too_large_a_message_raises(e2e: E2E) -> None:
    e2e.app.conf.broker_transport_options = {**e2e.options, "max_message_size": SMALL}
    with pytest.raises(MessageTooLarge, match="max_message_size"):
        e2e.send("record", "x" * (2 * SMALL))


def test_stock_worker_rejects_unknown_tasks_into_dead_letters(
    e2e: E2E, db: psycopg.Connection[Any]
) -> None:
    e2e.worker()
    e2e.send("no_such_task")
    _still_serving(e2e, "stock")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _dead(e2e, db):
        time.sleep(0.1)
    (dead,) = _dead(e2e, db)
    assert dead[1] == "unregistered task 'tests.e2e_app.no_such_task'", dead


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_pgnotify.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_operations_cli(e2e: E2E, db: psycopg.Connection[Any], broker_url: str) -> None:
    schema = e2e.options["schema"]
    where = ["--url", broker_url, "--schema", schema]
    for i in range(3):
        e2e.send("record", f"waiting-{i}")
    later_sent = time.monotonic()
    e2e.send("record", "later", countdown=60)  # waits in the database
    e2e.send("no_such_task")
    worker = e2e.pg_worker("-Q", "other")  # consumes another queue: celery stays ready
    worker.wait_for("ready")

    status = json.loads(_cli("status", *where, "--json").stdout)
    celery = next(q for q in status["queues"] if q["queue"] == "celery")
    assert celery["ready"] == 4 and celery["leased"] == 0 and celery["oldest_ready_s"] >= 0
    # Due 60 s after it was sent, less the time gone since (a loaded machine
    # may take seconds to start the worker).
    due_in = 60 - (time.monotonic() - later_sent)
    assert celery["scheduled"] == 1 and due_in - 1 <= celery["next_due_s"] <= 60, celery
    assert any("other" in c["queues"] for c in status["consumers"]), status
    table = _cli("status", *where).stdout
    assert "celery" in table and "ready" in table and "hostname" in table

    # A worker on celery: runs what it can, holds the short countdown, dead-letters the unknown.
    e2e.pg_worker(name="w2")
    # Sent once it runs (its countdown must not pass before a worker holds it).
    e2e.send("record", "soon", countdown=9.5)  # under broker_eta_threshold: a worker holds it
    for i in range(3):
        assert e2e.wait_events(f"waiting-{i}", ["run"]) == ["run"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        celery = next(
            q
            for q in json.loads(_cli("status", *where, "--json").stdout)["queues"]
            if q["queue"] == "celery"
        )
        if celery["dead_letters"] == 1 and celery["delayed"] == 1:
            break
        time.sleep(0.2)
    assert celery["dead_letters"] == 1 and celery["delayed"] == 1, celery

    listed = json.loads(_cli("dead-letters", "list", *where, "--json").stdout)
    assert [(d["task"], d["queue"]) for d in listed] == [("tests.e2e_app.no_such_task", "celery")]
    assert "unregistered task" in _cli("dead-letters", "list", *where).stdout
    assert _cli("dead-letters", "retry", *where).returncode != 0  # says what to name
    retried = _cli("dead-letters", "retry", *where, str(listed[0]["id"]))
    assert "1 message(s) back on 'celery'" in retried.stdout, retried
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not json.loads(
        _cli("dead-letters", "list", *where, "--json").stdout
    ):
        time.sleep(0.2)
    (again,) = json.loads(_cli("dead-letters", "list", *where, "--json").stdout)
    dropped = _cli("dead-letters", "drop", *where, "--queue", "celery")
    assert "1 dead letter(s) deleted" in dropped.stdout
    assert again["id"] != listed[0]["id"]

    e2e.send("record", "to-purge", queue="purged")
    purged = _cli("purge", "purged", *where, "--yes")
    assert "1 message(s) deleted from 'purged'" in purged.stdout, purged


def test_check_exit_codes(e2e: E2E, broker_url: str) -> None:
    e2e.send("record", "creates-the-schema")
    ok = _cli("check", "--url", broker_url, "--schema", e2e.options["schema"], "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    missing = _cli("check", "--url", broker_url, "--schema", "no_such_schema")
    assert missing.returncode == 1 and "celery-pg migrate" in missing.stdout
    down = _cli("check", "--url", "pgnotify://nobody@127.0.0.1:1/none")
    assert down.returncode == 1 and "cannot connect" in down.stdout


def test_a_retried_dead_letter_keeps_its_priority(
    e2e: E2E, db: psycopg.Connection[Any], broker_url: str
) -> None:
    schema = e2e.options["schema"]
    e2e.send("no_such_task", priority=7)
    worker = e2e.pg_worker()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _dead(e2e, db):
        time.sleep(0.1)
    worker.stop()
    assert db.execute(f'SELECT rank FROM "{schema}".dead_letters').fetchall() == [(7,)]
    retried = _cli("dead-letters", "retry", "--url", broker_url, "--schema", schema, "--all")
    assert "1 message(s) back on 'celery'" in retried.stdout, retried
    assert db.execute(f'SELECT rank FROM "{schema}".messages').fetchall() == [(7,)]
