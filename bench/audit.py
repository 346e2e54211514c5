"""What the audit trail costs and how fast it is checked (issue 11):

- appends with the hash chain vs without it: two `Store`s on one database, one
  as the app opens it and one with `hash_chain=False` (a bench-only switch:
  its events carry a placeholder hash no verify accepts); 200 producers,
  batches of 10 `text.delta` in open turns, rounds alternating C N / N C; the
  ratio is the median of the rounds' ratios (goal: the chain costs < 10 %,
  i.e. ≥ 0.9×);
- verify: `store/audit.check` (what `GET …/verify` and `chatlog verify` run)
  over one 100,000-event conversation (10,000 with --quick): events/s;
- digest: `store/audit.digest` (what `chatlog digest` prints) over 100,000
  conversations (2,000 with --quick), plus writing it as JSON: seconds. The
  conversations are copies of one real row (a digest reads each
  conversation's row, not its events).
"""

from __future__ import annotations

import statistics
import time
import uuid

import orjson

from bench.core import Bench
from bench.store_level import PRINCIPAL, deltas, open_turn, rate
from store import NewEvent, Store
from store import audit


async def chain_cost(bench: Bench, url: str) -> None:
    rounds, seconds, producers = (2, 1.0, 50) if bench.quick else (6, 3.0, 200)
    chained = await Store.open(url, pool_size=10, writers=4)
    plain = await Store.open(url, pool_size=10, writers=4, hash_chain=False)
    try:
        convs = {"C": [await open_turn(chained) for _ in range(producers)],
                 "N": [await open_turn(plain) for _ in range(producers)]}
        stores = {"C": chained, "N": plain}
        got: dict[str, list[float]] = {"C": [], "N": []}
        ratios = []
        for k in range(rounds):
            for v in (("C", "N") if k % 2 == 0 else ("N", "C")):
                got[v].append(await rate(stores[v], convs[v], 10, seconds))
            ratios.append(got["C"][-1] / got["N"][-1])
            bench.progress(f"round {k + 1}: chained {got['C'][-1]:,.0f}, without {got['N'][-1]:,.0f} events/s")
        ratio = statistics.median(ratios)
        bench.row(f"Store.append with the hash chain, {producers} producers, batch 10", statistics.median(got["C"]),
                  "events/s", ratio=ratio, ratio_of="the same without hashing (side by side)", goal="≥ 0.9×",
                  met=ratio >= 0.9,
                  note=f"median of {rounds} rounds' ratios, min–max {min(ratios):.2f}–{max(ratios):.2f}; without "
                       f"hashing {statistics.median(got['N']):,.0f} events/s")
    finally:
        await chained.close()
        await plain.close()


async def verify_speed(bench: Bench, url: str) -> None:
    events = 10_000 if bench.quick else 100_000
    store = await Store.open(url, pool_size=4, writers=2)
    try:
        cid = await open_turn(store)
        for start in range(0, events - 2, 1000):
            await store.append(PRINCIPAL, cid, deltas("t", min(1000, events - 2 - start)))
        await store.append(PRINCIPAL, cid, [NewEvent("turn.finished", {"turn_id": "t", "finish_reason": "stop"})])
    finally:
        await store.close()
    conn = await audit.connect(url)
    try:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            verdict, head = await audit.check(conn, PRINCIPAL, cid)
            runs.append(time.perf_counter() - t0)
            if not verdict.ok or verdict.verified_through_seq != head:
                raise RuntimeError(f"verify of an untouched conversation failed: {verdict}")
        best = statistics.median(runs)
        bench.progress(f"verify: {head:,} events in {best:.2f} s")
        bench.row(f"verify one {head:,}-event conversation (GET …/verify, chatlog verify)", head / best, "events/s",
                  note=f"median of {len(runs)} runs, {best * 1000:,.0f} ms each; read in pages of "
                       f"{audit.PAGE:,} in one repeatable-read transaction, every hash recomputed")
    finally:
        await conn.close()


async def digest_time(bench: Bench, url: str) -> None:
    count = 2_000 if bench.quick else 100_000
    store = await Store.open(url, pool_size=2, writers=1)
    try:
        seed = uuid.uuid4()
        await store.create_conversation(PRINCIPAL, seed, {"metadata": {"bench": True}})
        await store.append(PRINCIPAL, seed, [NewEvent("message.user", {"content": "hi"})])
    finally:
        await store.close()
    conn = await audit.connect(url)
    try:
        # copies of the seed's row under new ids (the digest reads rows, not events)
        await conn.execute(
            """INSERT INTO conversations (id, principal, seq, created_at, updated_at, metadata, title, open_turn_id,
                                          state, head_hash)
               SELECT gen_random_uuid(), principal, seq, created_at, updated_at, metadata, title, open_turn_id,
                      state, head_hash
                 FROM conversations, generate_series(1, $2)
                WHERE principal = $3 AND id = $1""", seed, count - 1, PRINCIPAL)
        await conn.execute("ANALYZE conversations")
        total = await conn.fetchval("SELECT count(*) FROM conversations")
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            digest = await audit.digest(conn)
            size = len(orjson.dumps(digest, option=orjson.OPT_INDENT_2))
            runs.append(time.perf_counter() - t0)
        if len(digest["conversations"]) != total:
            raise RuntimeError(f"the digest has {len(digest['conversations'])} of {total} conversations")
        best = statistics.median(runs)
        bench.progress(f"digest: {total:,} conversations in {best:.2f} s")
        bench.row(f"digest of {total:,} conversations (chatlog digest)", best, "s",
                  note=f"median of {len(runs)} runs; read, root hash and JSON ({size / 1e6:.1f} MB)")
    finally:
        await conn.close()


async def run(bench: Bench) -> None:
    url = await bench.database()
    await chain_cost(bench, url)
    await verify_speed(bench, await bench.database())
    await digest_time(bench, await bench.database())
