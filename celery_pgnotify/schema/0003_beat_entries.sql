-- Beat: one row per schedule entry. ``last_run_at`` moves forward only by a
-- compare-and-set in the transaction that also publishes the firing.
CREATE TABLE {s}.beat_entries (
    name             text PRIMARY KEY,
    schedule         text NOT NULL,
    last_run_at      timestamptz,
    last_due_at      timestamptz,
    total_run_count  integer NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
