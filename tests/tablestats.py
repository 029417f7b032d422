"""What PostgreSQL's own statistics say a session did to a table: counts
that the machine's noise does not move."""

from __future__ import annotations

from typing import Any

import psycopg

_COLUMNS = "seq_scan, seq_tup_read, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0)"


def table_reads(
    db: psycopg.Connection[Any], schema: str, table: str, this_session: bool = False
) -> dict[str, int]:
    """``seq_scan``, ``seq_tup_read``, ``idx_scan`` and ``idx_tup_fetch`` of
    ``table`` as reported so far; with ``this_session``, what ``db``'s own
    session did that it has not reported yet (its current transaction and
    before)."""
    view = "pg_stat_xact_user_tables" if this_session else "pg_stat_user_tables"
    if not this_session:
        db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        f"SELECT {_COLUMNS} FROM {view} WHERE schemaname = %s AND relname = %s",
        (schema, table),
    ).fetchone()
    assert row is not None, f"no statistics of {schema}.{table}"
    names = ("seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch")
    return dict(zip(names, map(int, row), strict=True))


def report(conn: psycopg.Connection[Any]) -> None:
    """Make ``conn``'s session report its statistics now (as it goes idle)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")
