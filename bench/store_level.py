"""The store on its own (`store.Store`, in the bench process), the cells of the
former bench/append.py:

- group commit vs one transaction per append: `Store.open(dsn, pool_size=10,
  writers=4)` as the app opens it, against the same class with
  `max_group_events=1` (every group holds one append, so each append gets its
  own transaction); 32 appenders, batches of 1 and 10 `text.delta` in open
  turns; back-to-back pairs alternating G S / S G, the ratio is the median of
  the pairs' ratios;
- the p50 and p99 of a lone 1-event append;
- a 1-event append on a long conversation (100,000 events; 10,000 with
  --quick) vs a 10-event one, alternating: per-append cost must not depend on
  the history's length;
- reads: the global feed vs `read_events` of one conversation, 1000-event
  pages (after ANALYZE), alternating.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from bench.core import Bench
from store import NewEvent, Store, create_pool

PRINCIPAL = "bench"
TEXTS = [" the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def deltas(turn_id: str, n: int) -> list[NewEvent]:
    return [NewEvent("text.delta", {"turn_id": turn_id, "text": TEXTS[k % len(TEXTS)]}) for k in range(n)]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


async def open_turn(store: Store, with_deltas: int = 0) -> uuid.UUID:
    cid = uuid.uuid4()
    await store.create_conversation(PRINCIPAL, cid, {"metadata": {"bench": True}})
    await store.append(PRINCIPAL, cid, [NewEvent("turn.started", {"turn_id": "t"})] + deltas("t", with_deltas))
    return cid


async def rate(store: Store, convs: list[uuid.UUID], batch: int, seconds: float) -> float:
    events, count = deltas("t", batch), [0]
    t0 = time.perf_counter()

    async def appender(cid: uuid.UUID) -> None:
        while time.perf_counter() - t0 < seconds:
            await store.append(PRINCIPAL, cid, events)
            count[0] += batch

    await asyncio.gather(*(appender(c) for c in convs))
    return count[0] / (time.perf_counter() - t0)


async def group_commit(bench: Bench, grouped: Store, single: Store) -> None:
    pairs, seconds = (1, 0.5) if bench.quick else (8, 1.0)
    convs = [await open_turn(grouped) for _ in range(32)]
    stores = {"G": grouped, "S": single}
    for batch in (1, 10):
        got: dict[str, list[float]] = {"G": [], "S": []}
        ratios = []
        for k in range(pairs):
            for v in (("G", "S") if k % 2 == 0 else ("S", "G")):
                got[v].append(await rate(stores[v], convs, batch, seconds))
            ratios.append(got["G"][-1] / got["S"][-1])
        g = statistics.median(got["G"])
        bench.progress(f"32 appenders, batch {batch}: group {g:,.0f} events/s, ratio {statistics.median(ratios):.2f}")
        bench.row(f"Store.append, group commit, 32 appenders, batch {batch}", g, "events/s",
                  ratio=statistics.median(ratios), ratio_of="one transaction per append (max_group_events=1)",
                  note=f"median of {pairs} pairs' ratios, min–max {min(ratios):.2f}–{max(ratios):.2f}; "
                       f"one-transaction-per-append {statistics.median(got['S']):,.0f} events/s")


async def latency_and_length(bench: Bench, store: Store) -> None:
    samples = 100 if bench.quick else 1000
    long_events = 10_000 if bench.quick else 100_000
    short = await open_turn(store, with_deltas=8)
    lone = []
    for _ in range(samples):
        t = time.perf_counter()
        await store.append(PRINCIPAL, short, deltas("t", 1))
        lone.append(time.perf_counter() - t)
    bench.row("a lone 1-event append, p50", pct(lone, 50) * 1000, "ms",
              note=f"p99 {pct(lone, 99) * 1000:.2f} ms over {samples} appends, nothing else running")

    long = uuid.uuid4()
    await store.create_conversation(PRINCIPAL, long, {"metadata": {"bench": "long"}})
    turns = long_events // 1000
    t0 = time.perf_counter()
    for t in range(turns):
        last = t == turns - 1
        events = [NewEvent("turn.started", {"turn_id": f"t{t}"})] + deltas(f"t{t}", 999 if last else 998)
        if not last:
            events.append(NewEvent("turn.finished", {"turn_id": f"t{t}", "finish_reason": "stop"}))
        written = (await store.append(PRINCIPAL, long, events)).last_seq
    bench.progress(f"built a {written:,}-event conversation in {time.perf_counter() - t0:.1f} s")
    shorts = [await open_turn(store, with_deltas=8) for _ in range(50)]
    got: dict[str, list[float]] = {"short": [], "long": []}
    for i in range(samples):
        pair = [("short", shorts[i % len(shorts)], "t"), ("long", long, f"t{turns - 1}")]
        for kind, cid, turn in (pair if i % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            await store.append(PRINCIPAL, cid, deltas(turn, 1))
            got[kind].append(time.perf_counter() - t)
    s, lg = pct(got["short"], 50), pct(got["long"], 50)
    bench.row(f"1-event append on a {written:,}-event conversation, p50", lg * 1000, "ms", ratio=lg / s,
              ratio_of="the same on a 10-event conversation", goal="≤ 1.2×", met=lg / s <= 1.2,
              note=f"{samples} appends each, alternating; short p50 {s * 1000:.2f} ms")
    return long


async def reads(bench: Bench, store: Store, long: uuid.UUID) -> None:
    cap = 10_000 if bench.quick else 200_000
    await store.pool.execute("ANALYZE events")

    async def feed() -> tuple[int, float]:
        after, n, t0 = 0, 0, time.perf_counter()
        while n < cap:
            page = await store.read_feed(PRINCIPAL, after, 1000)
            if not page:
                break
            n, after = n + len(page), page[-1]["position"]
        return n, time.perf_counter() - t0

    async def conversation() -> tuple[int, float]:
        after, n, t0 = 0, 0, time.perf_counter()
        while n < cap:
            events, _ = await store.read_events(PRINCIPAL, long, after, 1000)
            if not events:
                break
            n, after = n + len(events), events[-1]["seq"]
        return n, time.perf_counter() - t0

    totals = {"feed": [0, 0.0], "conv": [0, 0.0]}
    passes = {"feed": feed, "conv": conversation}
    for r in range(1 if bench.quick else 2):
        for kind in (("feed", "conv") if r % 2 == 0 else ("conv", "feed")):
            n, seconds = await passes[kind]()
            totals[kind][0] += n
            totals[kind][1] += seconds
    f, c = (totals[k][0] / totals[k][1] for k in ("feed", "conv"))
    bench.row("read the conversation, read_events(limit=1000) pages", c, "events/s")
    bench.row("read the global feed, read_feed(limit=1000) pages", f, "events/s", ratio=f / c,
              ratio_of="read_events of one conversation", note=f"{totals['feed'][0]:,} events read")


async def run(bench: Bench) -> None:
    url = await bench.database()
    grouped = await Store.open(url, pool_size=10, writers=4)
    single = Store(await create_pool(url, min_size=2, max_size=10), writers=4, max_group_events=1)
    try:
        await group_commit(bench, grouped, single)
        long = await latency_and_length(bench, grouped)
        await reads(bench, grouped, long)
    finally:
        await grouped.close()
        await single.close()
