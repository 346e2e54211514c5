"""The global feed: every event of a principal, exactly once, in an order
consistent with every conversation's seq.

Why it never skips, without a global lock per append:

* An event's position is `(xid << 16) + index` (store/positions.py), where xid
  is the top-level id of the transaction that wrote it and index its place in
  that transaction. Ordering by position is ordering by (xid, index).
* Every transaction that writes the log holds the shared WRITER_LOCK from
  before it has an xid until after it has ended (store/writer.py takes it
  first; PostgreSQL releases locks only after a transaction has left the
  running set).
* A read first takes a watermark W in one statement: its snapshot S1 lists
  the transactions running (xip) and xmax, the next xid to be handed out;
  W = the smallest running xid whose backend holds WRITER_LOCK, else xmax.
  The events are then read by a SECOND statement, whose snapshot S2 is newer,
  and only those with position < W << 16 are returned.
* Every writer with xid < W has ended before S2: if it was not running at S1
  it had ended then; if it was running, its backend did not hold WRITER_LOCK
  when the lock table was read (after S1), which for a writer means it had
  ended (a non-writer writes no events). So all its events are visible in S2
  or never will be (it aborted).
* Any writer that commits later has an xid >= W, so all its positions are
  >= W << 16: greater than every position returned so far. A reader that
  resumes after the last position it got therefore misses nothing and sees
  nothing twice.

The price: the feed lags behind the oldest log-writing transaction still
running, typically milliseconds. Other work on the server (other databases,
other applications' tables, a long report) does not hold it back.
"""

from __future__ import annotations

import asyncpg

from store import metrics
from store.positions import INDEX_BITS, WRITER_LOCK
from store.rows import EVENT_COLUMNS, event_dict

_WATERMARK = f"""
WITH snap AS MATERIALIZED (SELECT pg_current_snapshot() AS s),
writers AS MATERIALIZED (
    SELECT own.transactionid
      FROM pg_locks writer JOIN pg_locks own ON own.pid = writer.pid
     WHERE writer.locktype = 'advisory' AND writer.granted
       AND writer.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND writer.classid = {WRITER_LOCK[0]} AND writer.objid = {WRITER_LOCK[1]} AND writer.objsubid = 2
       -- every transaction holds an exclusive lock on its own xid
       AND own.locktype = 'transactionid' AND own.mode = 'ExclusiveLock' AND own.granted)
SELECT coalesce((SELECT min(x) FROM snap, pg_snapshot_xip(snap.s) AS x
                  WHERE x::xid IN (SELECT transactionid FROM writers)),
                (SELECT pg_snapshot_xmax(s) FROM snap))::text::bigint,
       -- the newest: how far the watermark is behind it is a metric
       (SELECT pg_snapshot_xmax(s) FROM snap)::text::bigint
"""

_READ = f"""
SELECT {EVENT_COLUMNS}
  FROM events
 WHERE principal = $1
   AND position > $2
   AND position < $3
 -- ordered like the (principal, position) index, so the planner walks it
 -- even before ANALYZE has seen the table
 ORDER BY principal, position
 LIMIT $4
"""


async def read(conn: asyncpg.Connection, principal: str, after_position: int, limit: int) -> list[dict]:
    # two statements, in this order: the proof above needs the events'
    # snapshot to be taken after the watermark's lock check
    watermark, newest = await conn.fetchrow(_WATERMARK)
    metrics.FEED_LAG.observe(newest - watermark)
    rows = await conn.fetch(_READ, principal, after_position, watermark << INDEX_BITS, limit)
    return [event_dict(r) for r in rows]
