-- 003: find a turn's start by its id (GET /turns/{turn_id}/stream) without
-- scanning the conversation: a partial index over turn.started events only.
CREATE INDEX IF NOT EXISTS events_turn_started
    ON events (conversation_id, (data ->> 'turn_id'))
    WHERE type = 'turn.started';
