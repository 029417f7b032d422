-- A dead letter remembers the message it was and its priority, so that it
-- can be put back as it was.
ALTER TABLE {s}.dead_letters ADD COLUMN message_id bigint,
    ADD COLUMN rank smallint NOT NULL DEFAULT 0;
CREATE INDEX dead_letters_queue ON {s}.dead_letters (queue, id);
CREATE INDEX dead_letters_message ON {s}.dead_letters (message_id);
