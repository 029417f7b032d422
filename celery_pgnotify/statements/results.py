"""The result backend's and beat's statements."""

from __future__ import annotations

from dataclasses import dataclass

from celery_pgnotify.statements.fragments import EXPIRES_AT, LIVE, NO_FLUSH

# A row a waiter made before its task's result was stored (see
# ``await_results``) holds no result: reads pass it by.
STORED = "octet_length(meta) > 0"


@dataclass(frozen=True)
class ResultStatements:
    """The result backend: results, groups, chords, their expiry."""

    # One statement stores and wakes the waiter, if there is one: a result
    # nobody waits for notifies nobody (a NOTIFY serialises committing
    # transactions, and wakes every listening session of the database). A
    # SUCCESS is final (a lost worker's late FAILURE must not overwrite it),
    # unless it already expired.
    store_result: str = (
        "INSERT INTO {s}.results AS r (task_id, status, meta, name, args, kwargs,"
        " worker, retries, queue, traceback, date_done, expires_at)"
        " VALUES (%(id)s, %(status)s, %(meta)s, %(name)s, %(args)s, %(kwargs)s,"
        " %(worker)s, %(retries)s, %(queue)s, %(traceback)s,"
        " CASE WHEN %(ready)s THEN now() END, " + EXPIRES_AT + ")"
        " ON CONFLICT (task_id) DO UPDATE SET status = EXCLUDED.status,"
        " meta = EXCLUDED.meta, name = coalesce(EXCLUDED.name, r.name),"
        " args = coalesce(EXCLUDED.args, r.args), kwargs = coalesce(EXCLUDED.kwargs, r.kwargs),"
        " worker = coalesce(EXCLUDED.worker, r.worker), retries = EXCLUDED.retries,"
        " queue = coalesce(EXCLUDED.queue, r.queue), traceback = EXCLUDED.traceback,"
        " date_done = EXCLUDED.date_done, expires_at = EXCLUDED.expires_at"
        " WHERE r.status <> 'SUCCESS' OR r.expires_at <= now()"
        " RETURNING CASE WHEN r.waited THEN pg_notify(%(channel)s, '') END"
    )
    # A waiter says it waits, after it LISTENs and before it reads: a result
    # stored later finds ``waited`` and notifies. The same row is written by
    # both, so neither can miss the other: a store in flight makes this wait
    # for its commit, and the read that follows sees it. A waiter's row holds
    # no result (``STORED``) and expires like one (a day when results never do).
    await_results: str = (
        "INSERT INTO {s}.results AS r (task_id, status, meta, waited, expires_at)"
        " SELECT id, 'PENDING', ''::bytea, true, now()"
        "  + coalesce(nullif(%(expires)s::float8, 0), 86400) * interval '1 second'"
        " FROM unnest(%(ids)s::text[]) AS w(id) WHERE " + NO_FLUSH + ""
        " ON CONFLICT (task_id) DO UPDATE SET waited = true WHERE NOT r.waited"
    )
    get_result: str = (
        "SELECT meta FROM {s}.results WHERE task_id = %(id)s AND " + LIVE + " AND " + STORED
    )
    get_results: str = (
        "SELECT task_id, meta FROM {s}.results WHERE task_id = ANY(%(ids)s) AND "
        + LIVE
        + " AND "
        + STORED
    )
    save_group: str = (
        "INSERT INTO {s}.result_groups AS g (group_id, meta, expires_at)"
        " VALUES (%(id)s, %(meta)s, " + EXPIRES_AT + ")"
        " ON CONFLICT (group_id) DO UPDATE SET meta = EXCLUDED.meta,"
        " expires_at = EXCLUDED.expires_at"
    )
    get_group: str = "SELECT meta FROM {s}.result_groups WHERE group_id = %(id)s AND " + LIVE
    # Atomic: concurrent header tasks each see a distinct count.
    # Once per header task (``part``): a repeated increment reads the count.
    chord_incr_once: str = (
        "WITH part AS (INSERT INTO {s}.chord_parts (group_id, task_id, expires_at)"
        " VALUES (%(id)s, %(part)s, " + EXPIRES_AT + ")"
        " ON CONFLICT DO NOTHING RETURNING group_id),"
        " bumped AS (INSERT INTO {s}.chord_counters AS c (group_id, counter, expires_at)"
        " SELECT group_id, 1, " + EXPIRES_AT + " FROM part"
        " ON CONFLICT (group_id) DO UPDATE SET counter = c.counter + 1,"
        " expires_at = EXCLUDED.expires_at RETURNING counter)"
        " SELECT counter FROM bumped UNION ALL SELECT counter FROM {s}.chord_counters"
        " WHERE group_id = %(id)s AND NOT EXISTS (SELECT 1 FROM part)"
    )
    chord_incr: str = (
        "INSERT INTO {s}.chord_counters AS c (group_id, counter, expires_at)"
        " VALUES (%(id)s, 1, " + EXPIRES_AT + ")"
        " ON CONFLICT (group_id) DO UPDATE SET counter = c.counter + 1,"
        " expires_at = EXCLUDED.expires_at RETURNING counter"
    )
    cleanup_results: str = (
        "WITH r AS (DELETE FROM {s}.results WHERE expires_at <= now() RETURNING 1),"
        " g AS (DELETE FROM {s}.result_groups WHERE expires_at <= now() RETURNING 1),"
        " c AS (DELETE FROM {s}.chord_counters WHERE expires_at <= now() RETURNING 1),"
        " p AS (DELETE FROM {s}.chord_parts WHERE expires_at <= now())"
        " SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM g), (SELECT count(*) FROM c)"
    )
    # Every key-value table of the result backend is deleted from, and given a
    # new lifetime, by key the same way.
    delete_result: str = "DELETE FROM {s}.results WHERE task_id = %(id)s"
    delete_group: str = "DELETE FROM {s}.result_groups WHERE group_id = %(id)s"
    delete_chord: str = "DELETE FROM {s}.chord_counters WHERE group_id = %(id)s"
    expire_result: str = (
        "UPDATE {s}.results SET expires_at = " + EXPIRES_AT + " WHERE task_id = %(id)s"
    )
    expire_group: str = (
        "UPDATE {s}.result_groups SET expires_at = " + EXPIRES_AT + " WHERE group_id = %(id)s"
    )
    expire_chord: str = (
        "UPDATE {s}.chord_counters SET expires_at = " + EXPIRES_AT + " WHERE group_id = %(id)s"
    )


