"""The turn runner under load (issue 10): TURNS concurrent streaming turns
through one `chatlog serve` (1 worker), side by side with the store-level
figure of the same run (`Store.append`, 200 producers, batches of 10, as in
`ingest`; goal: the runner ≥ 0.5× of it).

- The upstream is `chatlog fake-upstream` in a process of its own, so the
  server's CPU is the runner's (and the upstream's is shown beside it). Each
  turn asks for `[fake:long CHUNKS]`: CHUNKS text deltas as fast as the fake
  upstream sends them and the runner reads them.
- The turns start through POST /v1/conversations/{id}/turns, one per
  conversation, all at once; the round ends when every conversation's turn is
  closed. Every turn must finish with all its CHUNKS deltas in the log, or the
  run breaks.
- events/s and transactions/s are counted from the log, over the window in
  which every turn was streaming (from the last turn's first committed delta
  to the first turn's last one; the whole span when that window is too short,
  said in the note): events are `text.delta` rows by `created_at` (the write
  statement's time), transactions the distinct xids of their positions
  (position = xid << 16 + index, store/positions.py). That counts exactly the
  writer's commits that carried deltas; pg_stat_database.xact_commit would
  add every read and lease beat, and reaches the view up to a second late.
- chunk received → committed: the server's recorders measure it when started
  with CHATLOG_RUNNER_TRACE_FILE (runner/recorder.py): from the moment a
  chunk's events were handed to the recorder (just read and translated) to the
  return of the append that committed them; p50/p99 over every delta of the
  round.
- CPU per 1,000 chunks: the server process's CPU over the whole round (POSTs,
  projections and `model.requested` of every turn included) ÷ the deltas.

Rounds alternate the order runner / store level; each figure is the median
of its rounds, the ratio the quotient of the two medians. A short unmeasured
round comes first (connections to PostgreSQL and to the upstream opened).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import asyncpg
import httpx

from bench.core import Bench, CpuMeter, free_port, postgres_pids
from bench.ingest import StoreAppend
from bench.wrk import PRINCIPAL

GOAL = 0.5  # × the store-level figure
PACED_RATE = 50.0  # deltas/s per turn in the paced round: a fast model's pace
TTFT = 1.0  # s: the fake model's time to first token (so starting 200 turns and streaming overlap less)


def _sizes(bench: Bench) -> tuple[int, int, int, float]:
    """(turns, chunks per turn, rounds, store-level seconds)."""
    return (50, 300, 1, 1.0) if bench.quick else (200, 600, 2, 4.0)


@asynccontextmanager
async def fake_upstream() -> AsyncIterator[tuple[str, int]]:
    """`chatlog fake-upstream` in its own process: (base URL, pid)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="chatlog-bench-upstream-", suffix=".log", delete=False)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "chatlog"), "fake-upstream", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"chatlog fake-upstream exited with {proc.returncode}; log: {log.name}")
                try:
                    if (await client.get(url + "/models", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chatlog fake-upstream did not answer in 30 s; log: {log.name}")
                await asyncio.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)


def read_trace(path: Path) -> dict[int, int]:
    try:
        return {int(b): n for b, n in json.loads(path.read_text())["bins"].items()}
    except FileNotFoundError:
        return {}


def trace_quantile(bins: dict[int, int], q: float, per_octave: int = 16) -> float:
    """The q-quantile in ms of a histogram of runner/recorder.py (a bin's geometric middle)."""
    total = sum(bins.values())
    if not total:
        return float("nan")
    rank, seen = q * total, 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return 2 ** ((b + 0.5) / per_octave) / 1000
    return float("nan")


async def conversations(db: str, n: int) -> list[uuid.UUID]:
    from store import Store

    store = await Store.open(db, pool_size=4)
    try:
        ids = [uuid.uuid4() for _ in range(n)]
        await asyncio.gather(*(store.create_conversation(PRINCIPAL, c, {"metadata": {"bench": "runner"}})
                               for c in ids))
        return ids
    finally:
        await store.close()


async def start_turn(client: httpx.AsyncClient, url: str, cid: uuid.UUID, script: str) -> None:
    """POST /turns; a 503 (a pool busy with 200 turns starting at once) is
    retried with the same request_id, as a client would: never a second turn."""
    body = {"message": {"role": "user", "content": script}, "request_id": f"bench-{cid}"}
    for attempt in range(20):
        r = await client.post(f"{url}/v1/conversations/{cid}/turns", json=body)
        if r.status_code in (200, 202):
            return
        if r.status_code != 503:
            raise RuntimeError(f"POST /turns answered {r.status_code}: {r.text[:300]}")
        await asyncio.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"POST /turns answered 503 20 times: {r.text[:300]}")


