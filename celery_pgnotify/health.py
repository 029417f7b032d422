"""Which of the README's guarantees hold on this server (``celery-pg check``).

Each check is one :class:`Finding`: ``ok``, ``warn`` (a guarantee is weaker
than the README says, or will be soon) or ``fail`` (something does not work),
with the reason and what to do. They read the server as the transport's own
sessions see it: opened from the same URL, with the same options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from celery_pgnotify import migrations
from celery_pgnotify.connect import SERVER_KEEPALIVES, close_quietly, connect, session_options
from celery_pgnotify.statements import Statements, statements

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    """One line of ``celery-pg check``."""

    name: str
    level: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Limits:
    """Where a check starts to warn."""

    #: seconds a transaction may hold back vacuum's horizon
    transaction_age: float = 300.0
    #: fraction of the notification queue in use
    notify_queue: float = 0.05
    #: seconds a consumer's clock may be off the server's
    clock_offset: float = 1.0
    #: seconds the server may take to notice a vanished client host
    dead_client: float = 120.0


def run(conninfo: str, schema: str, limits: Limits = Limits()) -> list[Finding]:
    """Every check, in the order ``celery-pg check`` prints them."""
    try:
        conn = connect(conninfo)
    except psycopg.Error as exc:
        return [Finding("database", FAIL, f"cannot connect to PostgreSQL: {exc}".strip())]
    with conn:
        version = conn.execute("SHOW server_version").fetchone()
        found = [Finding("database", OK, f"PostgreSQL {version[0] if version else '?'}")]
        found.append(_schema(conn, schema))
        stmts, current = statements(schema), found[-1].level == OK
        checks: list[Callable[[], Finding]] = [
            lambda: _durability(conn, stmts),
            lambda: _pooler(conninfo, stmts),
            lambda: _autovacuum(conn, stmts),
            lambda: _horizon(conn, stmts, limits),
            lambda: _notify_queue(conn, stmts, limits),
            lambda: _keepalives(conninfo, stmts, limits),
            lambda: _clocks(conn, stmts if current else None, limits),
        ]
        for check in checks:
            found.append(check())
    return found


def _schema(conn: psycopg.Connection[Any], schema: str) -> Finding:
    version = migrations.schema_version(conn, schema)
    if version == 0:
        return Finding("schema", FAIL, f"schema {schema!r} does not exist: run 'celery-pg migrate'")
    if version < migrations.LATEST_VERSION:
        return Finding(
            "schema",
            FAIL,
            f"schema {schema!r} is at version {version}, this celery-pgnotify needs "
            f"{migrations.LATEST_VERSION}: run 'celery-pg migrate'",
        )
    if version > migrations.LATEST_VERSION:
        return Finding(
            "schema",
            FAIL,
            f"schema {schema!r} is at version {version}, newer than this "
            f"celery-pgnotify ({migrations.LATEST_VERSION}): upgrade the package",
        )
    conn.execute(statements(schema).has_queue, {"name": ""}).fetchone()  # readable
    return Finding("schema", OK, f"schema {schema!r} at version {version}")


def _settings(conn: psycopg.Connection[Any], stmts: Statements, *names: str) -> dict[str, str]:
    rows = conn.execute(stmts.check_settings, {"names": list(names)}).fetchall()
    return {str(name): str(value) for name, value in rows}


def _durability(conn: psycopg.Connection[Any], stmts: Statements) -> Finding:
    """What a COMMIT of this URL's sessions waits for."""
    s = _settings(
        conn, stmts, "fsync", "synchronous_commit", "full_page_writes", "wal_writer_delay"
    )
    if s.get("fsync") == "off":
        return Finding(
            "durability",
            FAIL,
            "fsync is off: a server crash can lose or corrupt anything, messages included",
        )
    if s.get("full_page_writes") == "off":
        return Finding(
            "durability",
            WARN,
            "full_page_writes is off: a crash during a write can corrupt a page of the queue",
        )
    if s.get("synchronous_commit") == "off":
        window = 3 * int(s.get("wal_writer_delay", "200"))
        return Finding(
            "durability",
            WARN,
            "synchronous_commit is off for this URL's sessions: publishes still wait for "
            "the WAL flush (durable_publish asks for it), but stored results, beat's "
            f"firings and revokes do not; a server crash loses the last ~{window} ms of them",
        )
    return Finding(
        "durability",
        OK,
        f"synchronous_commit is {s.get('synchronous_commit')}: every publish and result "
        "is on disk when it returns",
    )


