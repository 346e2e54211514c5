-- 010: the turn runner's tables (runner/, store/turns.py). The log stays the
-- truth about every turn that began; these hold what the log cannot: a
-- request waiting for its turn, which process runs a turn, whether that
-- process is alive, and which long-running tools a finished turn still waits
-- on. Deleting a finished row changes no projection.

-- One row per serving process, renewed by its heartbeat. A process whose
-- lease_until has passed counts as dead: its turns are closed as
-- `interrupted`, its claimed-but-unstarted requests go back to the queue.
CREATE TABLE IF NOT EXISTS runners (
    id          text PRIMARY KEY,
    lease_until timestamptz NOT NULL
);

-- One row per turn the runner was asked for.
--   queued             kept durably; nothing written to the log yet
--   starting           claimed by `owner`; its message and turn.started are being written
--   running            `owner` is calling the model
--   waiting_for_tools  `owner` waits for tool.result events
--   ended              closed in the log (how: the closing event says)
--   dropped            a queued request cancelled before it began
CREATE TABLE IF NOT EXISTS turn_runs (
    principal       text NOT NULL,
    conversation_id uuid NOT NULL,
    turn_id         text NOT NULL,
    request_id      text,
    request         jsonb NOT NULL,
    status          text NOT NULL,
    owner           text,
    arrival         bigint GENERATED ALWAYS AS IDENTITY,
    created_at      timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (principal, conversation_id, turn_id)
);
-- the same request_id is the same turn, whichever process gets the repeat:
-- this index decides the race
CREATE UNIQUE INDEX IF NOT EXISTS turn_runs_request_id
    ON turn_runs (principal, conversation_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS turn_runs_queued ON turn_runs (arrival) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS turn_runs_live ON turn_runs (owner) WHERE status IN ('starting', 'running', 'waiting_for_tools');

-- A step whose calls got `pending` results: when every call in `waiting` has
-- its final result, a continuation turn is queued, once (its request_id is
-- 'continuation:<turn_id>:<step>', unique by the index above). The trigger
-- below does it in the very transaction that stores the final result, so it
-- happens exactly once whichever process, or client, delivers the result,
-- and whatever process is alive then.
CREATE TABLE IF NOT EXISTS turn_continuations (
    principal       text NOT NULL,
    conversation_id uuid NOT NULL,
    turn_id         text NOT NULL,
    step            int NOT NULL,
    waiting         text[] NOT NULL,
    request         jsonb NOT NULL,
    PRIMARY KEY (principal, conversation_id, turn_id, step)
);

CREATE OR REPLACE FUNCTION turn_continuation_after_final_result() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    FOR c IN
        UPDATE turn_continuations
           SET waiting = array_remove(waiting, NEW.data ->> 'tool_call_id')
         WHERE principal = NEW.principal AND conversation_id = NEW.conversation_id
           AND waiting @> ARRAY[NEW.data ->> 'tool_call_id']
        RETURNING *
    LOOP
        IF cardinality(c.waiting) = 0 THEN
            INSERT INTO turn_runs (principal, conversation_id, turn_id, request_id, request, status)
            VALUES (c.principal, c.conversation_id, gen_random_uuid()::text,
                    'continuation:' || c.turn_id || ':' || c.step, c.request, 'queued')
            ON CONFLICT DO NOTHING;
            DELETE FROM turn_continuations
             WHERE principal = c.principal AND conversation_id = c.conversation_id
               AND turn_id = c.turn_id AND step = c.step;
            PERFORM pg_notify('chatlog_turns', 'queued');
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

-- Only final results fire it (the WHEN is checked per row before any call:
-- deltas pay one comparison).
DROP TRIGGER IF EXISTS events_turn_continuation ON events;
CREATE TRIGGER events_turn_continuation
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.type = 'tool.result' AND NEW.data ->> 'status' <> 'pending')
    EXECUTE FUNCTION turn_continuation_after_final_result();