async def until_closed(conn: asyncpg.Connection, ids: list[uuid.UUID], deadline: float) -> None:
    while True:
        still = await conn.fetchval("SELECT count(*) FROM conversations WHERE id = ANY($1) AND open_turn_id IS NOT NULL",
                                    ids)
        if not still:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{still} of {len(ids)} turns still open at the deadline")
        await asyncio.sleep(0.1)


_FROM_LOG = """
WITH d AS MATERIALIZED (
    SELECT conversation_id, created_at, position >> 16 AS xid
      FROM events WHERE conversation_id = ANY($1) AND type = 'text.delta'
), per AS (
    SELECT min(created_at) AS first, max(created_at) AS last FROM d GROUP BY conversation_id
), w AS (
    SELECT max(first) AS a, min(last) AS b, min(first) AS first, max(last) AS last FROM per
)
SELECT (SELECT count(*) FROM d) AS deltas, (SELECT count(DISTINCT xid) FROM d) AS xids,
       w.a, w.b, w.first, w.last,
       (SELECT count(*) FROM d WHERE created_at BETWEEN w.a AND w.b) AS window_deltas,
       (SELECT count(DISTINCT xid) FROM d WHERE created_at BETWEEN w.a AND w.b) AS window_xids,
       (SELECT count(*) FROM events WHERE conversation_id = ANY($1) AND type = 'turn.finished') AS finished
  FROM w
"""


async def _failure(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> str:
    row = await conn.fetchrow("SELECT type, data FROM events WHERE conversation_id = ANY($1) "
                              "AND type IN ('turn.failed', 'turn.cancelled') LIMIT 1", ids)
    return "no failed turn found" if row is None else f"{row['type']} {row['data']}"


async def runner_round(bench: Bench, url: str, db: str, upstream_pid: int, trace: Path, turns: int,
                       chunks: int, rate: float | None = None) -> dict:
    """One round: `turns` turns of `chunks` deltas each, as fast as possible or at `rate` a second."""
    script = f"[fake:delay {TTFT}s] [fake:long {chunks}]" + (f" [fake:rate {rate:g}]" if rate else "")
    ids = await conversations(db, turns)
    before = read_trace(trace)
    meter = CpuMeter(server=bench.server_pids(url), postgres=await postgres_pids(db), upstream=[upstream_pid])
    conn = await asyncpg.connect(db)
    try:
        limits = httpx.Limits(max_connections=turns, max_keepalive_connections=turns)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            meter.start()
            t0 = time.monotonic()
            await asyncio.gather(*(start_turn(client, url, c, script) for c in ids))
            posted = time.monotonic() - t0
        await until_closed(conn, ids, time.monotonic() + 120 + turns * chunks / 1000)
        seconds = time.monotonic() - t0
        cores = meter.stop()
        log = await conn.fetchrow(_FROM_LOG, ids)
        if log["finished"] != turns or log["deltas"] != turns * chunks:
            raise RuntimeError(f"{log['finished']} of {turns} turns finished, {log['deltas']:,} of "
                               f"{turns * chunks:,} deltas in the log: {await _failure(conn, ids)}")
    finally:
        await conn.close()
    after = read_trace(trace)
    bins = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0)}
    if sum(bins.values()) != turns * chunks:
        raise RuntimeError(f"the recorders measured {sum(bins.values()):,} deltas, the log holds {turns * chunks:,}")
    span = (log["last"] - log["first"]).total_seconds()
    window = (log["b"] - log["a"]).total_seconds()
    steady = window >= max(0.5, 0.25 * span)
    events, xids, length = ((log["window_deltas"], log["window_xids"], window) if steady
                            else (log["deltas"], log["xids"], span))
    return {"events_per_s": events / length, "tx_per_s": xids / length, "events_per_tx": events / max(1, xids),
            "p50": trace_quantile(bins, 0.50), "p99": trace_quantile(bins, 0.99),
            "cpu_ms_per_1000": cores["server"] * seconds / (turns * chunks) * 1e6,
            "steady": steady, "window": length, "span": span, "seconds": seconds, "posted": posted,
            "cpu": meter.describe(), "server_cores": cores["server"]}


def _line(g: dict) -> str:
    return (f"{g['events_per_s']:,.0f} events/s, {g['tx_per_s']:,.0f} tx/s, received->committed p50 {g['p50']:.1f} ms "
            f"p99 {g['p99']:.1f} ms, server CPU {g['cpu_ms_per_1000']:.0f} ms per 1,000 chunks; {g['cpu']}")


def _how(g: dict) -> str:
    return (f"{g['events_per_s']:,.0f} events/s over {'the steady' if g['steady'] else 'the whole (no steady)'} "
            f"{g['window']:.1f} s of a {g['span']:.1f} s span (POSTs took {g['posted']:.1f} s), {g['cpu']}")


