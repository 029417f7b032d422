-- A stored result notifies only when someone waits for it: a waiter marks
-- the task's row (creating it, empty, when the result is not there yet).
ALTER TABLE {s}.results ADD COLUMN waited boolean NOT NULL DEFAULT false;
