"""The declared schema and the migrations end in the same database schema."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from celery_pgnotify import migrations
from celery_pgnotify.statements import statements

CATALOG = {
    "relations": (
        "SELECT c.relname, c.relkind::text, coalesce(c.reloptions::text, '')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %(schema)s ORDER BY 1"
    ),
    "columns": (
        "SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),"
        " a.attnotnull, coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')"
        " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2"
    ),
    "indexes": (
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(schema)s ORDER BY 1"
    ),
    "constraints": (
        "SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)"
        " FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %(schema)s ORDER BY 1, 2"
    ),
    "functions": (
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %(schema)s ORDER BY 1, 2"
    ),
    "triggers": (
        "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)"
        " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %(schema)s AND NOT t.tgisinternal ORDER BY 1, 2"
    ),
}


def snapshot(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the catalog says of ``schema``, its own name written as ``S``."""

    def neutral(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(f'"{schema}"', "S").replace(schema, "S")
        return value

    return {
        kind: [
            tuple(neutral(v) for v in row)
            for row in conn.execute(query, {"schema": schema}).fetchall()
        ]
        for kind, query in CATALOG.items()
    }


@pytest.fixture
def two_schemas(db: psycopg.Connection[Any]) -> Any:
    names = [f"m_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    yield names
    for name in names:
        db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_the_declared_schema_is_what_the_migrations_build(
    db: psycopg.Connection[Any], two_schemas: list[str]
) -> None:
    declared, replayed = two_schemas
    assert migrations.migrate(db, declared) == [migrations.LATEST_VERSION]
    versions = list(range(1, migrations.LATEST_VERSION + 1))
    assert migrations.migrate(db, replayed, replay=True) == versions
    want, got = snapshot(db, declared), snapshot(db, replayed)
    assert want["columns"] and want["functions"]  # the snapshot sees the schema
    for kind in CATALOG:
        assert got[kind] == want[kind], kind
    for schema in two_schemas:
        assert migrations.schema_version(db, schema) == migrations.LATEST_VERSION
        assert migrations.migrate(db, schema) == []  # nothing left to do


def test_the_comparison_sees_a_difference(
    db: psycopg.Connection[Any], two_schemas: list[str]
) -> None:
    first, second = two_schemas
    migrations.migrate(db, first)
    migrations.migrate(db, second)
    db.execute(f'ALTER TABLE "{second}".messages ALTER COLUMN rank SET DEFAULT 1')
    db.execute(f'CREATE INDEX extra ON "{second}".queues (created_at)')
    a, b = snapshot(db, first), snapshot(db, second)
    assert a["columns"] != b["columns"] and a["indexes"] != b["indexes"]
    assert a["functions"] == b["functions"]


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [version for version, _ in migrations.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert f"at version {migrations.LATEST_VERSION}:" in migrations.CURRENT


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Any name the transport accepts: no NUL, no lone surrogate (no UTF-8 for it).
@given(
    queue=st.text(
        st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
        min_size=1,
        max_size=80,
    )
)
@example(queue="celery")
@example(queue="q'; NOTIFY x; --")
def test_send_task_notifies_the_channel_the_transport_listens_on(
    pg_dsn: str, db: psycopg.Connection[Any], two_schemas: list[str], queue: str
) -> None:
    # send_task() names the queue's NOTIFY channel in PL/pgSQL; the
    # transport derives it in Python (statements.channel) to LISTEN on it.
    schema = two_schemas[0]
    migrations.migrate(db, schema)
    channel = statements(schema).channel(queue)
    got: list[str] = []
    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        listener.add_notify_handler(lambda n: got.append(n.channel))
        listener.execute(f'LISTEN "{channel}"')
        db.execute(
            f'INSERT INTO "{schema}".consumers (hostname, pid, queues)'
            " VALUES ('h', 1, ARRAY[%s]) RETURNING id",
            (queue,),
        )
        try:
            db.execute(f'SELECT "{schema}".send_task(%s, queue => %s)', ("t.add", queue))
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                listener.execute("SELECT pg_sleep(0.01)")  # reads what has arrived
        finally:
            db.execute(f'DELETE FROM "{schema}".consumers')
            db.execute(f'DELETE FROM "{schema}".messages')
    assert got == [channel]
