-- 009: events.tx_id repeated what `position` already says (position >> 16 is
-- the writing transaction's xid, store/positions.py): one place for it.
ALTER TABLE events DROP COLUMN IF EXISTS tx_id;
