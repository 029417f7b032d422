"""Every SQL statement the project runs, the schema and its migrations.

Statements are templates with ``{s}`` standing for the quoted schema name;
:func:`statements` renders them once per schema. Values are always bound
parameters; queue and exchange names are data, never SQL.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from typing import Any

import psycopg
from psycopg import sql

from celery_pgnotify.errors import SchemaError

logger = logging.getLogger(__name__)


MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE {s}.queues (
    name            text PRIMARY KEY,
    durable         boolean NOT NULL DEFAULT true,
    auto_delete     boolean NOT NULL DEFAULT false,
    expires_ms      bigint,
    message_ttl_ms  bigint,
    last_used_at    timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.exchanges (
    name         text PRIMARY KEY,
    type         text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    durable      boolean NOT NULL DEFAULT true,
    auto_delete  boolean NOT NULL DEFAULT false
);
CREATE TABLE {s}.bindings (
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    queue        text NOT NULL,
    type         text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    pattern      text,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX bindings_queue ON {s}.bindings (queue);
CREATE TABLE {s}.consumers (
    id            serial PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    queues        text[] NOT NULL DEFAULT '{{}}',
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.messages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        text NOT NULL,
    rank         smallint NOT NULL DEFAULT 0,
    payload      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    consumer_id  integer,
    leased_at    timestamptz,
    redelivered  boolean NOT NULL DEFAULT false
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX messages_ready ON {s}.messages (queue, rank DESC, id) WHERE consumer_id IS NULL;
CREATE INDEX messages_leased ON {s}.messages (consumer_id) WHERE consumer_id IS NOT NULL;
CREATE INDEX messages_expiring ON {s}.messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE {s}.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text NOT NULL,
    payload     text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
""",
    ),
    (
        2,
        """
-- The result backend. ``meta`` is Celery's serialized result (status, result,
-- traceback, children, ...), read back as is; the other columns repeat parts
-- of it for people and for SQL (the task's name, args and kwargs only with
-- ``result_extended``).
CREATE TABLE {s}.results (
    task_id     text PRIMARY KEY,
    status      text NOT NULL,
    meta        bytea NOT NULL,
    name        text,
    args        text,
    kwargs      text,
    worker      text,
    retries     integer,
    queue       text,
    traceback   text,
    date_done   timestamptz,
    expires_at  timestamptz
) WITH (autovacuum_vacuum_scale_factor = 0.05);
CREATE INDEX results_expiring ON {s}.results (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE {s}.result_groups (
    group_id    text PRIMARY KEY,
    meta        bytea NOT NULL,
    expires_at  timestamptz
);
CREATE TABLE {s}.chord_counters (
    group_id    text PRIMARY KEY,
    counter     integer NOT NULL,
    expires_at  timestamptz
);
""",
    ),
    (
        3,
        """
-- Beat: one row per schedule entry. ``last_run_at`` moves forward only by a
-- compare-and-set in the transaction that also publishes the firing.
CREATE TABLE {s}.beat_entries (
    name             text PRIMARY KEY,
    schedule         text NOT NULL,
    last_run_at      timestamptz,
    last_due_at      timestamptz,
    total_run_count  integer NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
""",
    ),
    (
        4,
        """
-- Enqueue from SQL: writes a Celery (protocol 2, JSON) task message any
-- Celery worker accepts, in the caller's transaction, and returns its id.
-- ``priority`` is stored as given: 9 runs first, as with the default
-- priority_order 'desc'.
CREATE FUNCTION {s}.send_task(
    task_name  text,
    args       jsonb DEFAULT '[]',
    kwargs     jsonb DEFAULT '{{}}',
    queue      text DEFAULT 'celery',
    countdown  double precision DEFAULT NULL,
    priority   integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $send_task$
#variable_conflict use_variable
DECLARE
    task_id  uuid := gen_random_uuid();
    body     text;
    eta      text;
BEGIN
    IF task_name IS NULL OR task_name = '' THEN
        RAISE EXCEPTION 'send_task: task_name is required';
    END IF;
    IF args IS NULL OR jsonb_typeof(args) <> 'array' THEN
        RAISE EXCEPTION 'send_task: args must be a JSON array, not %', jsonb_typeof(args);
    END IF;
    IF kwargs IS NULL OR jsonb_typeof(kwargs) <> 'object' THEN
        RAISE EXCEPTION 'send_task: kwargs must be a JSON object, not %', jsonb_typeof(kwargs);
    END IF;
    IF queue IS NULL OR queue = '' OR length(queue) > 1000 THEN
        RAISE EXCEPTION 'send_task: queue must be a non-empty name';
    END IF;
    IF priority IS NOT NULL AND (priority < 0 OR priority > 9) THEN
        RAISE EXCEPTION 'send_task: priority must be 0 to 9, not %', priority;
    END IF;
    IF countdown IS NOT NULL THEN
        eta := to_char((clock_timestamp() + countdown * interval '1 second') AT TIME ZONE 'UTC',
                       'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"');
    END IF;
    body := jsonb_build_array(args, kwargs, jsonb_build_object(
        'callbacks', NULL, 'errbacks', NULL, 'chain', NULL, 'chord', NULL))::text;
    INSERT INTO {s}.messages (queue, rank, payload) VALUES (
        queue,
        coalesce(priority, 0),
        jsonb_build_object(
            'body', translate(encode(convert_to(body, 'UTF8'), 'base64'), chr(10), ''),
            'content-encoding', 'utf-8',
            'content-type', 'application/json',
            'headers', jsonb_build_object(
                'lang', 'py', 'task', task_name, 'id', task_id, 'shadow', NULL,
                'eta', eta, 'expires', NULL, 'group', NULL, 'group_index', NULL,
                'retries', 0, 'timelimit', jsonb_build_array(NULL, NULL),
                'root_id', task_id, 'parent_id', NULL,
                'argsrepr', args::text, 'kwargsrepr', kwargs::text,
                'origin', 'sql:' || current_user || '@' || current_database(),
                'ignore_result', false, 'stamped_headers', NULL, 'stamps', '{{}}'::jsonb),
            'properties', jsonb_build_object(
                'correlation_id', task_id, 'reply_to', '', 'delivery_mode', 2,
                'delivery_info', jsonb_build_object('exchange', '', 'routing_key', queue),
                'priority', coalesce(priority, 0), 'body_encoding', 'base64')
        )::text);
    -- Wake consumers at COMMIT, only if some consumer reads the queue.
    IF EXISTS (SELECT 1 FROM {s}.consumers c WHERE queue = ANY(c.queues)) THEN
        PERFORM pg_notify('pgn_' || left(md5('{schema}'), 8) || '_' || md5(queue), '');
    END IF;
    RETURN task_id;
END
$send_task$;
""",
    ),
    (
        5,
        """
ALTER TABLE {s}.dead_letters ADD COLUMN message_id bigint,
    ADD COLUMN rank smallint NOT NULL DEFAULT 0;
CREATE INDEX dead_letters_queue ON {s}.dead_letters (queue, id);
CREATE INDEX dead_letters_message ON {s}.dead_letters (message_id);
""",
    ),
    (
        6,
        """
-- Each chord header task counts once, however often its increment is
-- retried (a lost connection after COMMIT) or the task is redelivered.
CREATE TABLE {s}.chord_parts (
    group_id    text NOT NULL,
    task_id     text NOT NULL,
    expires_at  timestamptz,
    PRIMARY KEY (group_id, task_id)
);
CREATE INDEX chord_parts_expiring ON {s}.chord_parts (expires_at) WHERE expires_at IS NOT NULL;
-- A SECURITY INVOKER function still resolves unqualified names through the
-- caller's search_path: fix it, so no schema of the caller's can shadow a
-- built-in the function calls.
ALTER FUNCTION {s}.send_task(text, jsonb, jsonb, text, double precision, integer)
    SET search_path = pg_catalog, pg_temp;
""",
    ),
    (
        7,
        """
-- Beat leadership is a lease, renewed by the leader, taken over once it runs
-- out; ``term`` grows with every change of holder and fences every firing.
CREATE TABLE {s}.beat_leader (
    id          integer PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    term        bigint NOT NULL,
    expires_at  timestamptz NOT NULL
);
""",
    ),
]

