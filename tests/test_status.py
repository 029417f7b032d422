"""``celery-pg status`` and the dashboard's sampler: what they read, what they log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from typing import Any

import psycopg
from kombu import Connection, Producer, Queue

from celery_pgnotify import metrics, ops
from celery_pgnotify.migrations import migrate
from celery_pgnotify.statements import statements
from tests.tablestats import table_reads
from tests.workers import ROOT


def test_a_queue_over_the_cap_is_estimated_and_a_small_one_counted(
    connection: Connection, db: psycopg.Connection[Any], schema: str, broker_url: str
) -> None:
    small, big = Queue(f"s{uuid.uuid4().hex[:8]}"), Queue(f"b{uuid.uuid4().hex[:8]}")
    producer = Producer(connection.default_channel)
    for name in (small.name, big.name):
        producer.publish({"n": 1}, routing_key=name, declare=[small, big])
    producer.publish({"n": 2}, routing_key=small.name)
    # The backlog over the cap is stored as the transport stores a publish
    # (status reads counts, never payloads).
    over = metrics.CAP + 500
    db.execute(
        f'INSERT INTO "{schema}".messages (queue, rank, payload)'
        " SELECT %s, 0, '{}' FROM generate_series(2, %s)",
        (big.name, over),
    )
    got = {q["queue"]: q for q in ops.status(db, statements(schema))["queues"]}
    assert (got[small.name]["ready"], got[small.name]["estimated"]) == (2, False)
    assert got[big.name]["estimated"] is True
    # Every page of a table this small is sampled: the estimate is close.
    assert 0.9 * over <= got[big.name]["ready"] <= 1.1 * over, got[big.name]

    def cli(*extra: str) -> str:
        argv = [sys.executable, "-m", "celery_pgnotify.cli", "status", *extra]
        argv += ["--url", broker_url, "--schema", schema]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    (line,) = [row for row in cli().splitlines() if row.startswith(big.name)]
    assert f"~{got[big.name]['ready']}" in line
    (listed,) = [q for q in json.loads(cli("--json"))["queues"] if q["queue"] == big.name]
    assert listed["estimated"] is True and isinstance(listed["ready"], int)


def test_delayed_reads_at_most_the_cap_of_leased_payloads_and_scales_beyond(
    db: psycopg.Connection[Any], schema: str
) -> None:
    """``delayed`` (leased messages a worker holds until their ETA) comes from
    the payloads: it read every leased message's, however many workers held."""
    migrate(db, schema)
    held, few = f"h{uuid.uuid4().hex[:8]}", f"f{uuid.uuid4().hex[:8]}"
    due = '{"headers": {"eta": "2999-01-01T00:00:00+00:00"}}'
    past = '{"headers": {"eta": "2001-01-01T00:00:00+00:00"}}'
    # A quarter of the held queue is overdue (its worker runs it now).
    leased = 5 * metrics.CAP
    db.execute(
        f'INSERT INTO "{schema}".messages (queue, rank, payload, consumer_id, leased_at)'
        " SELECT %s, 0, CASE WHEN g %% 4 = 0 THEN %s ELSE %s END, 1, now()"
        " FROM generate_series(1, %s) AS g",
        (held, past, due, leased),
    )
    db.execute(
        f'INSERT INTO "{schema}".messages (queue, rank, payload, consumer_id, leased_at)'
        " VALUES (%s, 0, %s, 1, now()), (%s, 0, %s, 1, now())",
        (few, due, few, past),
    )

    def so_far() -> int:  # rows this session read of messages, not yet reported
        reads = table_reads(db, schema, "messages", this_session=True)
        return reads["seq_tup_read"] + reads["idx_tup_fetch"]

    def rows_read(read: Any) -> tuple[Any, int]:
        with db.transaction():
            before = so_far()
            out = read(db, statements(schema))
            return out, so_far() - before

    _, counting = rows_read(metrics.queue_figures)  # the counts, shared with the metrics
    status, read = rows_read(ops.status)
    assert read - counting <= metrics.CAP, f"delayed read {read - counting} of {leased + 2}"
    got = {q["queue"]: q for q in status["queues"]}
    want = leased * 3 // 4
    assert got[held]["estimated"] is True
    assert 0.9 * want <= got[held]["delayed"] <= 1.1 * want, got[held]
    assert got[few]["leased"] == 2 and got[few]["delayed"] in (0, 1, 2)


def test_the_dashboard_says_once_that_it_cannot_read_and_once_that_it_reads_again(
    pg_dsn: str, schema: str, caplog: Any
) -> None:
    from celery_pgnotify.dashboard import Dashboard

    board = Dashboard(pg_dsn, schema, interval=3600)  # sampled by hand below
    try:
        with caplog.at_level(logging.DEBUG, logger="celery_pgnotify.dashboard"):
            for _ in range(3):  # no schema yet: every read fails the same way
                board.sample()
            failed = [r for r in caplog.records if "failed" in r.getMessage()]
            assert [r.levelno for r in failed] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                migrate(conn, schema)
            board.sample()
            board.sample()
        again = [r for r in caplog.records if r.getMessage().endswith("again")]
        assert len(again) == 1 and again[0].levelno == logging.WARNING
        assert "queues" in board.state()
    finally:
        board.stop()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
