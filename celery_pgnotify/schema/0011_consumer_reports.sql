-- What the metrics read beside the queues (``celery-pg metrics``, ``check``).
-- Each consumer reports, with every heartbeat, how far its host's clock is
-- from the server's (a worker runs the ETAs it holds by its own clock, beat
-- fires by its own) and how long its claims took: a count per latency bucket
-- (``metrics.CLAIM_BUCKETS``) and their sum, since it started.
ALTER TABLE {s}.consumers ADD COLUMN clock_offset_s double precision;
ALTER TABLE {s}.consumers ADD COLUMN claims bigint[];
ALTER TABLE {s}.consumers ADD COLUMN claim_seconds double precision;
-- Events too rare to have a table of their own, counted since the schema
-- was created: messages the reaper put back, dead consumers, expired messages.
CREATE TABLE {s}.counters (
    name   text PRIMARY KEY,
    value  bigint NOT NULL
);