def _backend_pid(conn: psycopg.Connection[Any], stmts: Statements) -> int:
    row = conn.execute(stmts.backend_pid, prepare=False).fetchone()
    return int(row[0]) if row else 0


def _pooler(conninfo: str, stmts: Statements) -> Finding:
    """A pooler in transaction (or statement) mode hands a client's next
    transaction to whichever server session is free: a LISTEN stays behind
    on a session the client no longer has. Two clients that interleave
    transactions see it: directly, each keeps its own server process."""
    first = second = None
    try:
        first, second = connect(conninfo), connect(conninfo)
        mine, theirs = {_backend_pid(first, stmts)}, set()
        for _ in range(3):
            with second.transaction():
                theirs.add(_backend_pid(second, stmts))
                mine.add(_backend_pid(first, stmts))
            mine.add(_backend_pid(first, stmts))
        if len(mine) > 1 or mine & theirs:
            return Finding(
                "pooler",
                FAIL,
                "a pooler in transaction or statement mode (PgBouncer's pool_mode = "
                "transaction, for one) stands in front of the server: one session's "
                f"statements ran in {len(mine)} server processes. LISTEN does not work "
                "through it, so no worker is woken and results wait for their re-read; "
                "point the URL at the server, or at a pool in session mode",
            )
        row = first.execute(stmts.server_port).fetchone()
        port = row[0] if row else None
        asked = conninfo_to_dict(conninfo).get("port")
        if port is not None and asked is not None and str(asked) != str(port):
            return Finding(
                "pooler",
                OK,
                f"sessions keep their server process (through something on port {asked} "
                f"to the server's {port}: a pool in session mode works)",
            )
        return Finding("pooler", OK, "each session keeps its server process: LISTEN works")
    except psycopg.Error as exc:
        return Finding("pooler", WARN, f"could not tell: {exc}".strip())
    finally:
        close_quietly(first)
        close_quietly(second)


_TABLES = ("messages", "scheduled", "results", "dead_letters", "consumers")


def _autovacuum(conn: psycopg.Connection[Any], stmts: Statements) -> Finding:
    s = _settings(conn, stmts, "autovacuum", "track_counts")
    tables = [
        str(row[0])
        for row in conn.execute(
            stmts.tables_without_autovacuum, {"schema": stmts.schema, "tables": list(_TABLES)}
        ).fetchall()
    ]
    problems = []
    if s.get("autovacuum") != "on" or s.get("track_counts") != "on":
        problems.append("autovacuum is off on the server (or track_counts is)")
    if tables:
        problems.append(f"autovacuum_enabled = false on {', '.join(tables)}")
    if problems:
        return Finding(
            "autovacuum",
            WARN,
            "; ".join(problems) + ": the rows of acked messages are never reclaimed, and "
            "claims slow down as they pile up. Turn it on (ALTER TABLE ... RESET "
            "(autovacuum_enabled) for a table), or VACUUM the schema's tables often",
        )
    return Finding("autovacuum", OK, "on, for the server and the schema's tables")


def _horizon(conn: psycopg.Connection[Any], stmts: Statements, limits: Limits) -> Finding:
    """The oldest holder of vacuum's horizon in this database: a client
    session's snapshot or transaction, a prepared transaction."""
    row = conn.execute(stmts.oldest_transaction).fetchone()
    prepared = conn.execute(stmts.oldest_prepared).fetchone()
    if prepared is not None and prepared[1] > limits.transaction_age:
        return Finding(
            "horizon",
            WARN,
            f"prepared transaction {prepared[0]!r} is {prepared[1]:.0f} s old and holds back "
            "vacuum: COMMIT PREPARED or ROLLBACK PREPARED it",
        )
    if row is not None and row[4] > limits.transaction_age:
        pid, user, app, state, age, query = row
        return Finding(
            "horizon",
            WARN,
            f"a transaction {age:.0f} s old holds back vacuum (pid {pid}, {user}, "
            f"{app or 'no application_name'}, {state}: {query!r}): the queue's dead rows "
            "pile up and claims slow down while it lasts; end it, or set "
            "idle_in_transaction_session_timeout",
        )
    oldest = f"{row[4]:.0f} s" if row is not None else "none"
    return Finding("horizon", OK, f"oldest transaction holding vacuum back: {oldest}")


