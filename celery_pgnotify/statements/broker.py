"""The broker's statements: publishing and topology, consumers, operations."""

from __future__ import annotations

from dataclasses import dataclass

from celery_pgnotify.statements.fragments import (
    ABOVE_FLOOR,
    COUNT,
    DUE,
    NEXT_DUE,
    NOT_PAUSED,
    NOTIFY,
    SCHEDULED,
    WAKE,
    lower_floors,
    publish_direct_into,
    publish_routed_into,
    wake,
)

# One more hungry consumer of %(queue)s (not this one) woken, whose turn it
# is (see fragments.wake_hungry). Ordered by id, which the primary key gives
# without a sort: sessions that claim run with sorting off (see
# CLAIMING_SESSION), which would price a sort out of all reason.
_OTHER_HUNGRY = (
    " FROM {s}.consumers o WHERE %(queue)s = ANY(o.queues) AND o.hungry"
    " AND o.id <> %(consumer)s AND o.heartbeat_at > now() - %(fresh)s * interval '1 second'"
)
PASS_ON = (
    "(SELECT bool_or(pg_notify(%(prefix)s || md5(t.id || '/' || %(queue)s), '') IS NULL)"
    " FROM (SELECT o.id" + _OTHER_HUNGRY + " ORDER BY o.id"
    "  OFFSET (SELECT nextval('{s}.wake_turns') %% greatest(count(*), 1)" + _OTHER_HUNGRY + ")"
    "  LIMIT 1) AS t)"
)


@dataclass(frozen=True)
class ConsumerWrites:
    """What a consuming session writes: claims, takes, acks and requeues.

    Rendered twice (see :meth:`Statements.writes`): as the server is
    configured, and, for the ``async_acks`` transport option, committing
    without waiting for the WAL flush (``{nf}`` in a template).
    """

    # Acks waiting to be written (``acks``, often none) leave with the claim:
    # one round trip per turn of a consumer's loop instead of two.
    claim: str = (
        "WITH acked AS (DELETE FROM {s}.messages WHERE id = ANY(%(acks)s::bigint[])),"
        " picked AS ("
        " SELECT id FROM {s}.messages"
        " WHERE queue = %(queue)s AND consumer_id IS NULL AND " + ABOVE_FLOOR + ""
        "  AND (expires_at IS NULL OR expires_at > now()) AND {nf} AND " + NOT_PAUSED + ""
        # A consumer reaped while it lived (behind a partition, frozen) takes
        # nothing until it has learnt so and come back: under its dead id,
        # what it took would also be given to another consumer once it does.
        "  AND EXISTS (SELECT 1 FROM {s}.consumers me WHERE me.id = %(consumer)s)"
        " ORDER BY rank DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED),"
        # The picked rows by their ids, through the primary key: as a join,
        # a planner whose statistics see a handful of live rows may read the
        # whole table instead, every row vacuum has yet to remove included.
        " leased AS (UPDATE {s}.messages m SET consumer_id = %(consumer)s, leased_at = now()"
        " WHERE m.id = ANY(ARRAY(SELECT id FROM picked))"
        # A message over max_message_size is not sent over the wire: it is
        # dead-lettered by id.
        " RETURNING m.id, m.rank,"
        " CASE WHEN octet_length(m.payload) <= %(max_size)s THEN m.payload END AS payload,"
        " m.redelivered, octet_length(m.payload) AS size,"
        # Revoked while no worker was there to hear it (see revoking.py):
        # a probe by primary key whatever the plan (see is_revoked).
        " m.task_id IS NOT NULL AND {s}.is_revoked(m.task_id) AS revoked),"
        # The consumer says whether it has room left (``hungry``: it got fewer
        # than it asked for): publishes wake hungry consumers in turn
        # (fragments.wake). Written only when that changes: a row written at
        # every claim would leave a dead version per claim behind while vacuum
        # is held back, and every publish reads them to choose whom to wake.
        # When it was last fed goes with its heartbeat, which writes the row
        # anyway.
        " got AS (SELECT count(*) AS n FROM picked),"
        " fed AS (UPDATE {s}.consumers c SET hungry = got.n < %(limit)s FROM got"
        "  WHERE c.id = %(consumer)s AND c.hungry <> (got.n < %(limit)s)),"
        # A full claim may leave more behind: it passes the wake-up on to the
        # next hungry consumer of the queue.
        " passed AS (SELECT " + PASS_ON + " AS sent FROM got WHERE got.n >= %(limit)s)"
        " SELECT leased.* FROM leased LEFT JOIN passed ON true"
    )
    # no_ack consumers (Celery's pidbox) take messages for good, in one go.
    take_no_ack: str = (
        "DELETE FROM {s}.messages WHERE id = ANY(ARRAY("
        " SELECT id FROM {s}.messages"
        " WHERE queue = %(queue)s AND consumer_id IS NULL AND " + ABOVE_FLOOR + ""
        "  AND (expires_at IS NULL OR expires_at > now()) AND {nf} AND " + NOT_PAUSED + ""
        " ORDER BY rank DESC, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED))"
        " RETURNING id, rank, payload, redelivered, octet_length(payload), false"
    )
    ack: str = "DELETE FROM {s}.messages WHERE id = %(id)s AND {nf}"
    ack_many: str = "DELETE FROM {s}.messages WHERE id = ANY(%(ids)s) AND {nf}"
    requeue: str = (
        "WITH back AS ("
        " UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer)s AND {nf} RETURNING queue, id),"
        + lower_floors("back")
        + " SELECT queue, "
        + NOTIFY
        + " FROM (SELECT DISTINCT queue FROM back) AS q"
    )


