"""Message reads: GET /messages at a random seq over HTTP (goal: p50 ≤ 5 ms).

A 10,000-event conversation of realistic turns (a user message, reasoning and
text deltas, a tool call with argument fragments, its result) is written at
the store level in 1,000-event appends, and one read at its last seq writes
the fold snapshots (every 256 seqs) as the first reader would. Then a real
`chatlog serve` answers `GET …/messages?at_seq=N` for a seq drawn at random
for every sample, over one keep-alive connection. Interleaved with it, as the
reference the ratio is taken against: a full replay in this process (read
every event up to N, fold from seq 1, render), what reads cost without
snapshots. Every answer is checked (HTTP 200, `seq` = N).

Also the history builders the resume and growth sections share.
"""

from __future__ import annotations

import random
import time
import uuid

import orjson

import projections
from bench.core import Bench
from bench.sse import Http, pct
from store import NewEvent, Store

PRINCIPAL = "open"  # the principal of a server in open mode (no API keys)
GOAL_MS = 5.0


def conversation_events(total: int, turn: int = 0) -> list[NewEvent]:
    """`total` events of finished turns of 100 events each, counted from turn `turn`: a user message,
    10 reasoning and 82 text deltas, a tool call with two argument fragments, the turn's end, the result."""
    events = []
    while len(events) < total:
        t = f"t{turn}"
        events += [NewEvent("message.user", {"content": f"question {turn}"}),
                   NewEvent("turn.started", {"turn_id": t, "model": "gpt-4o"})]
        events += [NewEvent("reasoning.delta", {"turn_id": t, "text": " think"}) for _ in range(10)]
        events += [NewEvent("text.delta", {"turn_id": t, "text": f" word{i}"}) for i in range(82)]
        events += [NewEvent("tool_call.started", {"turn_id": t, "tool_call_id": f"c{turn}", "name": "search"}),
                   NewEvent("tool_call.delta", {"tool_call_id": f"c{turn}", "text": '{"q":'}),
                   NewEvent("tool_call.delta", {"tool_call_id": f"c{turn}", "text": f'"{turn}"}}'}),
                   NewEvent("tool_call.completed", {"tool_call_id": f"c{turn}"}),
                   NewEvent("turn.finished", {"turn_id": t, "finish_reason": "tool_calls"}),
                   NewEvent("tool.result", {"tool_call_id": f"c{turn}", "content": {"hits": turn}, "status": "ok"})]
        turn += 1
    return events[:total]


def open_turn(deltas: int, turn_id: str = "live") -> list[NewEvent]:
    """A user message and a turn still streaming: turn.started and `deltas` text deltas."""
    return [NewEvent("message.user", {"content": "write a long answer"}),
            NewEvent("turn.started", {"turn_id": turn_id, "model": "gpt-4o"}),
            *(NewEvent("text.delta", {"turn_id": turn_id, "text": f" w{i}"}) for i in range(deltas))]


async def open_store(database: str) -> Store:
    """A store for writing histories and snapshots: generous waits (a 1,000-event append or a
    snapshot save may take seconds on a loaded machine; the app's defaults would refuse them)."""
    return await Store.open(database, pool_size=2, writers=1, acquire_timeout=30, statement_timeout=120)


async def write_history(store: Store, events: list[NewEvent], batch: int = 1000) -> tuple[uuid.UUID, int]:
    """A new conversation holding `events` (appended `batch` at a time); (its id, its last seq)."""
    cid = uuid.UUID((await store.create_conversation(PRINCIPAL))["id"])
    last = 1
    for i in range(0, len(events), batch):
        last = (await store.append(PRINCIPAL, cid, events[i:i + batch])).last_seq
    return cid, last


async def write_snapshots(store: Store, cid: uuid.UUID, last: int) -> None:
    """What the first reader of the whole history leaves behind: the folds' snapshots up to `last`."""
    store.history.forget()
    await store.history.state_at(PRINCIPAL, cid, last)
    await store.ui_states.copy_at(PRINCIPAL, cid, last)
    await store.history.flush()
    await store.ui_states.flush()


async def read_messages(http: Http, cid: uuid.UUID, seq: int, sized: bool = False):
    """GET /messages at `seq` (checked); the time it took in ms (and with `sized`, the answer's bytes)."""
    start = time.perf_counter()
    status, body = await http.request("GET", f"/v1/conversations/{cid}/messages?at_seq={seq}")
    took = (time.perf_counter() - start) * 1000
    if status != 200 or orjson.loads(body)["seq"] != seq:
        raise RuntimeError(f"GET /messages?at_seq={seq}: HTTP {status} {body[:200]!r}")
    return (took, len(body)) if sized else took


async def full_replay(store: Store, cid: uuid.UUID, seq: int) -> float:
    start = time.perf_counter()
    rows = await store.pool.fetch("SELECT seq, type, data FROM events WHERE principal = $1 AND conversation_id = $2 "
                                  "AND seq <= $3 ORDER BY seq", PRINCIPAL, cid, seq)
    projections.render(projections.fold_all(dict(r) for r in rows), "openai")
    return (time.perf_counter() - start) * 1000


async def run(bench: Bench) -> None:
    total, samples = (2_000, 60) if bench.quick else (10_000, 200)
    database = await bench.database()
    store = await open_store(database)
    try:
        cid, last = await write_history(store, conversation_events(total - 1))
        await write_snapshots(store, cid, last)
        async with bench.server(database) as url:
            http = await Http.connect(url)
            try:
                rng = random.Random(7)
                http_ms, replay_ms = [], []
                for _ in range(samples):
                    seq = rng.randint(1, last)
                    http_ms.append(await read_messages(http, cid, seq))
                    replay_ms.append(await full_replay(store, cid, seq))
            finally:
                await http.close()
    finally:
        await store.close()
    p50, reference = pct(http_ms, 0.5), pct(replay_ms, 0.5)
    bench.row(f"GET /messages at a random seq, {last:,}-event conversation, p50", p50, "ms", ratio=p50 / reference,
              ratio_of="a full replay in process (SQL + fold + render)", goal=f"p50 ≤ {GOAL_MS:g} ms",
              met=p50 <= GOAL_MS, note=f"{samples} random seqs, interleaved; p99 {pct(http_ms, 0.99):.1f} ms; "
                                       f"full replay p50 {reference:.1f} ms")
