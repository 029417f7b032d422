-- Whether a task is revoked (see revoking.py): one probe of the primary key
-- per message a claim takes, whatever the planner believes of the table. A
-- claim's plan is made once per session; made while ``revoked`` was empty,
-- it read the whole table for each message once a burst of revokes had
-- filled it, until the table was next analysed. The function's own plan is
-- made with sequential scans off.
CREATE FUNCTION {s}.is_revoked(task text) RETURNS boolean
    LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $is_revoked$
BEGIN
    RETURN EXISTS (SELECT 1 FROM {s}.revoked r
                   WHERE r.task_id = is_revoked.task AND r.expires_at > now());
END
$is_revoked$;
