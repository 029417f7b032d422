-- The schema as celery-pgnotify declares it, at version 14: what the
-- migrations (NNNN_*.sql in this folder, applied in order) build, in one
-- reading. A new schema is created from this file; an existing one is brought
-- up to date by the migrations it lacks. tests/test_schema.py checks that both
-- roads end in the same tables, columns, indexes, constraints and functions.
--
-- {s} stands for the quoted schema name, {schema} for the name itself.

-- The broker: queues, exchanges and their bindings, consumers, messages and
-- dead letters.
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
    queues        text[] NOT NULL DEFAULT '{}',
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    -- its last claim got fewer messages than it asked for: it has room, and
    -- waits to be woken (see fragments.WAKE); when a claim last got messages
    -- (reported with its heartbeat)
    hungry        boolean NOT NULL DEFAULT false,
    fed_at        timestamptz NOT NULL DEFAULT now(),
    -- the server's clock minus the consumer host's, at its last heartbeat
    -- (the one-way latency of the heartbeat included)
    clock_offset_s  double precision,
    -- its claims since it started: a count per latency bucket
    -- (metrics.CLAIM_BUCKETS) and their total time, reported with heartbeats
    claims          bigint[],
    claim_seconds   double precision,
    -- it lowers floors when it requeues (see floors.py); false for workers
    -- older than schema version 12
    floors          boolean NOT NULL DEFAULT false
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
    redelivered  boolean NOT NULL DEFAULT false,
    task_id      text
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX messages_ready ON {s}.messages (queue, rank DESC, id) WHERE consumer_id IS NULL;
CREATE INDEX messages_leased ON {s}.messages (consumer_id) WHERE consumer_id IS NOT NULL;
CREATE INDEX messages_expiring ON {s}.messages (expires_at) WHERE expires_at IS NOT NULL;
-- Tasks whose ETA lies ahead wait here, where no claim looks, until a
-- consumer of their queue moves them to ``messages`` when due: neither
-- workers' memory nor the queue's ready index holds them meanwhile.
CREATE TABLE {s}.scheduled (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text NOT NULL,
    rank        smallint NOT NULL DEFAULT 0,
    payload     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    due_at      timestamptz NOT NULL,
    task_id     text
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX scheduled_due ON {s}.scheduled (queue, due_at);
CREATE INDEX scheduled_task ON {s}.scheduled (task_id) WHERE task_id IS NOT NULL;
-- Revokes that outlive the workers: a task revoked while no worker runs is
-- still revoked when one starts (``revoke()`` records it here as well as
-- broadcasting it), until ``expires_at``.
CREATE TABLE {s}.revoked (
    task_id     text PRIMARY KEY,
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
-- Each revoke removes the expired records, found by their expiry.
CREATE INDEX revoked_expiring ON {s}.revoked (expires_at);
-- Whether a task is revoked: one probe of the primary key per message a
-- claim takes, whatever the planner believes of the table (a claim's plan,
-- made once per session while the table was empty, would read all of it per
-- message after a burst of revokes, until the table was next analysed).
CREATE FUNCTION {s}.is_revoked(task text) RETURNS boolean
    LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $is_revoked$
BEGIN
    RETURN EXISTS (SELECT 1 FROM {s}.revoked r
                   WHERE r.task_id = is_revoked.task AND r.expires_at > now());
END
$is_revoked$;
-- Queues no claim takes from until resumed; publishing goes on.
CREATE TABLE {s}.paused_queues (
    name       text PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now()
);
-- A queue's floor: no ready message of the queue has a smaller id (claims
-- skip the index entries below it unvisited). Requeues lower it in their
-- own statement; one consumer at a time raises it, never past an id a
-- transaction still running may hold, which ``floor_mark`` proves: the
-- identity's value at one moment and the sessions writing ``messages`` then.
CREATE TABLE {s}.queue_floors (
    queue  text PRIMARY KEY,
    floor  bigint NOT NULL
);
CREATE TABLE {s}.floor_mark (
    id       integer PRIMARY KEY CHECK (id = 1),
    seq      bigint NOT NULL,
    writers  text[] NOT NULL
);
-- Whose turn it is to be woken among a queue's consumers with room (see
-- fragments.wake_hungry): a sequence, which a held horizon does not bloat.
CREATE SEQUENCE {s}.wake_turns;
-- Events too rare to have a table of their own, counted since the schema
-- was created (the reaper's work): read by the metrics.
CREATE TABLE {s}.counters (
    name   text PRIMARY KEY,
    value  bigint NOT NULL
);
CREATE TABLE {s}.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text NOT NULL,
    payload     text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    message_id  bigint,
    rank        smallint NOT NULL DEFAULT 0
);
CREATE INDEX dead_letters_queue ON {s}.dead_letters (queue, id);
CREATE INDEX dead_letters_message ON {s}.dead_letters (message_id);

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
    expires_at  timestamptz,
    -- someone waits for this result: storing it notifies (see await_results)
    waited      boolean NOT NULL DEFAULT false
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

