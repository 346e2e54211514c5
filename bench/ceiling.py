"""The ceiling of one PostgreSQL in concurrent streaming turns at 50 deltas/s
each, through one `chatlog serve` with 2 workers (the best count on 2 cores,
see `processes`).

Open loop, recorded as a recorder records a model's stream: each of N turns
receives a delta every 20 ms on a fixed schedule, whatever happens, and posts
what has arrived and is not yet sent (one request in flight per turn, at
most one every 25 ms — the runner's CHATLOG_RUNNER_FLUSH_MS), so a slow
answer makes the next batch bigger, never the stream slower. The turns run
in a process of their own (lean keep-alive HTTP clients, bench.sse.Http), so
their parsing does not share the server's event loop; its CPU is in the notes.

A step holds when ≥ 95 % of the deltas that arrived were committed by the end
and the lag from a delta's arrival to its commit being acknowledged has a p99
≤ 200 ms (LAG_P99_MS). N rises step by step; the ceiling is the largest N that held, and
the CPU figures of the first step that did not hold say what ran out first."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time

from bench.core import Bench, CpuMeter, postgres_pids
from bench.wrk import TURN, open_turns, total_events
from bench.sse import Http, pct

RATE = 50  # deltas per second per turn
FLUSH = 0.025  # s: a turn sends at most this often
WORKERS = 2
LAG_P99_MS = 200.0  # a reader sees each token within a fifth of a second, nearly always


async def _turn(url: str, cid: str, start: float, seconds: float, lags: list[float]) -> int:
    """One turn: deltas arrive at start + k/RATE; post what has arrived. Returns how many were committed."""
    http = await Http.connect(url)
    path = f"/v1/conversations/{cid}/events"
    total = int(seconds * RATE)
    sent = 0
    try:
        while sent < total:
            now = time.monotonic()
            arrived = min(total, math.floor((now - start) * RATE) + 1) if now >= start else 0
            if arrived <= sent:
                await asyncio.sleep(start + sent / RATE - now)
                continue
            batch = range(sent, arrived)
            await http.post(path, {"events": [{"type": "text.delta", "data": {"turn_id": TURN, "text": " tok"}}
                                              for _ in batch]})
            done = time.monotonic()
            lags.extend((done - (start + k / RATE)) * 1000 for k in batch)
            sent = arrived
            await asyncio.sleep(max(0.0, FLUSH - (time.monotonic() - now)))
    finally:
        await http.close()
    return sent


async def _turns(url: str, cids: list[str], seconds: float) -> dict:
    lags: list[float] = []
    start = time.monotonic() + 0.5  # every connection opened before the first delta arrives
    tasks = [asyncio.create_task(_turn(url, cid, start + i * (1 / RATE) / len(cids), seconds, lags))
             for i, cid in enumerate(cids)]
    done, _ = await asyncio.wait(tasks, timeout=seconds + 30)
    failed = [t for t in tasks if t not in done or t.exception() is not None]
    for t in tasks:
        t.cancel()
    if failed:
        error = failed[0].exception() if failed[0] in done else "a turn did not finish 30 s after its end"
        return {"error": repr(error)}
    committed = sum(t.result() for t in tasks)
    return {"committed": committed, "p50": pct(lags, 0.5), "p99": pct(lags, 0.99)}


def _child(url: str, cids: list[str], seconds: float, conn) -> None:
    conn.send("ready")  # imported: what it costs from here on is the load's
    conn.recv()
    cpu = time.process_time()
    result = asyncio.run(_turns(url, cids, seconds))
    conn.send({**result, "cpu": time.process_time() - cpu})
    conn.close()


def _ladder(bench: Bench) -> list[int]:
    return [10, 40] if bench.quick else [25, 50, 100, 150, 200, 300, 400, 600, 800]


async def _step(bench: Bench, url: str, db: str, cids: list[str], seconds: float) -> tuple[dict, CpuMeter]:
    before = await total_events(db, settle=0)
    meter = CpuMeter(server=bench.server_pids(url), postgres=await postgres_pids(db))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(url, cids, seconds, child), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()
    try:
        for wait in (30, seconds + 60):
            if not await loop.run_in_executor(None, parent.poll, wait):
                raise RuntimeError("the turns' process did not answer in time")
            answer = parent.recv()
            if answer == "ready":
                started = time.monotonic()
                meter.start()
                parent.send("go")
        result = answer
        meter.stop()
    finally:
        await loop.run_in_executor(None, proc.join, 10)
        if proc.is_alive():
            proc.kill()
    meter.children = "turns"  # the load's own CPU, as the turns' process measured it
    meter.cores["turns"] = result.get("cpu", 0.0) / (time.monotonic() - started)
    if "error" in result:
        raise RuntimeError(f"a streaming turn failed: {result['error']}")
    stored = await total_events(db) - before
    if stored != result["committed"]:  # every acknowledged delta is stored, nothing twice
        raise RuntimeError(f"{result['committed']:,} deltas acknowledged but {stored:,} stored")
    return result, meter


async def run(bench: Bench) -> None:
    ladder = _ladder(bench)
    seconds = 1.5 if bench.quick else 6.0
    db = await bench.database()
    ids = await open_turns(db, max(ladder))
    all_ids = ids.read_text().split()
    ids.unlink(missing_ok=True)
    held, failed, steps = 0, None, []
    async with bench.server(db, workers=WORKERS, CHATLOG_API_KEYS="", CHATLOG_ACCESS_LOG="off") as url:
        await _step(bench, url, db, all_ids[:10], 1.0)  # unmeasured: the workers' pools fill up
        for n in ladder:
            result, meter = await _step(bench, url, db, all_ids[:n], seconds)
            offered = n * RATE
            achieved = result["committed"] / seconds
            ok = result["committed"] >= 0.95 * n * int(seconds * RATE) and result["p99"] <= LAG_P99_MS
            step = (f"{n} turns: {achieved:,.0f} of {offered:,} deltas/s committed, lag p50 {result['p50']:.0f} ms, "
                    f"p99 {result['p99']:.0f} ms, {meter.describe()}")
            steps.append(step)
            bench.progress(step + ("" if ok else " — does not hold"))
            if not ok:
                failed = (n, meter.first_to_run_out(WORKERS))
                break
            held = n
    out_first = (f"nothing within the ladder: {ladder[-1]} turns held, the ceiling is higher" if failed is None
                 else f"at {failed[0]} turns: {failed[1]}")
    bench.row(f"concurrent streaming turns at {RATE} deltas/s, {WORKERS} workers, deltas posted as they arrive "
              f"(largest N with lag p99 ≤ {LAG_P99_MS:g} ms)", held, "turns",
              note=f"first to run out {out_first}. Steps: " + "; ".join(steps))
