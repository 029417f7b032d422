"""Pieces of SQL the statements of several rooms share (``{s}``: the
quoted schema, ``{nf}``: see :data:`NO_FLUSH`, ``{dur}``: :data:`DURABLE`
or :data:`NO_FLUSH`, by the ``durable_publish`` transport option)."""

from __future__ import annotations

EXPIRY = (
    "LEAST(now() + %(ttl)s::bigint * interval '1 millisecond', "
    "now() + {q}.message_ttl_ms * interval '1 millisecond')"
)
NOTIFY = "pg_notify(%(prefix)s || md5(queue), '')"
# A claim takes nothing from a paused queue (one probe of a tiny table).
NOT_PAUSED = "NOT EXISTS (SELECT 1 FROM {s}.paused_queues p WHERE p.name = %(queue)s)"

# Appended to the statements a consumer runs (claim, ack, requeue): they
# commit without waiting for the WAL flush. A server crash can undo the last
# of them, and an undone claim or ack only delivers a message again; the
# message itself was committed by its publish, which always waits. Rendered
# as ``true`` when the ``async_acks`` transport option is off.
NO_FLUSH = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"

# Prepended to a publish's conditions: the message's COMMIT waits for the
# WAL flush even when the server, database or role runs with
# synchronous_commit off (a stronger setting, such as remote_apply, stays).
DURABLE = (
    "(SELECT set_config('synchronous_commit', CASE current_setting('synchronous_commit')"
    " WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, true)) IS NOT NULL"
)

# A queue table's statistics are seldom right: analysed while a queue was
# short (or never, with autovacuum off), the planner expects a few rows and
# picks a bitmap scan plus a sort of the whole backlog for every claim, so a
# drain of n messages costs O(n^2); reading messages_ready in its order stops
# after the rows wanted. Sessions that claim run only this module's
# statements, none of which needs a sort of more than a few rows, so sorting
# is off for them; and JIT too: a plan priced with a disabled sort (a
# requeue orders its queues) would be compiled for each run, about 1.8 s.
# Sequential scans are off as well: a session keeps its statements' plans,
# and one made while ``messages`` was empty (a quiet queue, vacuumed) read
# the whole table to find a row by its id, for every claim and ack, once a
# burst had filled it, until the table was next analysed. Every statement
# here reaches its rows through an index.
CLAIMING_SESSION = (
    "SELECT set_config('enable_sort', 'off', false), set_config('jit', 'off', false),"
    " set_config('enable_seqscan', 'off', false)"
)

# A row's end of life: ``expires`` seconds from now, or never when NULL/0.
EXPIRES_AT = "now() + nullif(%(expires)s::float8, 0) * interval '1 second'"
LIVE = "(expires_at IS NULL OR expires_at > now())"


# Seconds until the first scheduled task of %(queues)s is due (one index
# probe per queue), NULL when none is.
NEXT_DUE = (
    "SELECT extract(epoch FROM min(d.due_at) - now())::float8"
    " FROM unnest(%(queues)s::text[]) AS w(name) CROSS JOIN LATERAL"
    " (SELECT due_at FROM {s}.scheduled WHERE queue = w.name ORDER BY due_at LIMIT 1) AS d"
)
# The NOTIFY channel of one consumer for one queue: ``prefix || md5(id/queue)``.
CONSUMER_CHANNEL = "%(prefix)s || md5({id} || '/' || queue)"


def wake_hungry(count: str) -> str:
    """Notify up to ``count`` consumers of ``queue`` that have room (hungry),
    each on its own channel, taking turns (``wake_turns``: a sequence, which
    no held transaction horizon bloats, where a row written at each claim
    would be); NULL when none is hungry. Consumers whose heartbeat is older
    than ``%(fresh)s`` seconds may be gone and are passed over."""
    return (
        "(SELECT bool_or(pg_notify(" + CONSUMER_CHANNEL.format(id="t.id") + ", '') IS NULL)"
        " FROM (SELECT c.id, row_number() OVER (ORDER BY c.id) - 1 AS nth,"
        "  count(*) OVER () AS total FROM {s}.consumers c WHERE queue = ANY(c.queues)"
        "  AND c.hungry AND c.heartbeat_at > now() - %(fresh)s * interval '1 second') AS t,"
        " (SELECT nextval('{s}.wake_turns') AS turn) AS v"
        " WHERE (t.nth - v.turn %% t.total + t.total) %% t.total < " + count + ")"
    )


