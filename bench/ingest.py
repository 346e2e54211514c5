"""Ingest throughput: chatlog (store level and over HTTP) side by side with the
baselines (bench/baselines.py), in rounds that run every variant once, in
alternating order; each figure is the median of its rounds, each ratio the
quotient of two medians of the same run."""

from __future__ import annotations

import asyncio
import statistics
import uuid
from contextlib import AsyncExitStack

from bench.baselines import Copy, EventSourcingRecorder, RedisXadd, Unnest, Variant
from bench.core import Bench, CpuMeter, postgres_pids
from bench.wrk import TURN, check_nothing_lost, open_turns, run_wrk, total_events
from store import NewEvent, Store

PRINCIPAL = "bench"


class StoreAppend(Variant):
    """`Store.append` as the app opens the store (pool 10, 4 group-commit writers),
    `producers` concurrent producers, each streaming `batch` deltas at a time into
    its own open turn."""

    def __init__(self, producers: int, batch: int) -> None:
        self.producers, self.batch = producers, batch
        self.name = f"chatlog Store.append, {producers} producers, batch {batch}, text.delta in open turns"

    async def setup(self, bench: Bench) -> None:
        self.url = await bench.database()
        self.ids = [uuid.uuid4() for _ in range(self.producers)]
        store = await Store.open(self.url, pool_size=10, writers=4)
        try:
            for cid in self.ids:
                await store.create_conversation(PRINCIPAL, cid, {"metadata": {"bench": True}})
            await asyncio.gather(*(store.append(PRINCIPAL, c, [NewEvent("turn.started", {"turn_id": TURN})])
                                   for c in self.ids))
        finally:
            await store.close()
        self.events = [NewEvent("text.delta", {"turn_id": TURN, "text": f" tok{k}"}) for k in range(self.batch)]

    async def measure(self, seconds: float) -> float:
        # opened per measurement, so the section holds few connections at a time
        store = await Store.open(self.url, pool_size=10, writers=4)
        try:
            await store.append(PRINCIPAL, self.ids[0], self.events)  # connections made before the clock starts
            loop = asyncio.get_running_loop()
            count = [0]
            t0 = loop.time()

            async def producer(cid: uuid.UUID) -> None:
                while loop.time() - t0 < seconds:
                    await store.append(PRINCIPAL, cid, self.events)
                    count[0] += self.batch

            await asyncio.gather(*(producer(c) for c in self.ids))
            return count[0] / (loop.time() - t0)
        finally:
            await store.close()


class HttpIngest(Variant):
    """wrk → one `chatlog serve` worker, `connections` connections round robin over
    many conversations with an open turn, `batch` deltas per request."""

    def __init__(self, http: "HttpTarget", batch: int, connections: int = 200) -> None:
        self.http, self.batch, self.connections = http, batch, connections
        self.name = f"chatlog over HTTP (wrk), {connections} connections, batch {batch}, {http.workers} worker(s)"
        self.notes: list[str] = []

    async def measure(self, seconds: float) -> float:
        # at least 2 s: on a loaded machine 200 connections' first answers may
        # take longer than a 1 s run
        return await self.http.load(self, max(2.0, seconds))


class HttpTarget:
    """One server (N workers) on a fresh database, with conversations to post to."""

    def __init__(self, bench: Bench, workers: int = 1, conversations: int = 1000) -> None:
        self.bench, self.workers, self.conversations = bench, workers, conversations
        self.stack = AsyncExitStack()
        self.last_cpu: CpuMeter | None = None

    async def __aenter__(self) -> "HttpTarget":
        self.db = await self.bench.database()
        self.ids = await open_turns(self.db, self.conversations)
        self.url = await self.stack.enter_async_context(
            self.bench.server(self.db, workers=self.workers, CHATLOG_API_KEYS=""))
        if not self.bench.quick:  # warm the pools up, so PostgreSQL's backends exist when the meter starts
            await run_wrk(self.bench, self.url, self.ids, 1, 50, 1)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stack.aclose()
        self.ids.unlink(missing_ok=True)

    async def load(self, variant: HttpIngest, seconds: float, rate_per_thread: float | None = None,
                   threads: int = 1) -> float:
        before = await total_events(self.db)
        meter = CpuMeter(children="wrk", server=self.bench.server_pids(self.url), postgres=await postgres_pids(self.db))

        def started(pid: int) -> None:
            meter.start()

        result = await run_wrk(self.bench, self.url, self.ids, variant.batch, variant.connections, seconds,
                               threads=threads, rate_per_thread=rate_per_thread, on_start=started)
        meter.stop()
        self.last_cpu = meter
        check_nothing_lost(before, await total_events(self.db), result, variant.batch, variant.connections,
                           variant.name)
        variant.last = result
        variant.notes.append(meter.describe())
        return result.per_second * variant.batch


def _cells(bench: Bench) -> tuple[int, float]:
    return (1, 1.0) if bench.quick else (3, 4.0)


async def run(bench: Bench) -> None:
    rounds, seconds = _cells(bench)
    baselines = {"copy": Copy(), "unnest": Unnest(), "eventsourcing": EventSourcingRecorder(), "redis": RedisXadd()}
    stores = {"store_200x10": StoreAppend(200, 10), "store_32x1": StoreAppend(32, 1)}
    async with AsyncExitStack() as stack:
        for v in [*baselines.values(), *stores.values()]:
            bench.progress(f"setting up: {v.name}")
            await v.setup(bench)
            stack.push_async_callback(v.close)
        bench.progress("setting up: a chatlog server (1 worker) and its conversations")
        http = await stack.enter_async_context(HttpTarget(bench, 1, 200 if bench.quick else 1000))
        https = {f"http_b{b}": HttpIngest(http, b) for b in (1, 10, 50)}
        variants: dict[str, Variant] = {**baselines, **stores, **https}
        figures: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for key in order:
                figures[key].append(await variants[key].measure(seconds))
                bench.progress(f"round {r + 1}/{rounds}: {variants[key].name}: {figures[key][-1]:,.0f} events/s")

    median = {k: statistics.median(v) for k, v in figures.items()}
    bench.refs["copy"], bench.refs["eventsourcing"] = median["copy"], median["eventsourcing"]
    spread = {k: f"{rounds} round(s): " + ", ".join(f"{x:,.0f}" for x in v) for k, v in figures.items()}
    for key in ("copy", "unnest", "eventsourcing", "redis"):
        v = variants[key]
        bench.row(v.name, median[key], "events/s", **bench.ratio(median[key], "copy"),
                  note="; ".join(x for x in (v.note, spread[key]) if x))
    s = median["store_200x10"]
    ok = bench.ratio(s, "copy")
    bench.row(stores["store_200x10"].name, s, "events/s", **ok, goal="≥ 0.5× COPY",
              met=ok["ratio"] >= 0.5 if ok["ratio"] is not None else None, note=spread["store_200x10"])
    bench.row(stores["store_32x1"].name, median["store_32x1"], "events/s", **bench.ratio(median["store_32x1"], "copy"),
              note=spread["store_32x1"])
    goals = {"http_b1": ("eventsourcing", 4.0, "≥ 4× eventsourcing 1/save"), "http_b10": ("copy", 0.25, "≥ 0.25× COPY")}
    for key, v in https.items():
        ref, want, goal = goals.get(key, ("copy", None, None))
        ratio = bench.ratio(median[key], ref)
        met = None if want is None or ratio["ratio"] is None else ratio["ratio"] >= want
        note = f"{v.last.describe()}; {v.notes[-1]}; {spread[key]}"
        bench.row(v.name, median[key], "events/s", **ratio, goal=goal, met=met, note=note)
