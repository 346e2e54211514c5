-- 007: a conversation id is unique per principal, not across principals.
-- Before, creating (or forking into) an id that another tenant already used
-- answered 409 conversation_exists, which told the caller that the id exists
-- somewhere. Now every key that names a conversation starts with its
-- principal: another tenant's id is, to anyone else, just a free id.

ALTER TABLE events DROP CONSTRAINT IF EXISTS events_conversation_id_fkey;
ALTER TABLE history_snapshots DROP CONSTRAINT IF EXISTS history_snapshots_conversation_id_fkey;
ALTER TABLE ui_snapshots DROP CONSTRAINT IF EXISTS ui_snapshots_conversation_id_fkey;

ALTER TABLE conversations DROP CONSTRAINT IF EXISTS conversations_pkey;
ALTER TABLE conversations ADD CONSTRAINT conversations_pkey PRIMARY KEY (principal, id);

ALTER TABLE events DROP CONSTRAINT IF EXISTS events_pkey;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (principal, conversation_id, seq);
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_conversation_id_id_key;
ALTER TABLE events ADD CONSTRAINT events_event_id_key UNIQUE (principal, conversation_id, id);
ALTER TABLE events ADD CONSTRAINT events_conversation_fkey
    FOREIGN KEY (principal, conversation_id) REFERENCES conversations (principal, id);

-- Snapshots are derived data (any row may go at any time): emptied, then keyed
-- by principal too, and by their fold's version: keyed on (conversation, seq)
-- alone, the rows of an old version would block a new version's snapshots at
-- the same seqs for good (ON CONFLICT DO NOTHING), and every cold read would
-- fold from seq 1. Reads rebuild them as they pass.
DELETE FROM history_snapshots;
DELETE FROM ui_snapshots;
ALTER TABLE history_snapshots ADD COLUMN IF NOT EXISTS principal text NOT NULL;
ALTER TABLE ui_snapshots ADD COLUMN IF NOT EXISTS principal text NOT NULL;
ALTER TABLE history_snapshots DROP CONSTRAINT IF EXISTS history_snapshots_pkey;
ALTER TABLE history_snapshots ADD CONSTRAINT history_snapshots_pkey PRIMARY KEY (principal, conversation_id, version, seq);
ALTER TABLE ui_snapshots DROP CONSTRAINT IF EXISTS ui_snapshots_pkey;
ALTER TABLE ui_snapshots ADD CONSTRAINT ui_snapshots_pkey PRIMARY KEY (principal, conversation_id, version, seq);
ALTER TABLE history_snapshots ADD CONSTRAINT history_snapshots_conversation_fkey
    FOREIGN KEY (principal, conversation_id) REFERENCES conversations (principal, id);
ALTER TABLE ui_snapshots ADD CONSTRAINT ui_snapshots_conversation_fkey
    FOREIGN KEY (principal, conversation_id) REFERENCES conversations (principal, id);
