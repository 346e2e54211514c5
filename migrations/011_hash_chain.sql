-- 011: the hash chain (domain/chain.py). Each event's hash is SHA-256 over the
-- previous event's hash and the JCS form of the event; the conversation's row
-- keeps the last one, so an append chains from the row it already locks and
-- never reads an earlier event.
--
-- JCS in SQL is not sensible, so the events stored before this migration get
-- their hashes from Python, right after the SQL files (store/migrate.py,
-- backfill_hashes: conversations in batches, resumable); then events.hash
-- becomes NOT NULL.

ALTER TABLE events ADD COLUMN IF NOT EXISTS hash text;
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS head_hash text;

-- From now on no event is written without its hash, whichever code writes it
-- (a server of the previous version still running is refused rather than
-- leaving a hole in a chain). NOT VALID: the rows already there are filled
-- in by the backfill, which then validates it.
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_hash_present;
ALTER TABLE events ADD CONSTRAINT events_hash_present CHECK (hash IS NOT NULL) NOT VALID;
