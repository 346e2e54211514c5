-- 003: find a turn's start and end by its id (GET /turns/{turn_id}/stream)
-- without scanning the conversation: a partial index over turn events only.
CREATE INDEX IF NOT EXISTS events_turn_bounds
    ON events (conversation_id, (data ->> 'turn_id'))
    WHERE type IN ('turn.started', 'turn.finished', 'turn.cancelled', 'turn.failed');