def wake(count: str) -> str:
    """Wake for ``count`` new messages of ``queue``: as many hungry consumers,
    else (none has room, or none is known to) every consumer of the queue,
    on the queue's channel: a consumer whose prefetch window has room claims;
    the others remember the queue and claim once room frees. Every idle
    LISTEN session of the database runs a transaction per notifying commit,
    whatever the channel, so waking one consumer saves the claims of the
    others, not their reading of the notification.

    Nobody is notified when no consumer reads the queue (NOTIFY serialises
    committing transactions; a publish nobody waits for should not pay it),
    nor when the queue is paused (its consumers could claim nothing).
    Whether any consumer reads the queue is judged as the statement runs;
    a statement in a transaction of the caller's (``%(wake_all)s``: inside
    ``enqueue_in``) may commit long after, when a consumer registered
    meanwhile has looked at its queues already: it notifies the queue's
    channel whatever it saw, or the message would wait for the fallback
    re-read."""
    return (
        "CASE WHEN NOT EXISTS (SELECT 1 FROM {s}.paused_queues p WHERE p.name = queue) THEN"
        " coalesce(" + wake_hungry(count) + ","
        " CASE WHEN %(wake_all)s"
        "  OR EXISTS (SELECT 1 FROM {s}.consumers c WHERE queue = ANY(c.queues))"
        "  THEN " + NOTIFY + " IS NULL END) END"
    )


WAKE = wake("1")
SCHEDULED = ", due_at, task_id"
DUE = ", %(due)s, %(task_id)s"


def publish_routed_into(table: str, columns: str, values: str, wake: str) -> str:
    """Insert one row per queue the exchange routes to, then ``wake`` each."""
    return (
        f"INSERT INTO {{s}}.{table} (queue, rank, payload, expires_at{columns})"
        " SELECT DISTINCT b.queue, %(rank)s, %(payload)s, "
        + EXPIRY.format(q="q")
        + values
        + " FROM {s}.bindings b LEFT JOIN {s}.queues q ON q.name = b.queue"
        " WHERE {dur} AND b.exchange = %(exchange)s AND (b.type = 'fanout'"
        "  OR (b.type = 'direct' AND b.routing_key = %(rk)s)"
        "  OR (b.type = 'topic' AND ('.' || %(rk)s) ~ b.pattern))"
        " RETURNING queue, " + wake
    )


def publish_direct_into(table: str, columns: str, values: str, wake: str) -> str:
    """Insert into the queue named by the routing key, then ``wake`` it."""
    return (
        f"INSERT INTO {{s}}.{table} (queue, rank, payload, expires_at{columns})"
        " SELECT %(queue)s, %(rank)s, %(payload)s, LEAST(now() + %(ttl)s::bigint"
        "  * interval '1 millisecond', (SELECT now() + q.message_ttl_ms"
        "  * interval '1 millisecond' FROM {s}.queues q WHERE q.name = %(queue)s))"
        + values
        + " WHERE {dur} RETURNING queue, "
        + wake
    )


# Adds to the ``counters`` named in ``{}`` (``('name', count)`` rows), writing
# nothing when every count is 0.
COUNT = (
    "INSERT INTO {{s}}.counters AS k (name, value)"
    " SELECT name, n FROM (VALUES {}) AS v(name, n) WHERE n > 0"
    " ON CONFLICT (name) DO UPDATE SET value = k.value + EXCLUDED.value"
)


# A claim reads nothing below its queue's floor (one probe of a tiny table):
# the index entries of rows long acked, kept while vacuum is held back, are
# skipped without visiting their rows.
ABOVE_FLOOR = (
    "id >= (SELECT coalesce(max(f.floor), 0) FROM {s}.queue_floors f WHERE f.queue = %(queue)s)"
)


def lower_floors(back: str) -> str:
    """A CTE lowering the floor of each queue the CTE ``back`` (``queue, id``
    of the messages it made ready again) put messages back on, in the same
    statement: a floor's raiser holds its row while it reads the queue, so
    either it sees these messages or this waits and lowers its result (see
    floors.py). A queue without a floor gets one at 0, which skips nothing;
    rows in queue order, so that two of these never wait on each other."""
    return (
        f" lowered AS (INSERT INTO {{s}}.queue_floors AS f (queue, floor)"
        f" SELECT queue, 0 FROM {back} GROUP BY queue ORDER BY queue"
        f" ON CONFLICT (queue) DO UPDATE SET floor = LEAST(f.floor,"
        f" (SELECT min(b.id) FROM {back} b WHERE b.queue = EXCLUDED.queue)))"
    )
