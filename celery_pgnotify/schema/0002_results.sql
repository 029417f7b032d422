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
