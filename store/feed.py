"""The global feed: every event of a principal, in commit order, exactly once.

Why it never skips, without a global lock per append:

* An event's position is `(xid << 16) + index`, where xid is the top-level id of
  the transaction that wrote it (`pg_current_xact_id()`) and index its place in
  that transaction. Ordering by position is ordering by (xid, index).
* A reader only returns events whose xid is below `pg_snapshot_xmin` of its own
  statement's snapshot. Every transaction with an xid below xmin has ended, so
  all of its events are visible now or never will be (it aborted).
* Any transaction that commits later has an xid >= that xmin, so all its
  positions are >= (xmin << 16): greater than every position returned so far.
  A reader that resumes after the last position it got therefore misses
  nothing and sees nothing twice.

The price: the feed lags behind the oldest transaction still running in the
cluster (any database), typically milliseconds. Long transactions delay the
feed; they never break it.
"""

from __future__ import annotations

import asyncpg

from store.rows import EVENT_COLUMNS, event_dict

_READ = f"""
SELECT {EVENT_COLUMNS}
  FROM events
 WHERE principal = $1
   AND position > $2
   AND position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)
 -- ordered like the (principal, position) index, so the planner walks it
 -- even before ANALYZE has seen the table
 ORDER BY principal, position
 LIMIT $3
"""


async def read(pool: asyncpg.Pool, principal: str, after_position: int, limit: int) -> list[dict]:
    return [event_dict(r) for r in await pool.fetch(_READ, principal, after_position, limit)]