@dataclass(frozen=True)
class BeatStatements:
    """Beat's schedule state and its leader lease."""

    beat_state: str = (
        "SELECT name, schedule, last_run_at, total_run_count FROM {s}.beat_entries"
        " WHERE name = ANY(%(names)s)"
    )
    # New entries start from the last_run_at Celery gives them; existing ones
    # keep their state and take the (possibly changed) schedule.
    beat_register: str = (
        "INSERT INTO {s}.beat_entries AS e (name, schedule, last_run_at)"
        " SELECT * FROM unnest(%(names)s::text[], %(schedules)s::text[],"
        "  %(last_runs)s::timestamptz[])"
        " ON CONFLICT (name) DO UPDATE SET schedule = EXCLUDED.schedule,"
        " updated_at = now() WHERE e.schedule <> EXCLUDED.schedule"
    )
    beat_forget_others: str = "DELETE FROM {s}.beat_entries WHERE NOT (name = ANY(%(names)s))"
    # The firing itself: succeeds for exactly one process per (entry, last
    # run), and only for the holder of the current lease (the fence: the
    # lease row is share-locked, so no takeover commits before the firing).
    beat_advance: str = (
        "WITH lead AS (SELECT 1 FROM {s}.beat_leader WHERE id = 1 AND holder = %(holder)s"
        " AND term = %(term)s AND expires_at > now() FOR SHARE)"
        " UPDATE {s}.beat_entries SET last_run_at = %(new)s, last_due_at = %(due)s,"
        " total_run_count = total_run_count + 1, updated_at = now()"
        " WHERE name = %(name)s AND last_run_at IS NOT DISTINCT FROM %(old)s"
        " AND EXISTS (SELECT 1 FROM lead) RETURNING total_run_count"
    )
    # Take the lease if it ran out, or renew it if it is ours: the term of
    # the lease held, or no row.
    beat_lead: str = (
        "INSERT INTO {s}.beat_leader AS l (id, holder, term, expires_at)"
        " VALUES (1, %(holder)s, 1, now() + %(lease)s * interval '1 second')"
        " ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder,"
        " expires_at = EXCLUDED.expires_at,"
        " term = CASE WHEN l.holder = EXCLUDED.holder THEN l.term ELSE l.term + 1 END"
        " WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()"
        " RETURNING term"
    )
    beat_resign: str = (
        "UPDATE {s}.beat_leader SET expires_at = now() WHERE id = 1 AND holder = %(holder)s"
    )