def _notify_queue(conn: psycopg.Connection[Any], stmts: Statements, limits: Limits) -> Finding:
    row = conn.execute(stmts.notify_queue_usage).fetchone()
    usage = float(row[0]) if row else 0.0
    if usage >= limits.notify_queue:
        return Finding(
            "notify_queue",
            FAIL if usage >= 0.5 else WARN,
            f"the notification queue is {usage:.1%} full: a session that LISTENs sits in a "
            "long transaction (or reads no more); when the queue is full, every publish and "
            "stored result fails at COMMIT. Find it in pg_stat_activity and end it",
        )
    return Finding("notify_queue", OK, f"{usage:.4%} in use")


def _keepalives(conninfo: str, stmts: Statements, limits: Limits) -> Finding:
    """How soon the server notices a consumer whose host vanished (its
    session lock, and so its leases, are held until then)."""
    if conninfo_to_dict(conninfo).get("keepalives") == "0":
        return Finding(
            "keepalives",
            WARN,
            "the URL turns TCP keepalives off (keepalives=0): a worker does not notice a "
            "server that vanished until the kernel gives up, after about 15 minutes",
        )
    options = session_options(conninfo, SERVER_KEEPALIVES)
    conn = None
    try:
        conn = connect(make_conninfo(conninfo, options=options))
        row = conn.execute(stmts.keepalives).fetchone()
    except psycopg.Error as exc:
        return Finding("keepalives", WARN, f"could not tell: {exc}".strip())
    finally:
        close_quietly(conn)
    assert row is not None
    unix, idle, interval, count = row
    if unix:
        return Finding("keepalives", OK, "a Unix socket: a vanished client is noticed at once")
    # 0: the system's default (Linux: 7200 s, 75 s, 9 probes)
    seconds = (idle or 7200) + (interval or 75) * (count or 9)
    if seconds > limits.dead_client:
        return Finding(
            "keepalives",
            WARN,
            f"the server notices a vanished worker host after {seconds} s "
            f"(tcp_keepalives_idle {idle}, interval {interval}, count {count}); its leased "
            "messages wait that long to be redelivered. celery-pgnotify's sessions ask for "
            "10/5/3 unless the URL's options say otherwise",
        )
    return Finding(
        "keepalives", OK, f"the server notices a vanished worker host within {seconds} s"
    )


def _clocks(conn: psycopg.Connection[Any], stmts: Statements | None, limits: Limits) -> Finding:
    if stmts is None:
        return Finding("clocks", WARN, "not checked: the schema is not current")
    rows = conn.execute(stmts.consumer_clocks).fetchall()
    if not rows:
        return Finding("clocks", OK, "no consumer online to compare")
    unknown = sum(1 for r in rows if r[2] is None)
    host, pid, offset = rows[0]
    if offset is not None and abs(offset) > limits.clock_offset:
        way = "behind" if offset > 0 else "ahead of"
        return Finding(
            "clocks",
            WARN,
            f"{host} (pid {pid}) runs {abs(offset):.1f} s {way} the server: a worker runs the "
            "ETAs and countdowns it holds by its own clock, and beat fires by its own; "
            "synchronize the hosts' clocks (NTP)",
        )
    worst = f"within {abs(offset):.3f} s" if offset is not None else "not reported"
    note = f"; {unknown} consumer(s) do not report (older celery-pgnotify)" if unknown else ""
    return Finding("clocks", OK, f"{len(rows)} consumer(s) {worst} of the server{note}")
