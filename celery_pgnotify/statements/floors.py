"""Raising the queues' floors (floors.py): below a queue's floor no message
is ready, so claims skip those index entries without visiting their rows."""

from __future__ import annotations

from dataclasses import dataclass

# The smallest id of a ready message of queue f.queue at or above f.floor:
# the head of each priority in use, one index probe each.
_LOWEST_READY = (
    "WITH RECURSIVE heads(r, id) AS ((SELECT rank, id FROM {s}.messages"
    "  WHERE queue = f.queue AND consumer_id IS NULL AND id >= f.floor"
    "  ORDER BY rank DESC, id LIMIT 1)"
    " UNION ALL SELECT h.rank, h.id FROM heads CROSS JOIN LATERAL"
    "  (SELECT rank, id FROM {s}.messages m WHERE m.queue = f.queue"
    "  AND m.consumer_id IS NULL AND m.id >= f.floor AND m.rank < heads.r"
    "  ORDER BY m.rank DESC, m.id LIMIT 1) h)"
    " SELECT min(id) FROM heads"
)
# This database's sessions holding ``messages`` open for writing, as
# virtual transaction ids (prepared transactions' included).
_WRITERS = (
    "SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{}') FROM pg_locks l"
    " WHERE l.locktype = 'relation' AND l.relation = %(messages)s::regclass"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.mode = 'RowExclusiveLock' AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid()"
)


@dataclass(frozen=True)
class FloorStatements:
    """The floor raiser's statements, in the order it runs them."""

    # Every consumed queue has a floor row (0: skips nothing).
    floors_seed: str = (
        "INSERT INTO {s}.queue_floors (queue, floor)"
        " SELECT DISTINCT q.name, 0 FROM {s}.consumers c CROSS JOIN LATERAL unnest(c.queues)"
        " AS q(name) ORDER BY 1 ON CONFLICT (queue) DO NOTHING"
    )
    # One raiser at a time; and how many consumers there are to take turns.
    # The raiser holds every floor row, which every requeue of the fleet
    # writes: should its process stall mid-transaction (frozen, swapped
    # out), the server ends the session after ``idle`` ms idle in it,
    # releasing them, instead of holding every requeue up with it.
    floors_gate: str = (
        "SELECT pg_try_advisory_xact_lock(%(ns)s, -3), (SELECT count(*) FROM {s}.consumers),"
        " set_config('idle_in_transaction_session_timeout', %(idle)s, true)"
    )
    # The last mark, and whether every session writing ``messages`` then has
    # ended since: then no transaction still running holds an id up to it.
    # And whether a consumer that does not lower floors is registered.
    floors_mark: str = (
        "SELECT m.seq, NOT EXISTS (SELECT 1 FROM pg_locks l"
        "  WHERE l.virtualtransaction = ANY(m.writers)),"
        " EXISTS (SELECT 1 FROM {s}.consumers c WHERE NOT c.floors)"
        " FROM (SELECT 1) AS one LEFT JOIN {s}.floor_mark m ON m.id = 1"
    )
    # Held until COMMIT: a requeue lowering a floor meanwhile waits for the
    # raise, then lowers its result; one that lowered first is seen by it.
    floors_hold: str = "SELECT queue FROM {s}.queue_floors ORDER BY queue FOR UPDATE"
    floors_raise: str = (
        "UPDATE {s}.queue_floors f SET floor = LEAST(%(seq)s + 1,"
        " coalesce((" + _LOWEST_READY + "), %(seq)s + 1))"
        " WHERE f.floor <= %(seq)s"
    )
    # While a worker older than the floors is registered, now and then: a
    # ready message below its floor (made ready by such a worker, which does
    # not lower floors) lowers it. It reads below the floors, row by row: the
    # one statement whose cost grows while vacuum is held back.
    floors_check: str = (
        "UPDATE {s}.queue_floors f SET floor = below.id FROM (SELECT g.queue,"
        " (SELECT min(m.id) FROM {s}.messages m WHERE m.queue = g.queue"
        "  AND m.consumer_id IS NULL AND m.id < g.floor) AS id FROM {s}.queue_floors g) below"
        " WHERE f.queue = below.queue AND below.id IS NOT NULL RETURNING f.queue, f.floor"
    )
    # The identity's value now (read before the writers are: a transaction
    # handed an id up to it already holds its lock on ``messages``) ...
    messages_seq: str = (
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence(%(messages)s, 'id')), 0)"
    )
    # ... and the sessions writing ``messages`` now: the next raise may go up
    # to that value once every one of them has ended.
    floors_write_mark: str = (
        "INSERT INTO {s}.floor_mark AS m (id, seq, writers)"
        " SELECT 1, %(seq)s, (" + _WRITERS + ")"
        " ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, writers = EXCLUDED.writers"
    )