async def run(bench: Bench) -> None:
    turns, chunks, rounds, seconds = _sizes(bench)
    paced_chunks = round(PACED_RATE * (1.5 if bench.quick else 6.0))
    store_level = StoreAppend(200, 10)
    bench.progress(f"setting up: {store_level.name}")
    await store_level.setup(bench)
    db = await bench.database()
    trace = Path(tempfile.gettempdir()) / f"chatlog-bench-runner-trace-{uuid.uuid4().hex[:8]}.json"
    runs: list[dict] = []
    stores: list[float] = []
    try:
        async with fake_upstream() as (upstream, upstream_pid), bench.server(
                db, CHATLOG_API_KEYS="", CHATLOG_ACCESS_LOG="off", CHATLOG_UPSTREAM_BASE_URL=upstream,
                CHATLOG_UPSTREAM_API_KEY="bench", CHATLOG_RUNNER_CONCURRENCY=str(turns),
                CHATLOG_RUNNER_TRACE_FILE=str(trace)) as url:
            await runner_round(bench, url, db, upstream_pid, trace, min(turns, 20), 20)  # warm-up, not measured
            for r in range(rounds):
                for kind in (("runner", "store") if r % 2 == 0 else ("store", "runner")):
                    if kind == "store":
                        stores.append(await store_level.measure(seconds))
                        bench.progress(f"round {r + 1}/{rounds}: {store_level.name}: {stores[-1]:,.0f} events/s")
                        continue
                    runs.append(await runner_round(bench, url, db, upstream_pid, trace, turns, chunks))
                    bench.progress(f"round {r + 1}/{rounds}: runner, {turns} turns x {chunks} deltas: {_line(runs[-1])}")
            paced = await runner_round(bench, url, db, upstream_pid, trace, turns, paced_chunks, PACED_RATE)
            bench.progress(f"paced: {turns} turns x {paced_chunks} deltas at {PACED_RATE:g}/s: {_line(paced)}")
    finally:
        trace.unlink(missing_ok=True)
        await store_level.close()

    def median(key: str) -> float:
        return statistics.median(g[key] for g in runs)

    store_figure, events = statistics.median(stores), median("events_per_s")
    ratio = events / store_figure if store_figure else None
    spread = f"{rounds} round(s)"
    name = f"{turns} concurrent streaming turns, {chunks} text deltas each as fast as they come, 1 worker"
    bench.row(f"runner: {name}", events, "events/s", ratio=ratio,
              ratio_of="Store.append, 200 producers, batch 10 (this section, same run)",
              goal=f"≥ {GOAL}× store level", met=None if ratio is None else ratio >= GOAL,
              note=f"text.delta rows counted in the log; fake upstream in its own process; {spread}: "
                   + "; ".join(_how(g) for g in runs))
    bench.row("runner: transactions carrying deltas (same turns)", median("tx_per_s"), "tx/s",
              note=f"distinct xids of the committed deltas (the writer's commits), {median('events_per_tx'):.1f} "
                   f"deltas per transaction; " + ", ".join(f"{g['tx_per_s']:,.0f}" for g in runs))
    bench.row("runner: chunk received → committed, p50 (same turns)", median("p50"), "ms",
              note="from the chunk's events reaching the recorder to the return of the append that committed them, "
                   "every delta of the round (runner/recorder.py, CHATLOG_RUNNER_TRACE_FILE)")
    bench.row("runner: chunk received → committed, p99 (same turns)", median("p99"), "ms",
              note=", ".join(f"p99 {g['p99']:.1f} ms" for g in runs))
    bench.row("runner: server CPU per 1,000 chunks (same turns)", median("cpu_ms_per_1000"), "CPU ms",
              note="the server process's CPU over each whole round (starting the turns included) ÷ its deltas; "
                   + ", ".join(f"{g['cpu_ms_per_1000']:.0f} ms (server {g['server_cores']:.2f} cores)" for g in runs))
    bench.row(f"store level: {store_level.name} (side by side)", store_figure, "events/s",
              note=f"{spread}: " + ", ".join(f"{x:,.0f}" for x in stores))
    at = f"{turns} turns at {PACED_RATE:g} deltas/s each ({turns * PACED_RATE:,.0f}/s offered)"
    bench.row(f"runner: chunk received → committed, p50, {at}", paced["p50"], "ms", note=_how(paced))
    bench.row(f"runner: chunk received → committed, p99, {at}", paced["p99"], "ms",
              note=f"server CPU {paced['cpu_ms_per_1000']:.0f} ms per 1,000 chunks, {paced['tx_per_s']:,.0f} tx/s "
                   f"({paced['events_per_tx']:.1f} deltas per transaction)")
