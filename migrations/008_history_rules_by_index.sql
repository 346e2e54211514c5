-- 008: the rules that need a conversation's whole history are kept by unique
-- indexes, so the aggregate state saved with every append holds only what is
-- live (the open turn, calls still waiting for their final result), however
-- long the conversation. An append reads these indexes once per id its batch
-- names (store/store.py Store._known), never the conversation's events.

-- a turn id is used once per conversation
CREATE UNIQUE INDEX IF NOT EXISTS events_turn_started
    ON events (principal, conversation_id, (data ->> 'turn_id'))
    WHERE type = 'turn.started';

-- a tool-call id is used once per conversation
CREATE UNIQUE INDEX IF NOT EXISTS events_tool_call_started
    ON events (principal, conversation_id, (data ->> 'tool_call_id'))
    WHERE type = 'tool_call.started';

-- a call has at most one final (ok or error) result; `pending` ones may come before it
CREATE UNIQUE INDEX IF NOT EXISTS events_final_result
    ON events (principal, conversation_id, (data ->> 'tool_call_id'))
    WHERE type = 'tool.result' AND (data ->> 'status') <> 'pending';
