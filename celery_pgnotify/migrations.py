"""The schema in the database: created, checked and migrated.

The schema is declared in ``schema/current.sql``; each change since the
first release is a numbered migration beside it (``schema/NNNN_*.sql``), never
edited once released. A schema that does not exist yet is created from the
declaration; one at an older version gets the migrations it lacks, in order.
``tests/test_schema.py`` checks that both roads end in the same schema.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from celery_pgnotify.connect import connect
from celery_pgnotify.errors import SchemaError
from celery_pgnotify.statements import SCHEMA_NAME

logger = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).with_name("schema")

_MIGRATION_FILE = re.compile(r"^(\d{4})_\w+\.sql$")


def _load_migrations() -> list[tuple[int, str]]:
    found = []
    for path in SCHEMA_DIR.iterdir():
        match = _MIGRATION_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"schema migrations are not numbered 1 to n: {versions}")
    return found


#: (version, DDL) of every migration, in order
MIGRATIONS: list[tuple[int, str]] = _load_migrations()
LATEST_VERSION = MIGRATIONS[-1][0]
#: the declared schema at :data:`LATEST_VERSION`
CURRENT = (SCHEMA_DIR / "current.sql").read_text(encoding="utf-8")


def render(ddl: str, schema: str) -> str:
    """``ddl`` for ``schema``: ``{s}`` is its quoted name, ``{schema}`` the name."""
    if not SCHEMA_NAME.match(schema):
        raise SchemaError(f"schema name {schema!r} is not a plain SQL identifier")
    return ddl.replace("{s}", f'"{schema}"').replace("{schema}", schema)


def schema_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The schema's applied version, 0 when it does not exist yet."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (sql.Identifier(schema, "schema_version").as_string(conn),),
    ).fetchone()
    if not row or not row[0]:
        return 0
    q = sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(
        sql.Identifier(schema)
    )
    found = conn.execute(q).fetchone()
    return int(found[0]) if found else 0


#: (conninfo, schema) pairs this process already checked or migrated.
_ready_schemas: set[tuple[str, str]] = set()


def connect_current(conninfo: str, schema: str, auto_migrate: bool) -> psycopg.Connection[Any]:
    """A new connection whose ``schema`` is current (created or migrated with
    ``auto_migrate``, else checked); closed again if it is not."""
    conn = connect(conninfo)
    try:
        ensure_schema(conn, conninfo, schema, auto_migrate)
    except BaseException:
        conn.close()
        raise
    return conn


def ensure_schema(
    conn: psycopg.Connection[Any], conninfo: str, schema: str, auto_migrate: bool
) -> None:
    """Migrate ``schema`` (or, without ``auto_migrate``, check it is current),
    once per process and database."""
    key = (conninfo, schema)
    if key in _ready_schemas:
        return
    # Checked first: a current schema needs no DDL rights (a runtime role
    # with rights on the schema's tables only works with auto_migrate on).
    current = schema_version(conn, schema)
    if current < LATEST_VERSION and auto_migrate:
        migrate(conn, schema)
    elif current != LATEST_VERSION:
        if current < LATEST_VERSION:
            raise SchemaError(
                f"schema {schema!r} is at version {current}, this celery-pgnotify needs "
                f"{LATEST_VERSION}: run 'celery-pg migrate' (auto_migrate is off)"
            )
        raise SchemaError(
            f"schema {schema!r} is at version {current}, newer than this "
            f"celery-pgnotify knows ({LATEST_VERSION}); upgrade the package"
        )
    _ready_schemas.add(key)


def migrate(conn: psycopg.Connection[Any], schema: str, replay: bool = False) -> list[int]:
    """Bring ``schema`` to :data:`LATEST_VERSION`; returns the versions applied.

    A new schema is created from the declaration in one step (``replay``:
    through every migration in turn, as an installation that grew release
    by release did). Idempotent and safe to run from many processes at
    once: the work happens in one transaction under a transaction-level
    advisory lock.
    """
    render("", schema)  # checks the name
    name = sql.Identifier(schema)
    applied: list[int] = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            ("celery_pgnotify migrate " + schema,),
        )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(name)
        )
        current = schema_version(conn, schema)
        if current > LATEST_VERSION:
            raise SchemaError(
                f"schema {schema!r} is at version {current}, newer than this "
                f"celery-pgnotify knows ({LATEST_VERSION}); upgrade the package"
            )
        steps = [(v, ddl) for v, ddl in MIGRATIONS if v > current]
        if current == 0 and not replay:
            steps = [(LATEST_VERSION, CURRENT)]
        record = sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(name)
        for version, ddl in steps:
            logger.info("Bringing schema %s to version %s", schema, version)
            conn.execute(render(ddl, schema).encode())
            conn.execute(record, (version,))
            applied.append(version)
    return applied
