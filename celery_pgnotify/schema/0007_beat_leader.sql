-- Beat leadership is a lease, renewed by the leader, taken over once it runs
-- out; ``term`` grows with every change of holder and fences every firing.
CREATE TABLE {s}.beat_leader (
    id          integer PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    term        bigint NOT NULL,
    expires_at  timestamptz NOT NULL
);
