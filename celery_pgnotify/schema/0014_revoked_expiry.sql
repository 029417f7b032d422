-- Each revoke removes the records that have expired (see record_revokes):
-- found by their expiry, not by reading the whole table, which held every
-- revoke of the last hours.
CREATE INDEX revoked_expiring ON {s}.revoked (expires_at);
