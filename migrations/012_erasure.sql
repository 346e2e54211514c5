-- 012: erasure (DELETE /v1/conversations/{id}). A conversation's events,
-- its derived rows and its conversations row are removed for good by ONE
-- function, chatlog_erase_conversation, which leaves a tombstone in the same
-- transaction. It is the only way past the append-only guard.

-- What is left of an erased conversation: who owned it, when it went, and
-- what the log held (so a digest taken before still accounts for it). No
-- content: no metadata, no title, no event.
CREATE TABLE IF NOT EXISTS erased_conversations (
    principal       text        NOT NULL,
    conversation_id uuid        NOT NULL,
    erased_at       timestamptz NOT NULL,
    event_count     integer     NOT NULL,
    last_seq        integer     NOT NULL,
    -- the hash of its last event (conversations.head_hash, migration 011)
    head_hash       text,
    PRIMARY KEY (principal, conversation_id)
);

-- The guard of migrations 001/005, with its one exception. A DELETE of an
-- event goes through only when (a) the transaction-local setting
-- chatlog.erasing names the event's conversation ('<id>/<principal>'), which
-- chatlog_erase_conversation sets right before its DELETE and clears right
-- after, and (b) that conversation already has its tombstone. UPDATE and
-- TRUNCATE are refused always.
--
-- What this does NOT stop: the setting is an ordinary custom setting, so any
-- session allowed to DELETE from events (the table's owner, a superuser) can
-- set it by hand; and an owner or superuser can disable the triggers outright.
-- (b) makes such a DELETE leave a tombstone, which nothing can remove while
-- the triggers are on. Against someone who turns them off, the hash chain and
-- digests kept elsewhere are the defence: they detect what the guard cannot
-- prevent (README, "What the log guarantees").
CREATE OR REPLACE FUNCTION chatlog_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- nested IFs: OLD is null in the statement-level TRUNCATE trigger and must not be read there
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'events' THEN
        IF current_setting('chatlog.erasing', true) = OLD.conversation_id::text || '/' || OLD.principal
           AND EXISTS (SELECT 1 FROM erased_conversations t
                        WHERE t.principal = OLD.principal AND t.conversation_id = OLD.conversation_id) THEN
            RETURN OLD;
        END IF;
    END IF;
    IF TG_TABLE_NAME = 'erased_conversations' THEN
        RAISE EXCEPTION 'chatlog tombstones are permanent (append-only): % on % is not allowed', TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RAISE EXCEPTION 'chatlog events are append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Tombstones are append-only too, in every session mode (as 005 does for events).
DROP TRIGGER IF EXISTS erased_conversations_append_only ON erased_conversations;
CREATE TRIGGER erased_conversations_append_only
    BEFORE UPDATE OR DELETE ON erased_conversations
    FOR EACH ROW EXECUTE FUNCTION chatlog_refuse_change();
DROP TRIGGER IF EXISTS erased_conversations_no_truncate ON erased_conversations;
CREATE TRIGGER erased_conversations_no_truncate
    BEFORE TRUNCATE ON erased_conversations
    FOR EACH STATEMENT EXECUTE FUNCTION chatlog_refuse_change();
ALTER TABLE erased_conversations ENABLE ALWAYS TRIGGER erased_conversations_append_only;
ALTER TABLE erased_conversations ENABLE ALWAYS TRIGGER erased_conversations_no_truncate;

-- The runner's rows name a conversation and carry its content (a queued
-- request holds the user's message): with a foreign key, none can be written
-- for a conversation once it is erased, whatever process was about to, so
-- none outlives its erasure. (Conversations were never deleted before this
-- migration, so no row lacks its conversation; any such row is dropped.)
DELETE FROM turn_runs t WHERE NOT EXISTS (
    SELECT 1 FROM conversations c WHERE c.principal = t.principal AND c.id = t.conversation_id);
DELETE FROM turn_continuations t WHERE NOT EXISTS (
    SELECT 1 FROM conversations c WHERE c.principal = t.principal AND c.id = t.conversation_id);
ALTER TABLE turn_runs DROP CONSTRAINT IF EXISTS turn_runs_conversation_fkey;
ALTER TABLE turn_runs ADD CONSTRAINT turn_runs_conversation_fkey
    FOREIGN KEY (principal, conversation_id) REFERENCES conversations (principal, id);
ALTER TABLE turn_continuations DROP CONSTRAINT IF EXISTS turn_continuations_conversation_fkey;
ALTER TABLE turn_continuations ADD CONSTRAINT turn_continuations_conversation_fkey
    FOREIGN KEY (principal, conversation_id) REFERENCES conversations (principal, id);

-- Erase one conversation: its tombstone, or NULL when the principal has no
-- such conversation (never had one, or it is already erased).
--
-- Races. It takes the advisory lock every write of this conversation takes
-- first (store/writer.py: hashtextextended('<id>/<principal>', 0)), then the
-- row lock appends take, so an append or a creation of this id runs wholly
-- before it (and is erased with the rest) or wholly after it (and finds the
-- conversation gone, or the tombstone). Its DELETEs run after those locks,
-- each with a fresh snapshot: nothing committed before it is left behind.
--
-- Everything keyed by the conversation goes: events, history_snapshots,
-- ui_snapshots, turn_continuations, turn_runs, the conversations row.
-- (secrets and runners name no conversation.) Deleting events creates no
-- feed position, so the feed's no-skip argument (store/feed.py) is untouched:
-- a reader simply no longer finds these events after the positions it has.
--
-- NOTIFY chatlog_erased '<id>:<principal>' (delivered at COMMIT): every
-- process ends its live streams of the conversation and stops its turns.
CREATE OR REPLACE FUNCTION chatlog_erase_conversation(p_principal text, p_id uuid)
RETURNS erased_conversations
LANGUAGE plpgsql AS $$
DECLARE
    head      conversations;
    tombstone erased_conversations;
    removed   bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_id::text || '/' || p_principal, 0));
    SELECT * INTO head FROM conversations WHERE principal = p_principal AND id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    -- the tombstone first: the guard lets the events go only once it exists
    INSERT INTO erased_conversations (principal, conversation_id, erased_at, event_count, last_seq, head_hash)
    VALUES (p_principal, p_id, clock_timestamp(),
            (SELECT count(*) FROM events WHERE principal = p_principal AND conversation_id = p_id),
            head.seq, head.head_hash)
    RETURNING * INTO tombstone;

    PERFORM set_config('chatlog.erasing', p_id::text || '/' || p_principal, true);
    DELETE FROM events WHERE principal = p_principal AND conversation_id = p_id;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('chatlog.erasing', '', true);
    IF removed <> tombstone.event_count THEN  -- the locks above make this impossible; say so if not
        RAISE EXCEPTION 'erasing %: counted % events but deleted %', p_id, tombstone.event_count, removed;
    END IF;

    DELETE FROM history_snapshots WHERE principal = p_principal AND conversation_id = p_id;
    DELETE FROM ui_snapshots WHERE principal = p_principal AND conversation_id = p_id;
    DELETE FROM turn_continuations WHERE principal = p_principal AND conversation_id = p_id;
    DELETE FROM turn_runs WHERE principal = p_principal AND conversation_id = p_id;
    DELETE FROM conversations WHERE principal = p_principal AND id = p_id;

    PERFORM pg_notify('chatlog_erased', p_id::text || ':' || p_principal);
    RETURN tombstone;
END
$$;
