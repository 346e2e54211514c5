"""Append cost on a long agent loop vs a new conversation (issue 8's measure).

    .venv/bin/python -m bench.state_growth [TURNS] [SAMPLES]    # defaults 2000 300

Builds a conversation of TURNS finished turns with one answered tool call each
(5 events a turn), then makes SAMPLES single-event appends to it and as many to
a new conversation, alternating so the machine's noise hits both alike. Prints
the saved aggregate state's size (pg_column_size), the append p50 and the WAL
each append writes (pg_current_wal_insert_lsn before/after; other sessions'
WAL counts too, so run it on a quiet server). Uses the test set-up's database
discovery (tests/pg.py) and drops its database at the end.
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid

import asyncpg

from store import NewEvent, Store
from tests.helpers import finished_tool_turn as tool_turn
from tests.pg import TestServer


async def main(turns: int = 2000, samples: int = 300) -> None:
    server = TestServer()
    await server.start()
    url = await server.create_database()
    try:
        conn = await asyncpg.connect(url)
        store = await Store.open(url, pool_size=4, writers=1)
        principal = "bench"
        long = uuid.UUID((await store.create_conversation(principal))["id"])
        for start in range(0, turns, 200):
            await store.append(principal, long, [e for n in range(start, start + 200) for e in tool_turn(n)])
        new = uuid.UUID((await store.create_conversation(principal))["id"])
        await store.append(principal, new, tool_turn(0))
        sizes = {}
        for label, cid in (("long", long), ("new", new)):
            sizes[label] = await conn.fetchval("SELECT pg_column_size(state) FROM conversations WHERE id = $1", cid)
        # one single-event append at a time, alternating, so noise hits both alike
        times = {"long": [], "new": []}
        wal = {"long": [], "new": []}
        for i in range(samples):
            for label, cid in (("long", long), ("new", new)):
                before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
                t0 = time.perf_counter()
                await store.append(principal, cid, [NewEvent("conversation.titled", {"title": f"x{i}"})])
                times[label].append(time.perf_counter() - t0)
                after = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
                wal[label].append(await conn.fetchval("SELECT $1::pg_lsn - $2::pg_lsn", after, before))
        p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
        walm = {k: statistics.median(v) for k, v in wal.items()}
        print(f"conversation with {turns} finished tool turns ({turns * 5 + 1} events) vs a new one, {samples} appends each")
        print(f"  saved state: {sizes['long']} B vs {sizes['new']} B")
        print(f"  append p50: {p50['long']:.2f} ms vs {p50['new']:.2f} ms  ratio {p50['long'] / p50['new']:.2f}x")
        print(f"  WAL per append (median): {walm['long']:.0f} B vs {walm['new']:.0f} B  ratio {walm['long'] / walm['new']:.2f}x")
        await store.close()
        await conn.close()
    finally:
        await server.close()


if __name__ == "__main__":
    asyncio.run(main(*(int(a) for a in sys.argv[1:])))
