"""The turn runner under load (issue 10): 200 concurrent streaming turns
through one `chatlog serve` (1 worker), side by side with the store-level
figure of the same run (`Store.append`, 200 producers, batches of 10, as
`ingest` measures it; goal: the runner ≥ 0.5× of it).

- The upstream is `chatlog fake-upstream` in a process of its own, so the
  server's CPU is the runner's (the upstream's is shown beside it). Each turn
  asks for `[fake:long N]`: N text deltas, as fast as the fake upstream
  writes them and the runner reads them; a last round asks for them at 50 a
  second (`[fake:rate 50]`), a fast model's pace, where the latency means
  something (at full speed it is the backlog of a saturated server).
- The turns start through POST /v1/conversations/{id}/turns, one per
  conversation, all at once; every stream starts at one moment once they are
  all started (`[fake:at T]`), and the round ends when every turn is closed.
  Every turn must finish with all its N deltas in the log, or the run breaks.
- events/s and transactions/s are counted from the log, over the time from
  the streams' start to the `created_at` of the last delta (its write
  statement's time): every `text.delta` row of the round, and as
  transactions the distinct xids of their positions (position = xid << 16 |
  index, store/positions.py), exactly the writer's commits that carried
  deltas (pg_stat_database's xact_commit would add every read and lease
  beat, and reaches the view up to a second late).
- chunk received → committed: measured by the server's recorders, started
  with CHATLOG_RUNNER_TRACE_FILE (runner/recorder.py): from the moment a
  chunk's events reach the recorder (the chunk just read and translated) to
  the return of the append that committed them, for every delta of the round.
- CPU per 1,000 chunks: the server process's CPU from the first POST to the
  last turn's end (starting the turns included) ÷ the deltas. The cores in
  the notes are those of the streaming part.

The runner and store-level rounds alternate their order; each figure is the
median of its rounds, the ratio the quotient of the two medians. A short
unmeasured round comes first (connections to PostgreSQL and to the upstream).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import asyncpg
import httpx

from bench.core import Bench, CpuMeter, chatlog_process, free_port, postgres_pids
from bench.ingest import StoreAppend
from bench.wrk import PRINCIPAL
from store.positions import INDEX_BITS

GOAL = 0.5  # × the store-level figure
PACED_RATE = 50.0  # deltas/s per turn in the paced round


@dataclass
class Sizes:
    turns: int
    chunks: int  # per turn, at full speed
    paced_chunks: int  # per turn, at PACED_RATE
    rounds: int
    store_seconds: float  # one store-level measurement
    lead: float  # s from the first POST to the streams' start: every turn started by then, normally


def _sizes(bench: Bench) -> Sizes:
    if bench.quick:
        return Sizes(turns=50, chunks=600, paced_chunks=75, rounds=1, store_seconds=1.0, lead=1.0)
    return Sizes(turns=200, chunks=1000, paced_chunks=300, rounds=2, store_seconds=4.0, lead=3.0)


@asynccontextmanager
async def fake_upstream() -> AsyncIterator[tuple[str, int]]:
    """`chatlog fake-upstream` in its own process: (base URL, pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    async with chatlog_process(["fake-upstream", "--port", str(port)], url + "/models") as pid:
        yield url, pid


def read_trace(path: Path) -> tuple[dict[int, int], int]:
    """The histogram runner/recorder.py writes: {bin: deltas}, bins per octave of microseconds."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, 16
    return {int(b): n for b, n in data["bins"].items()}, data["bins_per_octave"]


def trace_quantile(bins: dict[int, int], q: float, per_octave: int) -> float:
    """The q-quantile of such a histogram, in ms (its bin's geometric middle)."""
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
    deadline = time.monotonic() + 60
    delay = 0.05
    while True:
        r = await client.post(f"{url}/v1/conversations/{cid}/turns", json=body)
        if r.status_code in (200, 202):
            return
        if r.status_code != 503 or time.monotonic() > deadline:
            raise RuntimeError(f"POST /turns answered {r.status_code}: {r.text[:300]}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def until_closed(conn: asyncpg.Connection, ids: list[uuid.UUID], deadline: float) -> None:
    while True:
        still = await conn.fetchval(
        "SELECT count(*) FROM conversations WHERE id = ANY($1) AND open_turn_id IS NOT NULL", ids)
        if not still:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{still} of {len(ids)} turns still open at the deadline")
        await asyncio.sleep(0.1)


_FROM_LOG = f"""
SELECT count(*) FILTER (WHERE type = 'text.delta') AS deltas,
       count(DISTINCT position >> {INDEX_BITS}) FILTER (WHERE type = 'text.delta') AS xids,
       extract(epoch FROM max(created_at) FILTER (WHERE type = 'text.delta'))::float8 AS last,
       count(*) FILTER (WHERE type = 'turn.finished') AS finished
  FROM events WHERE conversation_id = ANY($1)
"""


async def _failure(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> str:
    row = await conn.fetchrow("SELECT type, data FROM events WHERE conversation_id = ANY($1) "
                              "AND type IN ('turn.failed', 'turn.cancelled') LIMIT 1", ids)
    return "no failed turn found" if row is None else f"{row['type']} {row['data']}"


async def runner_round(bench: Bench, url: str, db: str, upstream_pid: int, trace: Path, turns: int,
                       chunks: int, lead: float, rate: float | None = None) -> dict:
    """One round: `turns` turns of `chunks` deltas each, as fast as possible or
    at `rate` a second, every stream starting `lead` seconds after the first POST."""
    ids = await conversations(db, turns)
    before, _ = read_trace(trace)
    groups = {"server": bench.server_pids(url), "postgres": await postgres_pids(db), "upstream": [upstream_pid]}
    whole, streaming = CpuMeter(**groups), CpuMeter(**groups)
    conn = await asyncpg.connect(db)
    try:
        limits = httpx.Limits(max_connections=turns, max_keepalive_connections=turns)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            start_at = time.time() + lead
            script = f"[fake:at {start_at:.3f}] [fake:long {chunks}]" + (f" [fake:rate {rate:g}]" if rate else "")
            whole.start()
            t0 = time.monotonic()
            await asyncio.gather(*(start_turn(client, url, c, script) for c in ids))
            posted = time.monotonic() - t0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        streaming.start()
        await until_closed(conn, ids, time.monotonic() + 120 + turns * chunks / 1000)
        seconds = time.monotonic() - t0
        whole.stop()
        streaming.stop()
        log = await conn.fetchrow(_FROM_LOG, ids)
        # created_at is on PostgreSQL's clock, start_at on this machine's (the same one, unless PostgreSQL is remote)
        skew = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8") - time.time()
        if log["finished"] != turns or log["deltas"] != turns * chunks:
            raise RuntimeError(f"{log['finished']} of {turns} turns finished, {log['deltas']:,} of "
                               f"{turns * chunks:,} deltas in the log: {await _failure(conn, ids)}")
    finally:
        await conn.close()
    after, per_octave = read_trace(trace)
    bins = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0)}
    if sum(bins.values()) != turns * chunks:
        raise RuntimeError(f"the recorders measured {sum(bins.values()):,} deltas, the log holds {turns * chunks:,}")
    length = max(log["last"] - skew - start_at, 1e-3)
    return {"events_per_s": log["deltas"] / length, "tx_per_s": log["xids"] / length,
            "events_per_tx": log["deltas"] / max(1, log["xids"]), "length": length,
            "p50": trace_quantile(bins, 0.50, per_octave), "p99": trace_quantile(bins, 0.99, per_octave),
            "cpu_ms_per_1000": whole.cores["server"] * seconds / (turns * chunks) * 1e6,
            "posted": posted, "late": posted > lead, "cpu": streaming.describe(),
            "server_cores": streaming.cores["server"]}


def _line(g: dict) -> str:
    return (f"{g['events_per_s']:,.0f} events/s, {g['tx_per_s']:,.0f} tx/s, received->committed p50 {g['p50']:.1f} ms "
            f"p99 {g['p99']:.1f} ms, server CPU {g['cpu_ms_per_1000']:.0f} ms per 1,000 chunks; {g['cpu']}")


def _how(g: dict) -> str:
    late = ", some after the streams' start" if g["late"] else ""
    return (f"{g['events_per_s']:,.0f} events/s, the last committed {g['length']:.1f} s after the streams' start "
            f"(the POSTs took {g['posted']:.1f} s{late}); while streaming, {g['cpu']}")


async def run(bench: Bench) -> None:
    size = _sizes(bench)
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
                CHATLOG_UPSTREAM_API_KEY="bench", CHATLOG_RUNNER_CONCURRENCY=str(size.turns),
                CHATLOG_RUNNER_TRACE_FILE=str(trace)) as url:

            async def turns(chunks: int, rate: float | None = None, turns: int = size.turns) -> dict:
                return await runner_round(bench, url, db, upstream_pid, trace, turns, chunks, size.lead, rate)

            await turns(20, turns=min(size.turns, 20))  # warm-up, not measured
            for r in range(size.rounds):
                for kind in (("runner", "store") if r % 2 == 0 else ("store", "runner")):
                    if kind == "store":
                        stores.append(await store_level.measure(size.store_seconds))
                        bench.progress(f"round {r + 1}/{size.rounds}: {store_level.name}: {stores[-1]:,.0f} events/s")
                    else:
                        runs.append(await turns(size.chunks))
                        bench.progress(f"round {r + 1}/{size.rounds}: runner, {size.turns} turns x {size.chunks} "
                                       f"deltas: {_line(runs[-1])}")
            paced = await turns(size.paced_chunks, PACED_RATE)
            bench.progress(f"paced: {size.turns} turns x {size.paced_chunks} deltas at {PACED_RATE:g}/s: {_line(paced)}")
    finally:
        trace.unlink(missing_ok=True)
        await store_level.close()

    def median(key: str) -> float:
        return statistics.median(g[key] for g in runs)

    def each(key: str, fmt: str) -> str:
        return f"{size.rounds} round(s): " + ", ".join(format(g[key], fmt) for g in runs)

    store_figure, events = statistics.median(stores), median("events_per_s")
    ratio = events / store_figure if store_figure else None
    fast = f"{size.turns} turns × {size.chunks:,} deltas as fast as they come"
    bench.row(f"runner: {size.turns} concurrent streaming turns, 1 worker, deltas as fast as the upstream sends",
              events, "events/s", ratio=ratio, ratio_of="Store.append, 200 producers, batch 10 (side by side)",
              goal=f"≥ {GOAL}× store level", met=None if ratio is None else ratio >= GOAL,
              note=f"{fast}, fake upstream in its own process, text.delta rows counted in the log; {size.rounds} "
                   "round(s): " + "; ".join(_how(g) for g in runs))
    bench.row("runner: transactions carrying deltas (same turns)", median("tx_per_s"), "tx/s",
              note=f"the distinct xids of the committed deltas (the writer's commits), {median('events_per_tx'):,.0f} "
                   f"deltas per transaction; {each('tx_per_s', ',.0f')}")
    bench.row("runner: chunk received → committed, p50 (same turns)", median("p50"), "ms",
              note="a chunk's events reaching the recorder → the return of the append that committed them, every "
                   "delta (runner/recorder.py, CHATLOG_RUNNER_TRACE_FILE). At full speed the server reads faster "
                   "than it commits: this is the backlog, it grows with the run; the paced rows below are the latency")
    bench.row("runner: chunk received → committed, p99 (same turns)", median("p99"), "ms", note=each("p99", ".1f"))
    bench.row("runner: server CPU per 1,000 chunks (same turns)", median("cpu_ms_per_1000"), "CPU ms",
              note="the server process's CPU from the first POST to the last turn's end ÷ its deltas; "
                   + each("cpu_ms_per_1000", ".0f"))
    bench.row(f"store level: {store_level.name} (side by side)", store_figure, "events/s",
              note=f"{size.rounds} round(s): " + ", ".join(f"{x:,.0f}" for x in stores))
    offered = size.turns * PACED_RATE
    at = f"{size.turns} turns at {PACED_RATE:g} deltas/s each"
    bench.row(f"runner: {at}, committed", paced["events_per_s"], "events/s", ratio=paced["events_per_s"] / offered,
              ratio_of=f"the {offered:,.0f} deltas/s offered",
              note=f"{size.paced_chunks} deltas per turn; {_how(paced)}; {paced['tx_per_s']:,.0f} tx/s, "
                   f"{paced['events_per_tx']:,.0f} deltas per transaction")
    bench.row(f"runner: chunk received → committed, p50, {at}", paced["p50"], "ms")
    bench.row(f"runner: chunk received → committed, p99, {at}", paced["p99"], "ms")
    bench.row(f"runner: server CPU per 1,000 chunks, {at}", paced["cpu_ms_per_1000"], "CPU ms",
              note="a chunk at a time: every chunk is a socket read, appends carry a few deltas")
