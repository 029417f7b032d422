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
