-- Each consumer reports, with every heartbeat, how far its host's clock is
-- from the server's (``celery-pg check``): a worker runs ETAs and countdowns
-- it holds by its own clock, beat fires by its own.
ALTER TABLE {s}.consumers ADD COLUMN clock_offset_s double precision;
