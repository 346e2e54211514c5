"""Message-history reads: snapshot + tail vs a full replay, side by side in ONE run.

    .venv/bin/python -m bench.messages            # 10,000-event conversation
    .venv/bin/python -m bench.messages --events 2000 --samples 50   # quick

Variants, interleaved sample by sample so the machine's noise hits both alike:
- full replay: read every event up to the seq (SQL) and fold + render it;
- served cold: `Store.messages(at_seq=N)` with the process cache emptied, so it
  loads the nearest snapshot and folds the tail (snapshots exist once any read
  passed them; the first pass writes them);
- served warm: the same at the conversation's current seq, cache kept (what a
  chat UI asking for "now" after every append costs);
- HTTP: GET /messages at random seqs through the FastAPI app (in process).
The seq is drawn at random for every sample ("at any seq").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

import httpx

import projections
from api.app import create_app
from api.settings import Settings
from store import NewEvent, Store
from tests.pg import TestServer

PRINCIPAL = "open"  # the app's principal in open mode


def conversation_events(total: int) -> list[NewEvent]:
    """Realistic turns: a user message, ~80 text deltas, some reasoning, a tool call and its result."""
    events, turn = [], 0
    while len(events) < total - 1:
        t = f"t{turn}"
        events += [NewEvent("message.user", {"content": f"question {turn}"}),
                   NewEvent("turn.started", {"turn_id": t, "model": "gpt-4o"})]
        events += [NewEvent("reasoning.delta", {"turn_id": t, "text": " think"}) for _ in range(10)]
        events += [NewEvent("text.delta", {"turn_id": t, "text": f" word{i}"}) for i in range(80)]
        events += [NewEvent("tool_call.started", {"turn_id": t, "tool_call_id": f"c{turn}", "name": "search"}),
                   NewEvent("tool_call.delta", {"tool_call_id": f"c{turn}", "text": '{"q":'}),
                   NewEvent("tool_call.delta", {"tool_call_id": f"c{turn}", "text": f'"{turn}"}}'}),
                   NewEvent("tool_call.completed", {"tool_call_id": f"c{turn}"}),
                   NewEvent("turn.finished", {"turn_id": t, "finish_reason": "tool_calls"}),
                   NewEvent("tool.result", {"tool_call_id": f"c{turn}", "content": {"hits": turn}, "status": "ok"})]
        turn += 1
    return events[: total - 1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(total: int, samples: int) -> None:
    server = TestServer()
    await server.start()
    url = await server.create_database()
    store = await Store.open(url)
    try:
        cid = uuid.UUID((await store.create_conversation(PRINCIPAL))["id"])
        events = conversation_events(total)
        for i in range(0, len(events), 1000):
            await store.append(PRINCIPAL, cid, events[i:i + 1000])
        last = len(events) + 1
        # one pass writes the snapshots (as a first reader would)
        store.history.forget()
        await store.messages(PRINCIPAL, cid, "openai")
        await store.history.flush()

        def timed(run):
            async def measure(seq: int) -> float:
                start = time.perf_counter()
                await run(seq)
                return (time.perf_counter() - start) * 1000
            return measure

        @timed
        async def full_replay(seq: int) -> None:
            rows = await store.pool.fetch(
                "SELECT seq, type, data FROM events WHERE conversation_id = $1 AND seq <= $2 ORDER BY seq", cid, seq)
            projections.render(projections.fold_all(dict(r) for r in rows), "openai")

        @timed
        async def served_cold(seq: int) -> None:
            store.history.forget()
            await store.messages(PRINCIPAL, cid, "openai", at_seq=seq)

        async def served_warm(_: int) -> float:
            await store.messages(PRINCIPAL, cid, "openai")  # whatever came before, now it is warm
            start = time.perf_counter()
            await store.messages(PRINCIPAL, cid, "openai")
            return (time.perf_counter() - start) * 1000

        app = create_app(Settings(database_url=None, api_keys=""), store=store)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")

        @timed
        async def http_cold(seq: int) -> None:
            store.history.forget()
            r = await client.get(f"/v1/conversations/{cid}/messages", params={"at_seq": seq})
            assert r.status_code == 200

        variants = {"full replay (SQL + fold + render)": full_replay, "served, cold cache (snapshot + tail)": served_cold,
                    "served, warm cache, current seq": served_warm, "HTTP GET /messages, cold cache": http_cold}
        timings: dict[str, list[float]] = {name: [] for name in variants}
        rng = random.Random(7)
        for _ in range(samples):
            seq = rng.randint(1, last)
            for name, run in variants.items():
                timings[name].append(await run(seq))
        await client.aclose()

        base = statistics.median(timings["full replay (SQL + fold + render)"])
        print(f"## message reads, {last:,}-event conversation, {samples} random seqs per variant (interleaved)\n")
        print("| variant | p50 ms | p90 ms | p99 ms | p50 ÷ full replay |")
        print("|---|---:|---:|---:|---:|")
        for name, values in timings.items():
            print(f"| {name} | {statistics.median(values):.2f} | {pct(values, 0.9):.2f} | {pct(values, 0.99):.2f} "
                  f"| {statistics.median(values) / base:.3f}× |")
    finally:
        await store.close()
        await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.samples))
