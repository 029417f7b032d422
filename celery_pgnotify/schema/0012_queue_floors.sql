-- A queue's floor: no ready message of the queue has a smaller id. Claims
-- skip the index entries below it without visiting their rows, which
-- matters when a long transaction elsewhere keeps vacuum from removing the
-- rows of acked messages (see floors.py). Requeues lower it in their own
-- statement; one consumer at a time raises it, to at most an id every
-- transaction that could have been handed a smaller one has since ended,
-- which ``floor_mark`` records: the identity's value then, and the virtual
-- transaction ids of the sessions writing ``messages`` then.
CREATE TABLE {s}.queue_floors (
    queue  text PRIMARY KEY,
    floor  bigint NOT NULL
);
CREATE TABLE {s}.floor_mark (
    id       integer PRIMARY KEY CHECK (id = 1),
    seq      bigint NOT NULL,
    writers  text[] NOT NULL
);
-- Whose turn it is to be woken among a queue's consumers with room: a
-- sequence, which no held transaction horizon bloats (a claim used to write
-- its consumer's row each time it was fed).
CREATE SEQUENCE {s}.wake_turns;
-- Whether the consumer lowers floors when it requeues (this version on):
-- while one that does not is registered, the raiser looks below the floors.
ALTER TABLE {s}.consumers ADD COLUMN floors boolean NOT NULL DEFAULT false;
