-- 004: server-side secrets shared by every chatlog process on this database.
-- The stream-token key lives here so a token minted by one process is accepted
-- by all others (resume on another process), without configuration.
-- CHATLOG_TOKEN_SECRET, when set, wins over this row.
CREATE TABLE IF NOT EXISTS secrets (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- gen_random_uuid() draws from pg_strong_random(); two of them and a hash give
-- a 256-bit key.
INSERT INTO secrets (name, value)
VALUES ('stream_token',
        encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex'))
ON CONFLICT (name) DO NOTHING;