@dataclass(frozen=True)
class Publishes:
    """Publishing a message: one statement routes, stores and wakes.

    Rendered twice (see :meth:`Statements.publishes`): waiting for the WAL
    flush whatever the session says, and, for ``durable_publish: False``,
    committing without waiting for it (``{dur}`` in a template).
    """

    # One statement: route through the bindings, insert, and notify each
    # queue once (DISTINCT gives one row per queue) in RETURNING.
    publish_routed: str = publish_routed_into("messages", ", task_id", ", %(task_id)s", WAKE)
    publish_direct: str = publish_direct_into("messages", ", task_id", ", %(task_id)s", WAKE)
    # A task whose ETA lies ahead waits in ``scheduled``, where no claim
    # looks, until a consumer of its queue moves it (``promote``); nobody is
    # woken for it now.
    schedule_routed: str = publish_routed_into("scheduled", SCHEDULED, DUE, "NULL")
    schedule_direct: str = publish_direct_into("scheduled", SCHEDULED, DUE, "NULL")
    # Many messages in one statement (a group's, see batching.py): each is
    # routed (``''``: straight to the queue its routing key names), stored in
    # publish order, in ``messages`` or, due later, in ``scheduled``; each
    # queue is woken once. Rows without ``queue`` name the messages (1-based
    # positions) that matched no queue.
    publish_many: str = (
        "WITH m AS (SELECT * FROM unnest(%(exchanges)s::text[], %(rks)s::text[],"
        "  %(ranks)s::smallint[], %(payloads)s::text[], %(ttls)s::bigint[],"
        "  %(task_ids)s::text[], %(dues)s::timestamptz[])"
        "  WITH ORDINALITY AS m(exchange, rk, rank, payload, ttl, task_id, due, n)),"
        " routed AS (SELECT DISTINCT m.n, b.queue FROM m JOIN {s}.bindings b"
        "  ON m.exchange <> '' AND b.exchange = m.exchange AND (b.type = 'fanout'"
        "   OR (b.type = 'direct' AND b.routing_key = m.rk)"
        "   OR (b.type = 'topic' AND ('.' || m.rk) ~ b.pattern))"
        "  UNION ALL SELECT m.n, m.rk FROM m WHERE m.exchange = ''),"
        " stored AS (SELECT r.queue, m.rank, m.payload, m.task_id, m.due, m.n,"
        "  LEAST(now() + m.ttl * interval '1 millisecond',"
        "   now() + q.message_ttl_ms * interval '1 millisecond') AS expires_at"
        "  FROM routed r JOIN m ON m.n = r.n LEFT JOIN {s}.queues q ON q.name = r.queue"
        "  WHERE {dur}),"
        " now_ AS (INSERT INTO {s}.messages (queue, rank, payload, expires_at, task_id)"
        "  SELECT queue, rank, payload, expires_at, task_id FROM stored WHERE due IS NULL"
        "  ORDER BY n, queue RETURNING queue),"
        " later AS (INSERT INTO {s}.scheduled (queue, rank, payload, expires_at, due_at, task_id)"
        "  SELECT queue, rank, payload, expires_at, due, task_id FROM stored"
        "  WHERE due IS NOT NULL ORDER BY n, queue)"
        " SELECT NULL::bigint, queue, " + wake("w.n") + ""
        " FROM (SELECT queue, count(*) AS n FROM now_ GROUP BY queue) AS w"
        " UNION ALL SELECT m.n, NULL, NULL FROM m"
        "  WHERE NOT EXISTS (SELECT 1 FROM routed r WHERE r.n = m.n)"
    )


