"""What the observing commands read: ``celery-pg explain`` (one task),
``celery-pg check`` (the server's settings) and the metrics.

All read-only; none is on a message's path.
"""

from __future__ import annotations

from dataclasses import dataclass

# A header of a message read without parsing its JSON, so that no payload can
# make these statements fail: in the 8,000 characters from the headers' key,
# which follows the body (a body's own quotes are escaped: it cannot hold
# that key, or a header, as written here).
_HEADER = (
    "substring(substring({t}.payload FROM position('\"headers\":' IN {t}.payload) FOR 8000)"
    ' FROM \'"{name}":\\s*"([^"]+)"\')'
)

# Whether consumer ``{id}``'s session still holds its session lock (the
# reaper's own test of life, see listener.py), read from pg_locks.
_HOLDS_LOCK = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = %(ns)s AND l.objid::bigint = {id} AND l.objsubid = 2)"
)


@dataclass(frozen=True)
class ObservingStatements:
    """``celery-pg explain``, ``check`` and the metrics."""

    # Everything the tables know of one task, read in one statement (one
    # snapshot: a task moving from ``scheduled`` to ``messages`` meanwhile is
    # seen once). ``messages`` has no index on task_id (every publish would
    # pay for one): this reads the table through, once.
    explain: str = (
        "SELECT now(),"
        " (SELECT coalesce(json_agg(json_build_object("
        "  'id', m.id, 'queue', m.queue, 'priority', m.rank, 'created_at', m.created_at,"
        "  'expires_at', m.expires_at, 'expired', m.expires_at <= now(),"
        "  'redelivered', m.redelivered, 'leased_at', m.leased_at,"
        "  'consumer_id', m.consumer_id, 'hostname', c.hostname, 'pid', c.pid,"
        "  'heartbeat_s', extract(epoch FROM now() - c.heartbeat_at),"
        "  'alive', CASE WHEN c.id IS NOT NULL THEN " + _HOLDS_LOCK.format(id="c.id") + " END,"
        "  'task', " + _HEADER.format(t="m", name="task") + ","
        "  'eta', " + _HEADER.format(t="m", name="eta") + ","
        "  'expires', " + _HEADER.format(t="m", name="expires") + ","
        "  'ahead', CASE WHEN m.consumer_id IS NULL THEN (SELECT count(*) FROM {s}.messages a"
        "   WHERE a.queue = m.queue AND a.consumer_id IS NULL"
        "   AND (a.rank > m.rank OR (a.rank = m.rank AND a.id < m.id))) END,"
        "  'paused', EXISTS (SELECT 1 FROM {s}.paused_queues p WHERE p.name = m.queue),"
        "  'consumers', (SELECT count(*) FROM {s}.consumers k WHERE m.queue = ANY(k.queues))"
        " ) ORDER BY m.id), '[]') FROM {s}.messages m"
        " LEFT JOIN {s}.consumers c ON c.id = m.consumer_id WHERE m.task_id = %(id)s),"
        " (SELECT coalesce(json_agg(json_build_object("
        "  'id', t.id, 'queue', t.queue, 'priority', t.rank, 'created_at', t.created_at,"
        "  'due_at', t.due_at, 'due_in_s', extract(epoch FROM t.due_at - now()),"
        "  'task', " + _HEADER.format(t="t", name="task") + ","
        "  'paused', EXISTS (SELECT 1 FROM {s}.paused_queues p WHERE p.name = t.queue),"
        "  'consumers', (SELECT count(*) FROM {s}.consumers k WHERE t.queue = ANY(k.queues))"
        " ) ORDER BY t.id), '[]') FROM {s}.scheduled t WHERE t.task_id = %(id)s),"
        " (SELECT json_build_object('revoked_at', r.revoked_at, 'until', r.expires_at,"
        "  'live', r.expires_at > now()) FROM {s}.revoked r WHERE r.task_id = %(id)s),"
        # Dead letters have no task_id column (a poison message has no
        # readable id): the id is looked for as Celery writes it in headers.
        " (SELECT coalesce(json_agg(json_build_object("
        "  'id', d.id, 'queue', d.queue, 'reason', d.reason, 'dead_at', d.created_at,"
        "  'task', " + _HEADER.format(t="d", name="task") + ""
        " ) ORDER BY d.id), '[]') FROM {s}.dead_letters d"
        "  WHERE strpos(d.payload, '\"id\": \"' || %(id)s || '\"') > 0"
        "   OR strpos(d.payload, '\"id\":\"' || %(id)s || '\"') > 0),"
        " (SELECT json_build_object('status', r.status, 'stored', octet_length(r.meta) > 0,"
        "  'waited', r.waited, 'date_done', r.date_done, 'worker', r.worker, 'task', r.name,"
        "  'retries', r.retries, 'queue', r.queue,"
        "  'error', substring(r.traceback FROM '([^\\n]+)\\s*$'))"
        "  FROM {s}.results r WHERE r.task_id = %(id)s)"
    )

    # -- celery-pg check (health.py): the server as this URL's sessions see it --
    check_settings: str = "SELECT name, setting FROM pg_settings WHERE name = ANY(%(names)s)"
    backend_pid: str = "SELECT pg_backend_pid()"
    server_port: str = "SELECT inet_server_port()"
    tables_without_autovacuum: str = (
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)"
        " AND 'autovacuum_enabled=false' = ANY(coalesce(c.reloptions, '{}'))"
    )
    # The oldest holders of vacuum's horizon in this database: a client
    # session's snapshot or transaction, a prepared transaction. (Vacuum's own
    # workers are ignored by other vacuums; a standby's feedback has no age
    # in seconds to compare.)
    oldest_transaction: str = (
        "SELECT pid, usename, application_name, state,"
        " extract(epoch FROM now() - coalesce(xact_start, backend_start))::float8,"
        " left(regexp_replace(query, '\\s+', ' ', 'g'), 120)"
        " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        " AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)"
        " AND datname = current_database() AND backend_type = 'client backend'"
        " ORDER BY coalesce(xact_start, backend_start) LIMIT 1"
    )
    oldest_prepared: str = (
        "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts"
        " WHERE database = current_database() ORDER BY prepared LIMIT 1"
    )
    notify_queue_usage: str = "SELECT pg_notification_queue_usage()"
    keepalives: str = (
        "SELECT inet_server_addr() IS NULL, current_setting('tcp_keepalives_idle')::int,"
        " current_setting('tcp_keepalives_interval')::int,"
        " current_setting('tcp_keepalives_count')::int"
    )
    consumer_clocks: str = (
        "SELECT hostname, pid, clock_offset_s FROM {s}.consumers"
        " ORDER BY abs(clock_offset_s) DESC NULLS LAST"
    )

    # -- metrics (metrics.py): bounded reads, whatever the queues hold --
    # For the sessions that read these: JIT compiling a statement the planner
    # thinks costly (a table of a million rows) takes longer than running it.
    no_jit: str = "SET jit = off"
    # Per queue: ready, scheduled and dead-letter counts, each exact up to
    # %(cap)s rows (beyond, metrics.py estimates from a sample), the age of
    # the oldest ready message (the head of each priority: one index probe
    # per priority in use) and whether it is paused. Queue names come from
    # ``queues`` and, for queues never declared, from a skip scan of each
    # table's index (one probe per distinct queue).
    metrics_queues: str = (
        "WITH RECURSIVE"
        " ready(name) AS ((SELECT queue FROM {s}.messages WHERE consumer_id IS NULL"
        "  ORDER BY queue LIMIT 1) UNION ALL SELECT (SELECT m.queue FROM {s}.messages m"
        "  WHERE m.consumer_id IS NULL AND m.queue > ready.name ORDER BY m.queue LIMIT 1)"
        "  FROM ready WHERE ready.name IS NOT NULL),"
        " later(name) AS ((SELECT queue FROM {s}.scheduled ORDER BY queue LIMIT 1)"
        "  UNION ALL SELECT (SELECT t.queue FROM {s}.scheduled t WHERE t.queue > later.name"
        "  ORDER BY t.queue LIMIT 1) FROM later WHERE later.name IS NOT NULL),"
        " dead(name) AS ((SELECT queue FROM {s}.dead_letters ORDER BY queue LIMIT 1)"
        "  UNION ALL SELECT (SELECT d.queue FROM {s}.dead_letters d WHERE d.queue > dead.name"
        "  ORDER BY d.queue LIMIT 1) FROM dead WHERE dead.name IS NOT NULL),"
        " names AS (SELECT name FROM {s}.queues UNION SELECT name FROM {s}.paused_queues"
        "  UNION SELECT name FROM ready UNION SELECT name FROM later"
        "  UNION SELECT name FROM dead)"
        " SELECT n.name,"
        " (SELECT count(*) FROM (SELECT 1 FROM {s}.messages m WHERE m.queue = n.name"
        "  AND m.consumer_id IS NULL LIMIT %(cap)s) AS c),"
        " (SELECT count(*) FROM (SELECT 1 FROM {s}.scheduled t WHERE t.queue = n.name"
        "  LIMIT %(cap)s) AS c),"
        " (SELECT count(*) FROM (SELECT 1 FROM {s}.dead_letters d WHERE d.queue = n.name"
        "  LIMIT %(cap)s) AS c),"
        " (WITH RECURSIVE heads(r, created) AS ((SELECT rank, created_at FROM {s}.messages"
        "   WHERE queue = n.name AND consumer_id IS NULL ORDER BY rank DESC, id LIMIT 1)"
        "  UNION ALL SELECT h.rank, h.created_at FROM heads CROSS JOIN LATERAL"
        "   (SELECT rank, created_at FROM {s}.messages m WHERE m.queue = n.name"
        "   AND m.consumer_id IS NULL AND m.rank < heads.r ORDER BY m.rank DESC, m.id LIMIT 1) h)"
        "  SELECT extract(epoch FROM now() - min(created))::float8 FROM heads),"
        " EXISTS (SELECT 1 FROM {s}.paused_queues p WHERE p.name = n.name)"
        " FROM names n WHERE n.name IS NOT NULL ORDER BY n.name"
    )
    # Leased messages per queue, found through messages_leased, at most %(cap)s.
    metrics_leased: str = (
        "SELECT queue, count(*) FROM (SELECT queue FROM {s}.messages"
        " WHERE consumer_id IS NOT NULL LIMIT %(cap)s) AS l GROUP BY queue"
    )
    # A sample of about %(pct)s percent of a table's pages, for the counts
    # over the cap.
    sample_messages: str = (
        "SELECT queue, count(*) FILTER (WHERE consumer_id IS NULL),"
        " count(*) FILTER (WHERE consumer_id IS NOT NULL)"
        " FROM {s}.messages TABLESAMPLE SYSTEM (%(pct)s) GROUP BY queue"
    )
    sample_scheduled: str = (
        "SELECT queue, count(*), 0 FROM {s}.scheduled TABLESAMPLE SYSTEM (%(pct)s) GROUP BY queue"
    )
    sample_dead_letters: str = (
        "SELECT queue, count(*), 0 FROM {s}.dead_letters TABLESAMPLE SYSTEM (%(pct)s)"
        " GROUP BY queue"
    )
    table_pages: str = (
        "SELECT pg_relation_size(%(table)s::regclass) / current_setting('block_size')::bigint"
    )
    metrics_consumers: str = (
        "SELECT id, hostname, pid, extract(epoch FROM now() - heartbeat_at)::float8, hungry,"
        " clock_offset_s, claims, claim_seconds, queues FROM {s}.consumers ORDER BY id"
    )
    # The tables' own statistics (PostgreSQL's, flushed by each session
    # about once a second; reset with the server's statistics) and sizes.
    metrics_tables: str = (
        "SELECT relname, n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_del,"
        " pg_total_relation_size(relid),"
        " extract(epoch FROM greatest(last_autovacuum, last_vacuum))::float8"
        " FROM pg_stat_user_tables WHERE schemaname = %(schema)s AND relname = ANY(%(tables)s)"
        " ORDER BY relname"
    )
    metrics_server: str = (
        "SELECT pg_notification_queue_usage(),"
        " pg_sequence_last_value(pg_get_serial_sequence(%(messages)s, 'id')),"
        " pg_sequence_last_value(pg_get_serial_sequence(%(scheduled)s, 'id')),"
        " pg_sequence_last_value(pg_get_serial_sequence(%(dead_letters)s, 'id')),"
        " (SELECT coalesce(json_object_agg(name, value), '{}') FROM {s}.counters)"
    )
