-- 002: snapshots of the message-history fold (projections/history.py).
-- Derived data, NOT part of the log: any row may be deleted at any time and no
-- answer changes; reads then fold from an earlier snapshot or from seq 1.
-- A snapshot at seq N is valid forever, because events 1..N never change.

CREATE TABLE IF NOT EXISTS history_snapshots (
    conversation_id uuid    NOT NULL REFERENCES conversations (id),
    seq             integer NOT NULL,
    -- the fold's state-format version; a reader ignores other versions
    version         integer NOT NULL,
    -- orjson bytes, not jsonb: loading a snapshot is on the read path, and
    -- bytea skips jsonb's parse on write and re-serialisation on read
    state           bytea   NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);

-- at_time reads: the last seq committed at or before a moment.
CREATE INDEX IF NOT EXISTS events_by_time ON events (conversation_id, created_at);
