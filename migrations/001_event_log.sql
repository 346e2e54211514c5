-- 001: the event log. The events table is the single source of truth; the
-- conversations table holds what appends need to check the rules cheaply.

CREATE TABLE IF NOT EXISTS conversations (
    id            uuid        PRIMARY KEY,
    -- the tenant that created it; every read filters on it (others get 404)
    principal     text        NOT NULL,
    -- last seq written; appends lock this row (FOR UPDATE), which serialises
    -- writers of ONE conversation and nobody else (message-db's idea, scoped
    -- to a stream instead of a category)
    seq           integer     NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    title         text,
    open_turn_id  text,
    -- the aggregate's rule state at `seq`, rewritten in the append's own
    -- transaction, so an append never re-reads the conversation's events
    state         jsonb       NOT NULL
);

CREATE INDEX IF NOT EXISTS conversations_by_principal
    ON conversations (principal, created_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS events (
    conversation_id uuid        NOT NULL REFERENCES conversations (id),
    -- 1, 2, 3 ... per conversation; the primary key makes a gap or a double
    -- impossible and is the optimistic-concurrency check of last resort
    seq             integer     NOT NULL,
    -- place in the global feed: (transaction id << 16) + index in that
    -- transaction. Ordering by it is ordering by (xid, index), which is what
    -- makes the feed's xmin watermark exact (see store/feed.py).
    position        bigint      NOT NULL,
    -- the client's idempotency key, or a server-made UUID; unique within the
    -- conversation so one tenant's keys can never collide with another's
    id              text        NOT NULL,
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    principal       text        NOT NULL,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, id)
);

-- The feed reads one principal's events by position.
CREATE INDEX IF NOT EXISTS events_feed ON events (principal, position);

-- Append-only, enforced by the database itself: no role, no code path, no
-- psql session can change or remove a stored event.
CREATE OR REPLACE FUNCTION chatlog_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'chatlog events are append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DROP TRIGGER IF EXISTS events_append_only ON events;
CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION chatlog_refuse_change();

DROP TRIGGER IF EXISTS events_no_truncate ON events;
CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION chatlog_refuse_change();
