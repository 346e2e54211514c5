"""Growth: the figures of messages, resume and projections at 10× the history,
and appends after a long agent loop (goal: each ≤ 1.2× its 1× figure).

Every pair is measured side by side, sample by sample (rounds for the
rebuild), on one database and one `chatlog serve`:

- messages: GET /messages at a random seq of a 100,000-event conversation vs
  a 10,000-event one (bench.messages' turns; 5,000 vs 500 with --quick);
- resume: Last-Event-ID at a random point of a turn still streaming, on the
  conversation's stream (format=events and ui), for a 10,000-event turn vs
  (a) a 100,000-event turn and (b) a 10,000-event turn at the end of a
  100,000-event conversation (history before the turn must cost nothing);
- rebuild: the history fold + render over 1,000,000 events in 100,000-event
  conversations vs in 10,000-event ones (events/s; 20,000 events in 5,000- vs
  500-event conversations with --quick);
- appends: a one-event append (store level, one at a time)
  to a conversation of 10,000 finished turns with one answered tool call each
  (50,001 events; 500 turns with --quick) vs to a new conversation, and the
  size of the aggregate state each keeps (was bench/state_growth.py).

Histories are written at the store level in 1,000-event appends, then
ANALYZE (see run()), and one read at each one's last seq writes the folds'
snapshots, as a first reader would.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid

from bench import projections as rebuild
from bench.core import Bench
from bench.messages import (PRINCIPAL, conversation_events, open_store, open_turn, read_messages, write_history,
                            write_snapshots)
from bench.resume import TURN, resume_once
from bench.sse import Http, pct
from store import NewEvent, Store

GOAL = 1.2


def finished_tool_turn(n: int) -> list[NewEvent]:
    """A finished turn with one answered tool call (5 store events), as an agent loop writes them."""
    t, c = f"t{n}", f"call-{n}"
    return [NewEvent("turn.started", {"turn_id": t}),
            NewEvent("tool_call.started", {"turn_id": t, "tool_call_id": c, "name": "lookup"}),
            NewEvent("tool_call.completed", {"tool_call_id": c, "arguments": '{"q": 1}'}),
            NewEvent("turn.finished", {"turn_id": t, "finish_reason": "tool_calls"}),
            NewEvent("tool.result", {"tool_call_id": c, "content": {"n": n}, "status": "ok"})]


def row(bench: Bench, name: str, value: float, unit: str, base: float, base_name: str, note: str,
        higher_is_better: bool = False) -> None:
    """A 10× figure, its ratio to the 1× one (for a rate: 1× ÷ 10×, so > 1 is worse either way)."""
    ratio = base / value if higher_is_better else value / base
    bench.row(name, value, unit, ratio=ratio, ratio_of=base_name, goal=f"≤ {GOAL:g}×", met=ratio <= GOAL, note=note)


async def run(bench: Bench) -> None:
    if bench.quick:
        size, samples, turns, appends, total = 500, 15, 500, 60, 20_000
    else:
        size, samples, turns, appends, total = 10_000, 100, 10_000, 300, 1_000_000
    big = 10 * size
    database = await bench.database()
    store = await open_store(database)
    try:
        bench.progress(f"writing histories of {size:,} and {big:,} events")
        convs = {"1×": await write_history(store, conversation_events(size - 1)),
                 "10×": await write_history(store, conversation_events(big - 1))}
        # (cid, last seq) of conversations ending in an open turn; the turn's first seq
        live = {"1×": await write_history(store, open_turn(size - 1, TURN)),
                "10× turn": await write_history(store, open_turn(big - 1, TURN)),
                # whole turns before it (a cut one would still be open)
                "10× history": await write_history(store, conversation_events(big - size - 100)
                                                   + open_turn(size - 1, TURN))}
        # as autovacuum would soon: until PostgreSQL has statistics of the bulk-written table, the
        # plan of the append's turn/tool-call probes (store._KNOWN) reads the conversation's events,
        # and a 1,000-event batch of tool turns took 46 -> 254 ms over its first 1,000 turns
        await store.pool.execute("ANALYZE events")
        bench.progress("writing their snapshots")
        for cid, last in [*convs.values(), *live.values()]:
            await write_snapshots(store, cid, last)
        bench.progress(f"appends after {turns:,} finished tool-calling turns")
        await appends_after_a_long_loop(bench, store, turns, appends)
        bench.progress("starting a server")
        async with bench.server(database) as url:
            bench.progress("GET /messages")
            await messages(bench, url, convs, samples)
            bench.progress("resume")
            await resumes(bench, url, live, size, samples)
    finally:
        await store.close()
    bench.progress("rebuild")
    rebuild_scaling(bench, size, total)


async def messages(bench: Bench, url: str, convs: dict[str, tuple[uuid.UUID, int]], samples: int) -> None:
    http = await Http.connect(url)
    times: dict[str, list[float]] = {k: [] for k in convs}
    sizes: dict[str, list[int]] = {k: [] for k in convs}
    try:
        rng = random.Random(5)
        for _ in range(samples):
            for k, (cid, last) in convs.items():
                took, size = await read_messages(http, cid, rng.randint(1, last), sized=True)
                times[k].append(took)
                sizes[k].append(size)
    finally:
        await http.close()
    p50 = {k: pct(v, 0.5) for k, v in times.items()}
    small, big = (convs[k][1] for k in ("1×", "10×"))
    row(bench, f"GET /messages at a random seq, {big:,}-event conversation, p50", p50["10×"], "ms", p50["1×"],
        f"the same at {small:,} events", f"{samples} random seqs each, interleaved; {p50['1×']:.1f} ms at 1×; the answer grows with the "
        f"history: median {statistics.median(sizes['10×']) / 1024:.0f} KB vs {statistics.median(sizes['1×']) / 1024:.0f} KB")


async def resumes(bench: Bench, url: str, live: dict[str, tuple[uuid.UUID, int]], size: int, samples: int) -> None:
    times: dict[tuple[str, str], list[float]] = {(k, f): [] for k in live for f in ("events", "ui")}
    rng = random.Random(13)
    for _ in range(samples):
        for k, (cid, last) in live.items():
            length = 10 * size if k == "10× turn" else size
            seq = rng.randint(last - length + 2, last - 1)  # inside the turn, after its turn.started
            for format in ("events", "ui"):
                path = f"/v1/conversations/{cid}/stream" + ("?format=ui" if format == "ui" else "")
                times[(k, format)].append(await resume_once(url, path, format, seq))
    for format in ("events", "ui"):
        base = pct(times[("1×", format)], 0.5)
        before = live["10× history"][1] - size
        for k, what in (("10× turn", f"a {10 * size:,}-event turn"),
                        ("10× history", f"a {size:,}-event turn after {before:,} events of history")):
            row(bench, f"resume mid-turn, format={format}, {what}: first frame p50", pct(times[(k, format)], 0.5),
                "ms", base, f"the same in a {size:,}-event turn",
                f"conversation stream, {samples} random resume points each, interleaved; {base:.1f} ms at 1×")


def rebuild_scaling(bench: Bench, size: int, total: int) -> None:
    """Rounds of one 10×-size conversation and ten 1×-size ones, until `total` events each."""
    small, big = rebuild.stored_events(size), rebuild.stored_events(10 * size)
    spent = {"1×": 0.0, "10×": 0.0}
    for _ in range(max(1, total // len(big))):
        spent["10×"] += rebuild.rebuild_history(big)
        spent["1×"] += sum(rebuild.rebuild_history(small) for _ in range(10))
    folded = max(1, total // len(big)) * len(big)
    rates = {k: folded / v for k, v in spent.items()}
    row(bench, f"history fold + OpenAI render in {10 * size:,}-event conversations", rates["10×"], "events/s",
        rates["1×"], f"in {size:,}-event conversations", f"{folded:,} events each, interleaved rounds; "
                                                          f"{rates['1×']:,.0f} events/s at 1×", higher_is_better=True)


async def appends_after_a_long_loop(bench: Bench, store: Store, turns: int, samples: int) -> None:
    long = uuid.UUID((await store.create_conversation(PRINCIPAL))["id"])
    for start in range(0, turns, 200):
        await store.append(PRINCIPAL, long, [e for n in range(start, min(turns, start + 200))
                                             for e in finished_tool_turn(n)])
    new = uuid.UUID((await store.create_conversation(PRINCIPAL))["id"])
    await store.append(PRINCIPAL, new, finished_tool_turn(0))
    convs = {"long": long, "new": new}
    sizes = {k: await store.pool.fetchval("SELECT pg_column_size(state) FROM conversations WHERE id = $1", cid)
             for k, cid in convs.items()}
    times: dict[str, list[float]] = {k: [] for k in convs}
    for i in range(samples):
        for k, cid in (convs.items() if i % 2 == 0 else reversed(convs.items())):
            start = time.perf_counter()
            await store.append(PRINCIPAL, cid, [NewEvent("conversation.titled", {"title": f"x{i}"})])
            times[k].append((time.perf_counter() - start) * 1000)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    row(bench, f"one-event append after {turns:,} finished tool-calling turns, p50", p50["long"], "ms", p50["new"],
        "the same on a new conversation",
        f"store level, {samples} appends each, alternating; saved state {sizes['long']} B vs {sizes['new']} B; "
        f"{p50['new']:.2f} ms new")
