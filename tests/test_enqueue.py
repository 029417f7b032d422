"""Transactional enqueue: through a psycopg transaction, and from SQL (a trigger)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from celery_pgnotify import enqueue_in
from tests.workers import E2E

pytestmark = pytest.mark.e2e


@pytest.fixture
def orders(e2e: E2E, db: psycopg.Connection[Any]) -> str:
    table = f"{e2e.options['schema']}_orders"
    db.execute(f'CREATE TABLE "{table}" (key text PRIMARY KEY)')
    return table


def test_psycopg_transaction_both_ways(e2e: E2E, orders: str) -> None:
    e2e.pg_worker()
    with psycopg.connect(e2e.dsn) as conn:
        # Rolled back: the row and the task vanish together.
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute(f'INSERT INTO "{orders}" VALUES (%s)', ("a",))
            with enqueue_in(conn):
                e2e.send("check_row", "rolled-back", orders, "a")
            raise RuntimeError("the application changes its mind")
        # Committed: the task runs once, after COMMIT, and sees the row.
        with conn.transaction():
            conn.execute(f'INSERT INTO "{orders}" VALUES (%s)', ("b",))
            with enqueue_in(conn):
                e2e.send("check_row", "committed", orders, "b")
            time.sleep(1)  # a worker that got the task early would miss the row
    assert e2e.wait_events("committed", ["found"]) == ["found"]
    time.sleep(2)
    assert e2e.events("committed") == ["found"]
    assert e2e.events("rolled-back") == []


def test_outside_the_block_publishing_is_unaffected(e2e: E2E, orders: str) -> None:
    e2e.pg_worker()
    with psycopg.connect(e2e.dsn) as conn, conn.transaction():
        with enqueue_in(conn):
            pass
        e2e.send("record", "independent")  # not in the block: commits on its own
        assert e2e.wait_events("independent", ["run"]) == ["run"]
    with pytest.raises(TypeError, match="psycopg 3 Connection"), enqueue_in(object()):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("kind", ["celery", "celery-pg"])
def test_sql_function_from_a_trigger(
    e2e: E2E, orders: str, db: psycopg.Connection[Any], kind: str
) -> None:
    e2e.pg_worker() if kind == "celery-pg" else e2e.worker()
    schema = e2e.options["schema"]
    db.execute(
        f"""
        CREATE FUNCTION "{orders}_enqueue"() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM "{schema}".send_task(
                'tests.e2e_app.check_row',
                jsonb_build_array('trigger-' || NEW.key, '{orders}', NEW.key));
            RETURN NEW;
        END $$;
        CREATE TRIGGER enqueue AFTER INSERT ON "{orders}"
            FOR EACH ROW EXECUTE FUNCTION "{orders}_enqueue"();
        """
    )
    with psycopg.connect(e2e.dsn) as conn:
        with conn.transaction(force_rollback=True):
            conn.execute(f'INSERT INTO "{orders}" VALUES (%s)', ("r",))
        with conn.transaction():
            conn.execute(f'INSERT INTO "{orders}" VALUES (%s)', ("c",))
    assert e2e.wait_events("trigger-c", ["found"]) == ["found"]
    time.sleep(2)
    assert e2e.events("trigger-c") == ["found"]
    assert e2e.events("trigger-r") == []


def test_sql_function_options_and_errors(e2e: E2E, db: psycopg.Connection[Any]) -> None:
    schema = e2e.options["schema"]
    e2e.pg_worker()
    sent = time.time()
    (task_id,) = db.execute(
        f'SELECT "{schema}".send_task(%s, %s::jsonb, %s::jsonb, countdown => 1.5, priority => 7)',
        ("tests.e2e_app.record", '["from-sql"]', "{}"),
    ).fetchone()
    assert e2e.wait_events("from-sql", ["run"]) == ["run"]
    assert e2e.times("from-sql")[0] - sent >= 1.4  # the countdown held
    assert len(str(task_id)) == 36
    with pytest.raises(psycopg.errors.RaiseException, match="args must be a JSON array"):
        db.execute(f"SELECT \"{schema}\".send_task('t', '{{}}'::jsonb)")
    with pytest.raises(psycopg.errors.RaiseException, match="priority must be 0 to 9"):
        db.execute(f"SELECT \"{schema}\".send_task('t', priority => 12)")