@dataclass(frozen=True)
class TopologyStatements:
    """Declaring queues, exchanges and bindings."""

    # A queue keeps the settings of its first declaration; the row returned
    # tells the declarer whether its own settings agree.
    declare_queue: str = (
        "INSERT INTO {s}.queues AS q (name, durable, auto_delete, expires_ms, message_ttl_ms)"
        " VALUES (%(name)s, %(durable)s, %(auto_delete)s, %(expires)s, %(ttl)s)"
        " ON CONFLICT (name) DO UPDATE SET last_used_at = now()"
        " RETURNING durable, auto_delete, expires_ms, message_ttl_ms"
    )
    has_queue: str = "SELECT EXISTS (SELECT 1 FROM {s}.queues WHERE name = %(name)s)"
    queue_size: str = (
        "SELECT count(*) FROM {s}.messages WHERE queue = %(name)s AND consumer_id IS NULL"
        " AND (expires_at IS NULL OR expires_at > now())"
    )
    # Purging a queue also drops its tasks scheduled for later.
    purge: str = (
        "WITH gone AS (DELETE FROM {s}.messages WHERE queue = %(name)s"
        " AND consumer_id IS NULL RETURNING 1),"
        " later AS (DELETE FROM {s}.scheduled WHERE queue = %(name)s RETURNING 1)"
        " SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM later)"
    )
    # Ready messages through messages_ready, leased ones through
    # messages_leased: no sequential scan of the table (every `celery
    # inspect` deletes its reply queue).
    delete_queue: str = (
        "WITH ready AS (DELETE FROM {s}.messages WHERE queue = %(name)s"
        "  AND consumer_id IS NULL),"
        " leased AS (DELETE FROM {s}.messages WHERE consumer_id IS NOT NULL"
        "  AND queue = %(name)s),"
        " later AS (DELETE FROM {s}.scheduled WHERE queue = %(name)s),"
        " b AS (DELETE FROM {s}.bindings WHERE queue = %(name)s)"
        " DELETE FROM {s}.queues WHERE name = %(name)s"
    )
    queue_consumed_elsewhere: str = (
        "SELECT EXISTS (SELECT 1 FROM {s}.consumers"
        " WHERE %(name)s = ANY(queues) AND id <> %(consumer)s)"
    )
    declare_exchange: str = (
        "INSERT INTO {s}.exchanges (name, type, durable, auto_delete)"
        " VALUES (%(name)s, %(type)s, %(durable)s, %(auto_delete)s)"
        " ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type"
    )
    exchange_type: str = "SELECT type FROM {s}.exchanges WHERE name = %(name)s"
    delete_exchange: str = (
        "WITH b AS (DELETE FROM {s}.bindings WHERE exchange = %(name)s)"
        " DELETE FROM {s}.exchanges WHERE name = %(name)s"
    )
    bind: str = (
        "INSERT INTO {s}.bindings (exchange, routing_key, queue, type, pattern)"
        " VALUES (%(exchange)s, %(rk)s, %(queue)s, %(type)s, %(pattern)s)"
        " ON CONFLICT (exchange, routing_key, queue) DO UPDATE"
        " SET type = EXCLUDED.type, pattern = EXCLUDED.pattern"
    )
    unbind: str = (
        "DELETE FROM {s}.bindings"
        " WHERE exchange = %(exchange)s AND routing_key = %(rk)s AND queue = %(queue)s"
    )
    queue_auto_delete: str = "SELECT auto_delete FROM {s}.queues WHERE name = %(name)s"
    exchange_bindings: str = (
        "SELECT routing_key, pattern, queue FROM {s}.bindings WHERE exchange = %(name)s"
    )
    list_bindings: str = "SELECT queue, exchange, routing_key FROM {s}.bindings"