-- Each chord header task counts once, however often its increment is
-- retried (a lost connection after COMMIT) or the task is redelivered.
CREATE TABLE {s}.chord_parts (
    group_id    text NOT NULL,
    task_id     text NOT NULL,
    expires_at  timestamptz,
    PRIMARY KEY (group_id, task_id)
);
CREATE INDEX chord_parts_expiring ON {s}.chord_parts (expires_at) WHERE expires_at IS NOT NULL;

-- Beat leadership is a lease, renewed by the leader, taken over once it runs
-- out; ``term`` grows with every change of holder and fences every firing.
CREATE TABLE {s}.beat_leader (
    id          integer PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    term        bigint NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- Enqueue from SQL: writes a Celery (protocol 2, JSON) task message any
-- Celery worker accepts, in the caller's transaction, and returns its id.
-- ``priority`` is stored as given: 9 runs first, as with the default
-- priority_order 'desc'. A countdown over 10 seconds waits in ``scheduled``
-- until a consumer of the queue moves it there when due.
CREATE FUNCTION {s}.send_task(
    task_name  text,
    args       jsonb DEFAULT '[]',
    kwargs     jsonb DEFAULT '{}',
    queue      text DEFAULT 'celery',
    countdown  double precision DEFAULT NULL,
    priority   integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
-- A SECURITY INVOKER function still resolves unqualified names through the
-- caller's search_path: fixed, so no schema of the caller's can shadow a
-- built-in the function calls.
SET search_path = pg_catalog, pg_temp
AS $send_task$
#variable_conflict use_variable
DECLARE
    task_id  uuid := gen_random_uuid();
    body     text;
    eta      text;
    message  text;
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
    message := jsonb_build_object(
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
                'ignore_result', false, 'stamped_headers', NULL, 'stamps', '{}'::jsonb),
            'properties', jsonb_build_object(
                'correlation_id', task_id, 'reply_to', '', 'delivery_mode', 2,
                'delivery_info', jsonb_build_object('exchange', '', 'routing_key', queue),
                'priority', coalesce(priority, 0), 'body_encoding', 'base64')
        )::text;
    IF countdown > 10 THEN
        INSERT INTO {s}.scheduled (queue, rank, payload, due_at, task_id) VALUES (
            queue, coalesce(priority, 0), message,
            clock_timestamp() + countdown * interval '1 second', task_id::text);
        RETURN task_id;
    END IF;
    INSERT INTO {s}.messages (queue, rank, payload, task_id)
        VALUES (queue, coalesce(priority, 0), message, task_id::text);
    -- Wake consumers at COMMIT, only if some consumer reads the queue.
    IF EXISTS (SELECT 1 FROM {s}.consumers c WHERE queue = ANY(c.queues)) THEN
        PERFORM pg_notify('pgn_' || left(md5('{schema}'), 8) || '_' || md5(queue), '');
    END IF;
    RETURN task_id;
END
$send_task$;