LATEST_VERSION = MIGRATIONS[-1][0]

#: Schema names are plain identifiers: they are quoted, but never contain quotes.
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# --- named statements -------------------------------------------------------

_EXPIRY = (
    "LEAST(now() + %(ttl)s::bigint * interval '1 millisecond', "
    "now() + {q}.message_ttl_ms * interval '1 millisecond')"
)
_NOTIFY = "pg_notify(%(prefix)s || md5(queue), '')"
# Notify only when some live consumer reads the queue: NOTIFY serialises
# committing transactions, and a publish nobody waits for should not pay it.
_WAITED_FOR = "EXISTS (SELECT 1 FROM {s}.consumers c WHERE queue = ANY(c.queues))"

# Appended to the statements a consumer runs (claim, ack, requeue): they
# commit without waiting for the WAL flush. A server crash can undo the last
# of them, and an undone claim or ack only delivers a message again; the
# message itself was committed by its publish, which always waits. Rendered
# as ``true`` when the ``async_acks`` transport option is off.
_NO_FLUSH = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"

# Prepended to a publish's conditions: the message's COMMIT waits for the
# WAL flush even when the server, database or role runs with
# synchronous_commit off (a stronger setting, such as remote_apply, stays).
_DURABLE = (
    "(SELECT set_config('synchronous_commit', CASE current_setting('synchronous_commit')"
    " WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, true)) IS NOT NULL"
)

