-- A message's task id (Celery's ``id`` header), so that a claim can see
-- whether its task was revoked.
ALTER TABLE {s}.messages ADD COLUMN task_id text;

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
-- Queues no claim takes from until resumed; publishing goes on.
CREATE TABLE {s}.paused_queues (
    name       text PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now()
);

-- Enqueue from SQL: writes a Celery (protocol 2, JSON) task message any
-- Celery worker accepts, in the caller's transaction, and returns its id.
-- ``priority`` is stored as given: 9 runs first, as with the default
-- priority_order 'desc'. A countdown over 10 seconds waits in ``scheduled``
-- until a consumer of the queue moves it there when due.
CREATE OR REPLACE FUNCTION {s}.send_task(
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