@dataclass(frozen=True)
class ConsumerStatements:
    """The life of a consumer: registration, heartbeat, leases, reaping."""

    register_consumer: str = (
        "INSERT INTO {s}.consumers (hostname, pid, queues, floors)"
        " VALUES (%(hostname)s, %(pid)s, %(queues)s, true) RETURNING id"
    )
    # No row: the consumer was declared dead (reaped) and must not go on as
    # if nothing happened (see Listener._declared_dead).
    # Also says in how many seconds the next scheduled task of its queues is
    # due (NULL: none), so the consumer can promote it in time.
    # And how far the consumer's clock is from the server's (``clock``: its
    # time.time() as it sent the statement), and how long its claims took
    # (latency.py), for ``celery-pg check`` and the metrics.
    heartbeat: str = (
        "UPDATE {s}.consumers SET heartbeat_at = now(), queues = %(queues)s,"
        " clock_offset_s = extract(epoch FROM now()) - %(clock)s::float8,"
        " claims = %(claims)s::bigint[], claim_seconds = %(claim_seconds)s,"
        " fed_at = coalesce(now() - %(fed_ago)s::float8 * interval '1 second', fed_at)"
        " WHERE id = %(id)s RETURNING id, (" + NEXT_DUE + ")"
    )
    next_due: str = NEXT_DUE
    # Tasks due within ``ahead`` seconds move from ``scheduled`` to their
    # queue in due order (their new ids follow it: FIFO among due tasks), and
    # each queue wakes as many consumers with room as it got tasks. SKIP
    # LOCKED: consumers promoting at the same moment share the rows rather
    # than wait on each other.
    promote: str = (
        "WITH due AS (DELETE FROM {s}.scheduled WHERE id IN ("
        " SELECT id FROM {s}.scheduled WHERE queue = ANY(%(queues)s)"
        "  AND due_at <= now() + %(ahead)s * interval '1 second'"
        " ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " RETURNING queue, rank, payload, expires_at, due_at, id, task_id),"
        " moved AS (INSERT INTO {s}.messages"
        " (queue, rank, payload, created_at, expires_at, task_id)"
        " SELECT queue, rank, payload, LEAST(due_at, now()), expires_at, task_id FROM due"
        " ORDER BY due_at, id RETURNING queue)"
        " SELECT queue, n, " + wake("q.n") + ""
        " FROM (SELECT queue, count(*) AS n FROM moved GROUP BY queue) AS q"
    )
    # A consumer declared dead comes back under its own id, with nothing
    # leased: whatever it claimed after it was reaped goes back.
    reregister_consumer: str = (
        "WITH me AS (INSERT INTO {s}.consumers (id, hostname, pid, queues, floors)"
        " VALUES (%(id)s, %(hostname)s, %(pid)s, %(queues)s, true)"
        " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), queues = EXCLUDED.queues,"
        " floors = true),"
        " back AS (UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL,"
        " redelivered = true WHERE consumer_id = %(id)s RETURNING queue, id),"
        + lower_floors("back")
        + " SELECT queue, "
        + NOTIFY
        + " FROM (SELECT DISTINCT queue FROM back) AS q"
    )
    resume_consumer: str = (
        "UPDATE {s}.consumers SET heartbeat_at = now(), hostname = %(hostname)s,"
        " pid = %(pid)s, queues = %(queues)s WHERE id = %(id)s RETURNING id"
    )
    # A resumed consumer gives back what is leased to it but not in hand.
    release_unheld: str = (
        "WITH back AS ("
        " UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE consumer_id = %(consumer)s AND NOT (id = ANY(%(held)s::bigint[]))"
        " RETURNING queue, id),"
        + lower_floors("back")
        + " SELECT queue, count(*), "
        + NOTIFY
        + " FROM back GROUP BY queue"
    )
    # Consumed queues that expire when unused (x-expires) say they were used,
    # at most every tenth of their expiry (a minute at most): a row rewritten
    # by every consumer's every heartbeat left a dead version of itself each
    # time, which every publish to the queue walked while a transaction held
    # vacuum back. A queue without an expiry is never written.
    touch_queues: str = (
        "UPDATE {s}.queues SET last_used_at = now() WHERE name = ANY(%(queues)s)"
        " AND expires_ms IS NOT NULL AND last_used_at < now()"
        " - least(expires_ms / 10, 60000) * interval '1 millisecond'"
    )
    unregister_consumer: str = (
        "WITH back AS ("
        " UPDATE {s}.messages SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE consumer_id = %(id)s RETURNING queue, id),"
        + lower_floors("back")
        + ", gone AS (DELETE FROM {s}.consumers WHERE id = %(id)s)"
        " SELECT queue, " + NOTIFY + " FROM (SELECT DISTINCT queue FROM back) AS q"
    )
    # A consumer is dead when it has been silent for lease_timeout, or when
    # its session lock is gone and it missed its heartbeats for lock_grace.
    # The lock is probed by trying to take it for this transaction (free
    # means its session is gone), for the few consumers late enough to be
    # suspects only: no scan of pg_locks. Messages are found by arrays of
    # ids, through the indexes: a join planned from statistics that see a
    # few live rows may read a whole index, or the table, instead, rows
    # vacuum is held from removing included. One reaper at a time (``gate``, a
    # transaction lock): the others skip their turn instead of waiting. The
    # dead consumers' messages are found through messages_leased, so the
    # cost follows the number of dead consumers, not of leased messages.
    reap: str = (
        "WITH gate AS (SELECT pg_try_advisory_xact_lock(%(ns)s, -2) AS open),"
        " dead AS ("
        " DELETE FROM {s}.consumers c USING gate WHERE gate.open"
        "  AND (c.heartbeat_at < now() - %(lease_timeout)s * interval '1 second'"
        "   OR CASE WHEN c.heartbeat_at < now() - %(lock_grace)s * interval '1 second'"
        "    THEN pg_try_advisory_xact_lock(%(ns)s, c.id) ELSE false END)"
        " RETURNING c.id),"
        " back AS ("
        " UPDATE {s}.messages m SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE m.consumer_id = ANY(ARRAY(SELECT id FROM dead)) RETURNING m.queue, m.id),"
        + lower_floors("back")
        + ","
        " expired AS ("
        " DELETE FROM {s}.messages WHERE (SELECT open FROM gate)"
        "  AND expires_at < now() AND consumer_id IS NULL RETURNING 1),"
        # Counted for the metrics, when there is something to count.
        " counted AS ("
        + COUNT.format(
            "('reaped_consumers', (SELECT count(*) FROM dead)),"
            " ('reaped_messages', (SELECT count(*) FROM back)),"
            " ('expired_messages', (SELECT count(*) FROM expired))"
        )
        + "),"
        " stale_queues AS ("
        " DELETE FROM {s}.queues q WHERE (SELECT open FROM gate) AND q.expires_ms IS NOT NULL"
        "  AND q.last_used_at < now() - q.expires_ms * interval '1 millisecond'"
        "  AND NOT EXISTS (SELECT 1 FROM {s}.consumers c WHERE q.name = ANY(c.queues))"
        " RETURNING q.name),"
        " stale_bindings AS (DELETE FROM {s}.bindings WHERE queue IN"
        "  (SELECT name FROM stale_queues)),"
        " stale_messages AS (DELETE FROM {s}.messages"
        "  WHERE EXISTS (SELECT 1 FROM stale_queues) AND queue IN (SELECT name FROM stale_queues))"
        " SELECT queue, " + NOTIFY + " FROM (SELECT DISTINCT queue FROM back) AS q"
    )
    # Leases of consumers that no longer exist (a row deleted by hand). The
    # consumer ids holding leases are looked for between the ids of the
    # consumers that exist (one probe of the leased index per gap, its
    # bounds strict): the entries of live consumers, however many, are never
    # walked, including those of the rows they acked that vacuum is held
    # from removing. One orphaned consumer id per gap per search.
    reap_orphans: str = (
        "WITH known AS (SELECT id, lead(id) OVER (ORDER BY id) AS next FROM"
        " (SELECT 0 AS id UNION ALL SELECT id FROM {s}.consumers) AS k),"
        " holders AS (SELECT h.id FROM known CROSS JOIN LATERAL"
        " (SELECT m.consumer_id AS id FROM {s}.messages m WHERE m.consumer_id > known.id"
        "  AND m.consumer_id < coalesce(known.next, 2147483647)"
        "  ORDER BY m.consumer_id LIMIT 1) AS h),"
        " orphans AS ("
        " UPDATE {s}.messages m SET consumer_id = NULL, leased_at = NULL, redelivered = true"
        " WHERE (SELECT pg_try_advisory_xact_lock(%(ns)s, -2))"
        "  AND m.consumer_id = ANY(ARRAY(SELECT h.id FROM holders h"
        "   WHERE NOT EXISTS (SELECT 1 FROM {s}.consumers c WHERE c.id = h.id)))"
        "  AND m.leased_at < now() - %(lease_timeout)s * interval '1 second'"
        " RETURNING m.queue, m.id)," + lower_floors("orphans") + ","
        " counted AS ("
        + COUNT.format("('orphaned_messages', (SELECT count(*) FROM orphans))")
        + ")"
        " SELECT queue, " + NOTIFY + " FROM (SELECT DISTINCT queue FROM orphans) AS q"
    )
    take_lock: str = "SELECT pg_try_advisory_lock(%(ns)s, %(id)s)"
    # A consumer whose loop did not take a wake-up meant for it alone (see
    # turns.py): not hungry until its next claim, and the wake-up passed on.
    step_aside: str = (
        "WITH me AS (UPDATE {s}.consumers SET hungry = false WHERE id = %(consumer)s)"
        " SELECT " + PASS_ON
    )