# A queue table's statistics are seldom right: analysed while a queue was
# short (or never, with autovacuum off), the planner expects a few rows and
# picks a bitmap scan plus a sort of the whole backlog for every claim, so a
# drain of n messages costs O(n^2); reading messages_ready in its order stops
# after the rows wanted. Sessions that claim run only this module's
# statements, none of which needs a sort, so sorting is off for them.
CLAIMING_SESSION = "SET enable_sort = off"

# A row's end of life: ``expires`` seconds from now, or never when NULL/0.
_EXPIRES_AT = "now() + nullif(%(expires)s::float8, 0) * interval '1 second'"
_LIVE = "(expires_at IS NULL OR expires_at > now())"

TEMPLATES: dict[str, str] = {
    # One statement: route through the bindings, insert, and notify each
    # queue once (DISTINCT gives one row per queue) in RETURNING.
    "publish_routed": (
        "INSERT INTO {s}.messages (queue, rank, payload, expires_at)"
        " SELECT DISTINCT b.queue, %(rank)s, %(payload)s, "
        + _EXPIRY.format(q="q")
        + " FROM {s}.bindings b LEFT JOIN {s}.queues q ON q.name = b.queue"
        " WHERE " + _DURABLE + " AND b.exchange = %(exchange)s AND (b.type = 'fanout'"
        "  OR (b.type = 'direct' AND b.routing_key = %(rk)s)"
        "  OR (b.type = 'topic' AND ('.' || %(rk)s) ~ b.pattern))"
        " RETURNING queue, CASE WHEN " + _WAITED_FOR + " THEN " + _NOTIFY + " END"
    ),
    "publish_direct": (
        "INSERT INTO {s}.messages (queue, rank, payload, expires_at)"
        " SELECT %(queue)s, %(rank)s, %(payload)s, LEAST(now() + %(ttl)s::bigint"
        "  * interval '1 millisecond', (SELECT now() + q.message_ttl_ms"
        "  * interval '1 millisecond' FROM {s}.queues q WHERE q.name = %(queue)s))"
        " WHERE "
        + _DURABLE
        + " RETURNING queue, CASE WHEN "
        + _WAITED_FOR
        + " THEN "
        + _NOTIFY
        + " END"
    ),
    # Acks waiting to be written (``acks``, often none) leave with the claim:
    # one round trip per turn of a consumer's loop instead of two.
    "claim": (
        "WITH acked AS (DELETE FROM {s}.messages WHERE id = ANY(%(acks)s::bigint[])),"
        " picked AS ("
        " SELECT id FROM {s}.messages"
        " WHERE queue = %(queue)s AND consumer_id IS NULL"
        "  AND (expires_at IS NULL OR expires_at > now()) AND {nf}"
        " ORDER BY rank DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " UPDATE {s}.messages m SET consumer_id = %(consumer)s, leased_at = now()"
        " FROM picked WHERE m.id = picked.id"
        # A message over max_message_size is not sent over the wire: it is
        # dead-lettered by id.
        " RETURNING m.id, m.rank,"
        " CASE WHEN octet_length(m.payload) <= %(max_size)s THEN m.payload END,"
        " m.redelivered, octet_length(m.payload)"
    ),
    # no_ack consumers (Celery's pidbox) take messages for good, in one go.
    "take_no_ack": (
        "DELETE FROM {s}.messages WHERE id IN ("
        " SELECT id FROM {s}.messages"
        " WHERE queue = %(queue)s AND consumer_id IS NULL"
        "  AND (expires_at IS NULL OR expires_at > now()) AND {nf}"
        " ORDER BY rank DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " RETURNING id, rank, payload, redelivered, octet_length(payload)"
    ),
    "ack": "DELETE FROM {s}.messages WHERE id = %(id)s AND {nf}",
    "ack_many": "DELETE FROM {s}.messages WHERE id = ANY(%(ids)s) AND {nf}",
    "requeue": (
        "WITH back AS ("
        " UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer)s AND {nf} RETURNING queue)"
        " SELECT queue, " + _NOTIFY + " FROM (SELECT DISTINCT queue FROM back) AS q"
    ),
    # A queue keeps the settings of its first declaration; the row returned
    # tells the declarer whether its own settings agree.
    "declare_queue": (
        "INSERT INTO {s}.queues AS q (name, durable, auto_delete, expires_ms, message_ttl_ms)"
        " VALUES (%(name)s, %(durable)s, %(auto_delete)s, %(expires)s, %(ttl)s)"
        " ON CONFLICT (name) DO UPDATE SET last_used_at = now()"
        " RETURNING durable, auto_delete, expires_ms, message_ttl_ms"
    ),
    "has_queue": "SELECT EXISTS (SELECT 1 FROM {s}.queues WHERE name = %(name)s)",
    "queue_size": (
        "SELECT count(*) FROM {s}.messages WHERE queue = %(name)s AND consumer_id IS NULL"
        " AND (expires_at IS NULL OR expires_at > now())"
    ),
    "purge": (
        "WITH gone AS (DELETE FROM {s}.messages WHERE queue = %(name)s"
        " AND consumer_id IS NULL RETURNING 1) SELECT count(*) FROM gone"
    ),
    # Ready messages through messages_ready, leased ones through
    # messages_leased: no sequential scan of the table (every `celery
    # inspect` deletes its reply queue).
    "delete_queue": (
        "WITH ready AS (DELETE FROM {s}.messages WHERE queue = %(name)s"
        "  AND consumer_id IS NULL),"
        " leased AS (DELETE FROM {s}.messages WHERE consumer_id IS NOT NULL"
        "  AND queue = %(name)s),"
        " b AS (DELETE FROM {s}.bindings WHERE queue = %(name)s)"
        " DELETE FROM {s}.queues WHERE name = %(name)s"
    ),
    "queue_consumed_elsewhere": (
        "SELECT EXISTS (SELECT 1 FROM {s}.consumers"
        " WHERE %(name)s = ANY(queues) AND id <> %(consumer)s)"
    ),
    "declare_exchange": (
        "INSERT INTO {s}.exchanges (name, type, durable, auto_delete)"
        " VALUES (%(name)s, %(type)s, %(durable)s, %(auto_delete)s)"
        " ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type"
    ),
    "exchange_type": "SELECT type FROM {s}.exchanges WHERE name = %(name)s",
    "delete_exchange": (
        "WITH b AS (DELETE FROM {s}.bindings WHERE exchange = %(name)s)"
        " DELETE FROM {s}.exchanges WHERE name = %(name)s"
    ),
    "bind": (
        "INSERT INTO {s}.bindings (exchange, routing_key, queue, type, pattern)"
        " VALUES (%(exchange)s, %(rk)s, %(queue)s, %(type)s, %(pattern)s)"
        " ON CONFLICT (exchange, routing_key, queue) DO UPDATE"
        " SET type = EXCLUDED.type, pattern = EXCLUDED.pattern"
    ),
    "unbind": (
        "DELETE FROM {s}.bindings"
        " WHERE exchange = %(exchange)s AND routing_key = %(rk)s AND queue = %(queue)s"
    ),
    "queue_auto_delete": "SELECT auto_delete FROM {s}.queues WHERE name = %(name)s",
    "exchange_bindings": (
        "SELECT routing_key, pattern, queue FROM {s}.bindings WHERE exchange = %(name)s"
    ),
    "list_bindings": "SELECT queue, exchange, routing_key FROM {s}.bindings",
    "register_consumer": (
        "INSERT INTO {s}.consumers (hostname, pid, queues)"
        " VALUES (%(hostname)s, %(pid)s, %(queues)s) RETURNING id"
    ),
    # No row: the consumer was declared dead (reaped) and must not go on as
    # if nothing happened (see Listener._declared_dead).
    "heartbeat": (
        "UPDATE {s}.consumers SET heartbeat_at = now(), queues = %(queues)s"
        " WHERE id = %(id)s RETURNING id"
    ),
    # A consumer declared dead comes back under its own id, with nothing
    # leased: whatever it claimed after it was reaped goes back.
    "reregister_consumer": (
        "WITH me AS (INSERT INTO {s}.consumers (id, hostname, pid, queues)"
        " VALUES (%(id)s, %(hostname)s, %(pid)s, %(queues)s)"
        " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), queues = EXCLUDED.queues),"
        " back AS (UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL,"
        " redelivered = true WHERE consumer_id = %(id)s RETURNING queue)"
        " SELECT queue, " + _NOTIFY + " FROM (SELECT DISTINCT queue FROM back) AS q"
    ),
    "resume_consumer": (
        "UPDATE {s}.consumers SET heartbeat_at = now(), hostname = %(hostname)s,"
        " pid = %(pid)s, queues = %(queues)s WHERE id = %(id)s RETURNING id"
    ),
    # A resumed consumer gives back what is leased to it but not in hand.
    "release_unheld": (
        "WITH back AS ("
        " UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE consumer_id = %(consumer)s AND NOT (id = ANY(%(held)s::bigint[]))"
        " RETURNING queue)"
        " SELECT queue, count(*), " + _NOTIFY + " FROM back GROUP BY queue"
    ),
    "touch_queues": ("UPDATE {s}.queues SET last_used_at = now() WHERE name = ANY(%(queues)s)"),
    "unregister_consumer": (
        "WITH back AS ("
        " UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE consumer_id = %(id)s RETURNING queue),"
        " gone AS (DELETE FROM {s}.consumers WHERE id = %(id)s)"
        " SELECT queue, " + _NOTIFY + " FROM (SELECT DISTINCT queue FROM back) AS q"
    ),
    # A consumer is dead when it has been silent for lease_timeout, or when
    # its session lock is gone and it missed its heartbeats for lock_grace.
    # The lock is probed by trying to take it for this transaction (free
    # means its session is gone), for the few consumers late enough to be
    # suspects only: no scan of pg_locks. One reaper at a time (``gate``, a
    # transaction lock): the others skip their turn instead of waiting. The
    # dead consumers' messages are found through messages_leased, so the
    # cost follows the number of dead consumers, not of leased messages.
    "reap": (
        "WITH gate AS (SELECT pg_try_advisory_xact_lock(%(ns)s, -2) AS open),"
        " dead AS ("
        " DELETE FROM {s}.consumers c USING gate WHERE gate.open"
        "  AND (c.heartbeat_at < now() - %(lease_timeout)s * interval '1 second'"
        "   OR CASE WHEN c.heartbeat_at < now() - %(lock_grace)s * interval '1 second'"
        "    THEN pg_try_advisory_xact_lock(%(ns)s, c.id) ELSE false END)"
        " RETURNING c.id),"
        " back AS ("
        " UPDATE {s}.messages m SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE m.consumer_id IN (SELECT id FROM dead) RETURNING m.queue),"
        " expired AS ("
        " DELETE FROM {s}.messages WHERE (SELECT open FROM gate)"
        "  AND expires_at < now() AND consumer_id IS NULL),"
        " stale_queues AS ("
        " DELETE FROM {s}.queues q WHERE (SELECT open FROM gate) AND q.expires_ms IS NOT NULL"
        "  AND q.last_used_at < now() - q.expires_ms * interval '1 millisecond'"
        "  AND NOT EXISTS (SELECT 1 FROM {s}.consumers c WHERE q.name = ANY(c.queues))"
        " RETURNING q.name),"
        " stale_bindings AS (DELETE FROM {s}.bindings WHERE queue IN"
        "  (SELECT name FROM stale_queues)),"
        " stale_messages AS (DELETE FROM {s}.messages WHERE queue IN"
        "  (SELECT name FROM stale_queues))"
        " SELECT queue, " + _NOTIFY + " FROM (SELECT DISTINCT queue FROM back) AS q"
    ),
    # Leases of consumers that no longer exist (a row deleted by hand): a
    # scan of every leased message, so run seldom (see Listener).
    "reap_orphans": (
        "WITH orphans AS ("
        " UPDATE {s}.messages m SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE (SELECT pg_try_advisory_xact_lock(%(ns)s, -2))"
        "  AND m.consumer_id IS NOT NULL AND m.leased_at < now() - %(lease_timeout)s"
        "  * interval '1 second' AND NOT EXISTS"
        "  (SELECT 1 FROM {s}.consumers c WHERE c.id = m.consumer_id) RETURNING m.queue)"
        " SELECT queue, " + _NOTIFY + " FROM (SELECT DISTINCT queue FROM orphans) AS q"
    ),
    "take_lock": "SELECT pg_try_advisory_lock(%(ns)s, %(id)s)",
    # -- dead letters --
    "dead_letter": (
        "WITH m AS (DELETE FROM {s}.messages WHERE id = %(id)s"
        " RETURNING id, queue, rank, payload)"
        " INSERT INTO {s}.dead_letters (message_id, queue, rank, payload, reason)"
        " SELECT id, queue, rank, payload, %(reason)s FROM m"
    ),
    # A message already taken off the table (no_ack consumers).
    "dead_letter_taken": (
        "INSERT INTO {s}.dead_letters (message_id, queue, rank, payload, reason)"
        " VALUES (%(id)s, %(queue)s, %(rank)s, %(payload)s, %(reason)s)"
    ),
    "dead_letter_reason": (
        "UPDATE {s}.dead_letters SET reason = %(reason)s WHERE message_id = %(id)s"
    ),
    "dead_letters_list": (
        "SELECT id, message_id, queue, reason, created_at, left(payload, 2000),"
        " octet_length(payload) FROM {s}.dead_letters"
        " WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) ORDER BY id LIMIT %(limit)s"
    ),
    # Back to the queue it came from, as a new message (notified at COMMIT).
    "dead_letters_retry": (
        "WITH d AS (DELETE FROM {s}.dead_letters"
        " WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) RETURNING queue, rank, payload),"
        " m AS (INSERT INTO {s}.messages (queue, rank, payload)"
        " SELECT queue, rank, payload FROM d RETURNING queue)"
        " SELECT queue, count(*), " + _NOTIFY + " FROM m GROUP BY queue"
    ),
    "dead_letters_drop": (
        "WITH d AS (DELETE FROM {s}.dead_letters"
        " WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) RETURNING 1)"
        " SELECT count(*) FROM d"
    ),
    # -- operations --
    "status_queues": (
        "WITH names AS (SELECT name FROM {s}.queues"
        " UNION SELECT DISTINCT queue FROM {s}.messages"
        " UNION SELECT DISTINCT queue FROM {s}.dead_letters)"
        " SELECT n.name,"
        " count(m.id) FILTER (WHERE m.consumer_id IS NULL),"
        " count(m.id) FILTER (WHERE m.consumer_id IS NOT NULL),"
        " extract(epoch FROM now() - min(m.created_at) FILTER (WHERE m.consumer_id IS NULL)),"
        " (SELECT count(*) FROM {s}.dead_letters d WHERE d.queue = n.name)"
        " FROM names n LEFT JOIN {s}.messages m ON m.queue = n.name"
        " GROUP BY n.name ORDER BY n.name"
    ),
    # ETAs of leased messages (held by workers until due), read without
    # parsing the JSON, so that no payload can make this query fail.
    "status_etas": (
        'SELECT queue, substring(payload FROM \'"eta":\\s*"([^"]+)"\')'
        " FROM {s}.messages WHERE consumer_id IS NOT NULL"
    ),
    "status_consumers": (
        "SELECT id, hostname, pid, queues, started_at,"
        " extract(epoch FROM now() - heartbeat_at)"
        " FROM {s}.consumers ORDER BY hostname, pid"
    ),
    # -- result backend --
    # One statement stores and wakes the waiter. A SUCCESS is final (a lost
    # worker's late FAILURE must not overwrite it), unless it already expired.
    "store_result": (
        "INSERT INTO {s}.results AS r (task_id, status, meta, name, args, kwargs,"
        " worker, retries, queue, traceback, date_done, expires_at)"
        " VALUES (%(id)s, %(status)s, %(meta)s, %(name)s, %(args)s, %(kwargs)s,"
        " %(worker)s, %(retries)s, %(queue)s, %(traceback)s,"
        " CASE WHEN %(ready)s THEN now() END, " + _EXPIRES_AT + ")"
        " ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status,"
        " meta = EXCLUDED.meta, name = coalesce(EXCLUDED.name, r.name),"
        " args = coalesce(EXCLUDED.args, r.args), kwargs = coalesce(EXCLUDED.kwargs, r.kwargs),"
        " worker = coalesce(EXCLUDED.worker, r.worker), retries = EXCLUDED.retries,"
        " queue = coalesce(EXCLUDED.queue, r.queue), traceback = EXCLUDED.traceback,"
        " date_done = EXCLUDED.date_done, expires_at = EXCLUDED.expires_at"
        " WHERE r.status <> 'SUCCESS' OR r.expires_at <= now()"
        " RETURNING pg_notify(%(channel)s, '')"
    ),
    "get_result": "SELECT meta FROM {s}.results WHERE task_id = %(id)s AND " + _LIVE,
    "get_results": (
        "SELECT task_id, meta FROM {s}.results WHERE task_id = ANY(%(ids)s) AND " + _LIVE
    ),
    "save_group": (
        "INSERT INTO {s}.result_groups AS g (group_id, meta, expires_at)"
        " VALUES (%(id)s, %(meta)s, " + _EXPIRES_AT + ")"
        " ON CONFLICT (group_id) DO UPDATE SET meta = EXCLUDED.meta,"
        " expires_at = EXCLUDED.expires_at"
    ),
    "get_group": "SELECT meta FROM {s}.result_groups WHERE group_id = %(id)s AND " + _LIVE,
    # Atomic: concurrent header tasks each see a distinct count.
    # Once per header task (``part``): a repeated increment reads the count.
    "chord_incr_once": (
        "WITH part AS (INSERT INTO {s}.chord_parts (group_id, task_id, expires_at)"
        " VALUES (%(id)s, %(part)s, " + _EXPIRES_AT + ")"
        " ON CONFLICT DO NOTHING RETURNING group_id),"
        " bumped AS (INSERT INTO {s}.chord_counters AS c (group_id, counter, expires_at)"
        " SELECT group_id, 1, " + _EXPIRES_AT + " FROM part"
        " ON CONFLICT (group_id) DO UPDATE SET counter = c.counter + 1,"
        " expires_at = EXCLUDED.expires_at RETURNING counter)"
        " SELECT counter FROM bumped UNION ALL SELECT counter FROM {s}.chord_counters"
        " WHERE group_id = %(id)s AND NOT EXISTS (SELECT 1 FROM part)"
    ),
    "chord_incr": (
        "INSERT INTO {s}.chord_counters AS c (group_id, counter, expires_at)"
        " VALUES (%(id)s, 1, " + _EXPIRES_AT + ")"
        " ON CONFLICT (group_id) DO UPDATE SET counter = c.counter + 1,"
        " expires_at = EXCLUDED.expires_at RETURNING counter"
    ),
    # -- beat --
    "beat_state": (
        "SELECT name, schedule, last_run_at, total_run_count FROM {s}.beat_entries"
        " WHERE name = ANY(%(names)s)"
    ),
    # New entries start from the last_run_at Celery gives them; existing ones
    # keep their state and take the (possibly changed) schedule.
    "beat_register": (
        "INSERT INTO {s}.beat_entries AS e (name, schedule, last_run_at)"
        " SELECT * FROM unnest(%(names)s::text[], %(schedules)s::text[],"
        "  %(last_runs)s::timestamptz[])"
        " ON CONFLICT (name) DO UPDATE SET schedule = EXCLUDED.schedule,"
        " updated_at = now() WHERE e.schedule <> EXCLUDED.schedule"
    ),
    "beat_forget_others": "DELETE FROM {s}.beat_entries WHERE NOT (name = ANY(%(names)s))",
    # The firing itself: succeeds for exactly one process per (entry, last
    # run), and only for the holder of the current lease (the fence: the
    # lease row is share-locked, so no takeover commits before the firing).
    "beat_advance": (
        "WITH lead AS (SELECT 1 FROM {s}.beat_leader WHERE id = 1 AND holder = %(holder)s"
        " AND term = %(term)s AND expires_at > now() FOR SHARE)"
        " UPDATE {s}.beat_entries SET last_run_at = %(new)s, last_due_at = %(due)s,"
        " total_run_count = total_run_count + 1, updated_at = now()"
        " WHERE name = %(name)s AND last_run_at IS NOT DISTINCT FROM %(old)s"
        " AND EXISTS (SELECT 1 FROM lead) RETURNING total_run_count"
    ),
    # Take the lease if it ran out, or renew it if it is ours: the term of
    # the lease held, or no row.
    "beat_lead": (
        "INSERT INTO {s}.beat_leader AS l (id, holder, term, expires_at)"
        " VALUES (1, %(holder)s, 1, now() + %(lease)s * interval '1 second')"
        " ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder,"
        " expires_at = EXCLUDED.expires_at,"
        " term = CASE WHEN l.holder = EXCLUDED.holder THEN l.term ELSE l.term + 1 END"
        " WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()"
        " RETURNING term"
    ),
    "beat_resign": (
        "UPDATE {s}.beat_leader SET expires_at = now() WHERE id = 1 AND holder = %(holder)s"
    ),
    "cleanup_results": (
        "WITH r AS (DELETE FROM {s}.results WHERE expires_at <= now() RETURNING 1),"
        " g AS (DELETE FROM {s}.result_groups WHERE expires_at <= now() RETURNING 1),"
        " c AS (DELETE FROM {s}.chord_counters WHERE expires_at <= now() RETURNING 1),"
        " p AS (DELETE FROM {s}.chord_parts WHERE expires_at <= now())"
        " SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM g), (SELECT count(*) FROM c)"
    ),
}

