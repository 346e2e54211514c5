-- 006: snapshots of the UI stream translator's state (projections/ui.py), so a
-- format=ui reader that connects or resumes deep into a long conversation
-- folds at most a few hundred events instead of all of them. Derived data,
-- like history_snapshots: any row may be deleted at any time.
CREATE TABLE IF NOT EXISTS ui_snapshots (
    conversation_id uuid    NOT NULL REFERENCES conversations (id),
    seq             integer NOT NULL,
    version         integer NOT NULL,
    state           bytea   NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