@dataclass(frozen=True)
class OperationStatements:
    """Dead letters, and what ``celery-pg status`` reads."""

    dead_letter: str = (
        "WITH m AS (DELETE FROM {s}.messages WHERE id = %(id)s"
        " RETURNING id, queue, rank, payload)"
        " INSERT INTO {s}.dead_letters (message_id, queue, rank, payload, reason)"
        " SELECT id, queue, rank, payload, %(reason)s FROM m"
    )
    # A message already taken off the table (no_ack consumers).
    dead_letter_taken: str = (
        "INSERT INTO {s}.dead_letters (message_id, queue, rank, payload, reason)"
        " VALUES (%(id)s, %(queue)s, %(rank)s, %(payload)s, %(reason)s)"
    )
    dead_letter_reason: str = (
        "UPDATE {s}.dead_letters SET reason = %(reason)s WHERE message_id = %(id)s"
    )
    dead_letters_list: str = (
        "SELECT id, message_id, queue, reason, created_at, left(payload, 2000),"
        " octet_length(payload) FROM {s}.dead_letters"
        " WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) ORDER BY id LIMIT %(limit)s"
    )
    # Back to the queue it came from, as a new message (notified at COMMIT).
    dead_letters_retry: str = (
        "WITH d AS (DELETE FROM {s}.dead_letters"
        " WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) RETURNING queue, rank, payload),"
        " m AS (INSERT INTO {s}.messages (queue, rank, payload)"
        " SELECT queue, rank, payload FROM d RETURNING queue)"
        " SELECT queue, count(*), " + NOTIFY + " FROM m GROUP BY queue"
    )
    dead_letters_drop: str = (
        "WITH d AS (DELETE FROM {s}.dead_letters"
        " WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)"
        " AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s)) RETURNING 1)"
        " SELECT count(*) FROM d"
    )
    # -- operations --
    # When each queue's first scheduled task is due (one index probe per queue).
    status_next_due: str = (
        "SELECT w.name, extract(epoch FROM d.due_at - now())::float8"
        " FROM unnest(%(queues)s::text[]) AS w(name) CROSS JOIN LATERAL"
        " (SELECT due_at FROM {s}.scheduled WHERE queue = w.name ORDER BY due_at LIMIT 1) AS d"
    )
    # ETAs of leased messages (held by workers until due), read without
    # parsing the JSON, so that no payload can make this query fail; at most
    # %(cap)s of them (ops.status estimates beyond).
    status_etas: str = (
        'SELECT queue, substring(payload FROM \'"eta":\\s*"([^"]+)"\')'
        " FROM {s}.messages WHERE consumer_id IS NOT NULL LIMIT %(cap)s"
    )
    # A revoke recorded for workers yet to start, until it expires (later, for
    # a task scheduled beyond that: its revoke must outlast its wait).
    # Expired revokes go in the same statement (not the ids being revoked
    # again: a row is changed once per statement), up to 1,000 at a time,
    # found in the expiry's index (ordered and limited, which the planner
    # takes whatever it believes of the table) and removed by primary key.
    record_revokes: str = (
        "WITH expired AS (DELETE FROM {s}.revoked WHERE task_id = ANY(ARRAY("
        "  SELECT e.task_id FROM {s}.revoked e WHERE e.expires_at <= now()"
        "  AND e.task_id <> ALL(%(ids)s::text[]) ORDER BY e.expires_at LIMIT 1000)))"
        " INSERT INTO {s}.revoked AS r (task_id, expires_at)"
        " SELECT v.id, GREATEST(now(), (SELECT max(t.due_at) FROM {s}.scheduled t"
        "  WHERE t.task_id = v.id)) + %(expires)s * interval '1 second'"
        " FROM unnest(%(ids)s::text[]) AS v(id)"
        " ON CONFLICT (task_id) DO UPDATE"
        " SET expires_at = GREATEST(r.expires_at, EXCLUDED.expires_at)"
    )
    pause_queue: str = (
        "INSERT INTO {s}.paused_queues (name) VALUES (%(name)s)"
        " ON CONFLICT (name) DO NOTHING RETURNING name"
    )
    # Resuming wakes the queue's consumers: its backlog drains at once.
    resume_queue: str = (
        "WITH gone AS (DELETE FROM {s}.paused_queues WHERE name = %(name)s RETURNING name)"
        " SELECT queue, " + NOTIFY + " FROM (SELECT name AS queue FROM gone) AS q"
    )
    # ``celery inspect scheduled``: the first ``limit`` scheduled tasks of
    # these queues, reported by the consumer with the lowest id among those
    # consuming each queue, so that no task is listed by two workers.
    inspect_scheduled: str = (
        "SELECT t.payload, t.due_at, t.rank FROM unnest(%(queues)s::text[]) AS w(name)"
        " CROSS JOIN LATERAL (SELECT payload, due_at, rank FROM {s}.scheduled"
        "  WHERE queue = w.name ORDER BY due_at LIMIT %(limit)s) AS t"
        " WHERE NOT EXISTS (SELECT 1 FROM {s}.consumers c"
        "  WHERE w.name = ANY(c.queues) AND c.id < %(me)s)"
        " ORDER BY t.due_at LIMIT %(limit)s"
    )
    status_consumers: str = (
        "SELECT id, hostname, pid, queues, started_at,"
        " extract(epoch FROM now() - heartbeat_at), hungry, extract(epoch FROM now() - fed_at)"
        " FROM {s}.consumers ORDER BY hostname, pid"
    )