# Every key-value table of the result backend can be deleted from and given
# a new lifetime by key the same way.
for _kind, (_table, _key) in {
    "result": ("results", "task_id"),
    "group": ("result_groups", "group_id"),
    "chord": ("chord_counters", "group_id"),
}.items():
    TEMPLATES[f"delete_{_kind}"] = f"DELETE FROM {{s}}.{_table} WHERE {_key} = %(id)s"
    TEMPLATES[f"expire_{_kind}"] = (
        f"UPDATE {{s}}.{_table} SET expires_at = {_EXPIRES_AT} WHERE {_key} = %(id)s"
    )


class Statements:
    """The rendered statements for one schema, as attributes."""

    def __init__(self, schema: str) -> None:
        if not SCHEMA_NAME.match(schema):
            raise ValueError(f"schema name {schema!r} is not a plain identifier")
        self.schema = schema
        # A plain identifier (checked above) quotes safely without a connection.
        ident = f'"{schema}"'
        for name, template in TEMPLATES.items():
            rendered = template.replace("{s}", ident)
            if "{nf}" in rendered:
                # ``name``: commits without waiting for the WAL flush;
                # ``name_flushed``: commits as the server is configured.
                setattr(self, name + "_flushed", rendered.replace("{nf}", "true"))
                rendered = rendered.replace("{nf}", _NO_FLUSH)
            setattr(self, name, rendered)
        digest = hashlib.md5(schema.encode()).digest()
        #: prefix of the NOTIFY channel of every queue: ``prefix || md5(queue)``
        self.channel_prefix = "pgn_" + digest[:4].hex() + "_"
        #: first key of the two-key advisory lock each consumer session holds
        #: (the second is the consumer id): one namespace per schema.
        self.lock_namespace = int.from_bytes(digest[4:8], "big") & 0x7FFFFFFF
        #: prefix of the NOTIFY channel a task's result is announced on
        self.result_channel_prefix = "pgr_" + digest[:4].hex() + "_"

    def channel(self, queue: str) -> str:
        """The NOTIFY channel of ``queue`` (always a short, safe identifier)."""
        return self.channel_prefix + hashlib.md5(queue.encode("utf-8")).hexdigest()

    def result_channel(self, task_id: str) -> str:
        """The NOTIFY channel announcing the result of ``task_id``."""
        return self.result_channel_prefix + hashlib.md5(task_id.encode("utf-8")).hexdigest()

    def __getattr__(self, name: str) -> Any:  # for mypy: attributes set above
        raise AttributeError(name)


@functools.cache
def statements(schema: str) -> Statements:
    """The statements for ``schema`` (rendered once, then cached)."""
    return Statements(schema)


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


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """Apply pending migrations to ``schema``; returns the versions applied.

    Idempotent and safe to run from many processes at once: the work happens
    in one transaction under a transaction-level advisory lock.
    """
    if not SCHEMA_NAME.match(schema):
        raise SchemaError(f"schema name {schema!r} is not a plain SQL identifier")
    applied: list[int] = []
    ident = sql.Identifier(schema).as_string(conn)
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            ("celery_pgnotify migrate " + schema,),
        )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(schema))
        )
        current = schema_version(conn, schema)
        if current > LATEST_VERSION:
            raise SchemaError(
                f"schema {schema!r} is at version {current}, newer than this "
                f"celery-pgnotify knows ({LATEST_VERSION}); upgrade the package"
            )
        for version, ddl in MIGRATIONS:
            if version <= current:
                continue
            logger.info("Applying schema migration %s to %s", version, schema)
            ddl = ddl.replace("{s}", ident).replace("{schema}", schema).replace("{{}}", "{}")
            conn.execute(ddl.encode())
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(
                    sql.Identifier(schema)
                ),
                (version,),
            )
            applied.append(version)
    return applied
