-- Wake one consumer, not all: a consumer says whether it has room
-- (``hungry``: its last claim got fewer messages than it asked for) and when
-- it was last fed; a publish wakes the hungry consumer fed longest ago, on a
-- channel of that consumer's own.
ALTER TABLE {s}.consumers ADD COLUMN hungry boolean NOT NULL DEFAULT false;
ALTER TABLE {s}.consumers ADD COLUMN fed_at timestamptz NOT NULL DEFAULT now();
