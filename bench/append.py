"""Append / read benchmark for the store, variants side by side in ONE run.

    .venv/bin/python -m bench.append            # full run, ~2-3 minutes on 2 cores
    .venv/bin/python -m bench.append --quick    # smoke run, < ~40 s

The machine is shared and noisy, so the figures to report are the RATIOS
between variants measured in the same run, interleaved (back-to-back G/S
pairs for the throughput cells, the median of the pairs' ratios reported;
alternating chunks of 10 or single appends for latencies); absolute figures
are printed for context only. With one appender both variants run the same
code, so those rows are an A/A test: their ratio shows the run's noise.

What it measures (all through `store.Store`, on a fresh database it drops at
the end; PostgreSQL is found as the tests find it: TEST_DATABASE_URL /
DATABASE_URL, else 127.0.0.1:5432, else an embedded one):

1. append throughput for batches of 1/10/100/1000 `text.delta` events inside
   an open turn, with 1 and 32 concurrent appenders, each appender rotating
   over its own conversations; transactions vs appends from the GroupWriter's
   counters show group commit at work;
2. group commit (Store, writers=4) vs one transaction per append: the same
   Store class with `max_group_events=1`, so every group holds exactly one op
   (the writer always takes the first waiting op, then adds more only while
   the group stays within max_group_events);
3. p50/p99 latency of a 1-event append under light load, both variants;
4. p50 latency of a 1-event append on a 10-event conversation vs a
   100,000-event one (built with 1000-event batches);
5. reading: the global feed (limit=1000 pages) and `read_events` of one
   conversation (limit=1000 pages), events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

import asyncpg

from store import NewEvent, Store, create_pool
from tests.pg import TestServer, with_database

PRINCIPAL = "bench"
BATCHES = (1, 10, 100, 1000)
CONCURRENCY = (1, 32)
CONVS_PER_APPENDER = 4

# Token-sized chunks, as a model streams them.
TEXTS = [" the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", "\n\n",
         " Here", "'s", " a", " short", " answer", ":", " **", "yes", "**", ",", " because", " 42", " is"]


@dataclass(frozen=True)
class Config:
    quick: bool
    cell_seconds: float  # one run of one throughput cell
    pairs: int  # back-to-back (G, S) pairs per cell, alternating G S / S G
    latency_samples: int  # per variant and per load level
    long_events: int  # length of the long conversation (section 4)
    length_samples: int  # per conversation kind (section 4)
    read_cap: int  # max events read per pass (section 5)
    read_rounds: int


FULL = Config(quick=False, cell_seconds=0.5, pairs=8, latency_samples=1000, long_events=100_000,
              length_samples=800, read_cap=200_000, read_rounds=2)
QUICK = Config(quick=True, cell_seconds=0.4, pairs=2, latency_samples=300, long_events=20_000,
               length_samples=300, read_cap=50_000, read_rounds=1)


@dataclass
class Conv:
    id: uuid.UUID
    turn_id: str
    batches: dict[int, list[NewEvent]] = field(default_factory=dict)

    def batch(self, n: int) -> list[NewEvent]:
        if n not in self.batches:
            self.batches[n] = [NewEvent("text.delta", {"turn_id": self.turn_id, "text": TEXTS[k % len(TEXTS)]})
                               for k in range(n)]
        return self.batches[n]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"  … {msg}", file=sys.stderr, flush=True)


async def new_conversation(store: Store, deltas: int = 0) -> Conv:
    conv = Conv(uuid.uuid4(), f"turn-{uuid.uuid4().hex[:8]}")
    await store.create_conversation(PRINCIPAL, conv.id, {"metadata": {"bench": True}})
    events = [NewEvent("turn.started", {"turn_id": conv.turn_id, "model": "bench-model"})] + conv.batch(deltas)
    await store.append(PRINCIPAL, conv.id, events)
    return conv


# -- 1 & 2: throughput -------------------------------------------------------


@dataclass
class Tally:
    events: int = 0
    appends: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    transactions: int = 0
    ops: int = 0

    def add(self, other: "Tally") -> None:
        for name in ("events", "appends", "seconds", "cpu", "transactions", "ops"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


async def run_cell(store: Store, convs: list[Conv], batch: int, appenders: int, seconds: float) -> Tally:
    tally = Tally()
    deadline = time.perf_counter() + seconds

    async def appender(mine: list[Conv]) -> None:
        i = 0
        while time.perf_counter() < deadline:
            conv = mine[i % len(mine)]
            i += 1
            await store.append(PRINCIPAL, conv.id, conv.batch(batch))
            tally.events += batch
            tally.appends += 1

    tx0, ops0, cpu0 = store.writer.transactions, store.writer.ops, time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(appender(convs[a * CONVS_PER_APPENDER:(a + 1) * CONVS_PER_APPENDER])
                           for a in range(appenders)))
    tally.seconds = time.perf_counter() - t0
    tally.cpu = time.process_time() - cpu0
    tally.transactions = store.writer.transactions - tx0
    tally.ops = store.writer.ops - ops0
    return tally


async def throughput(cfg: Config, grouped: Store, single: Store, convs: list[Conv]) -> str:
    stores = {"G": grouped, "S": single}
    rows = []
    for batch in BATCHES:
        for appenders in CONCURRENCY:
            tallies = {"G": Tally(), "S": Tally()}
            ratios = []
            for k in range(cfg.pairs):
                pair = {}
                for variant in (("G", "S") if k % 2 == 0 else ("S", "G")):
                    pair[variant] = await run_cell(stores[variant], convs, batch, appenders, cfg.cell_seconds)
                    tallies[variant].add(pair[variant])
                ratios.append((pair["G"].events / pair["G"].seconds) / (pair["S"].events / pair["S"].seconds))
            g, s = tallies["G"], tallies["S"]
            g_rate, s_rate = g.events / g.seconds, s.events / s.seconds
            ratio = statistics.median(ratios)
            log(f"batch {batch:>4} × {appenders:>2} appenders: group {g_rate:,.0f} ev/s, single {s_rate:,.0f} ev/s, "
                f"ratio {ratio:.2f}")
            rows.append([
                str(batch), str(appenders),
                fmt_int(g_rate), fmt_int(g.appends / g.seconds),
                f"{g.appends:,} / {g.transactions:,}", f"{g.ops / max(1, g.transactions):.2f}",
                fmt_int(s_rate), f"{s.ops / max(1, s.transactions):.2f}",
                f"**{fmt_ratio(ratio)}**", f"{min(ratios):.2f}–{max(ratios):.2f}",
                f"{100 * g.cpu / g.seconds:.0f}% / {100 * s.cpu / s.seconds:.0f}%",
            ])
    headers = ["batch", "appenders", "group: events/s", "group: appends/s", "group: appends, transactions",
               "group: appends per tx", "one-tx-per-append: events/s", "single: appends per tx",
               "group ÷ single (median of pairs)", "pair ratios min–max", "bench CPU (G / S)"]
    return table(headers, rows)


# -- 3: latency under light load ----------------------------------------------


async def latency(cfg: Config, grouped: Store, single: Store) -> str:
    stores = {"G": grouped, "S": single}
    probe = {v: await new_conversation(grouped) for v in stores}
    background_convs = [await new_conversation(grouped) for _ in range(4)]
    current = {"store": grouped}
    stop = asyncio.Event()

    async def background(conv: Conv) -> None:
        # 4 clients × one 1-event append every 20 ms ≈ 200 appends/s in total
        while not stop.is_set():
            await current["store"].append(PRINCIPAL, conv.id, conv.batch(1))
            await asyncio.sleep(0.02)

    chunk = 10
    rows = []
    samples_by_level = {}
    for level in ("alone", "light background"):
        samples: dict[str, list[float]] = {"G": [], "S": []}
        tasks = []
        if level != "alone":
            stop.clear()
            tasks = [asyncio.create_task(background(c)) for c in background_convs]
            await asyncio.sleep(0.1)
        rounds = max(1, cfg.latency_samples // chunk)
        for r in range(rounds):
            for variant in (("G", "S") if r % 2 == 0 else ("S", "G")):
                store = stores[variant]
                current["store"] = store
                conv = probe[variant]
                for _ in range(chunk):
                    t = time.perf_counter()
                    await store.append(PRINCIPAL, conv.id, conv.batch(1))
                    samples[variant].append(time.perf_counter() - t)
        if tasks:
            stop.set()
            await asyncio.gather(*tasks)
        samples_by_level[level] = samples
        g, s = samples["G"], samples["S"]
        log(f"latency {level}: group p50 {fmt_ms(pct(g, 50))} ms, single p50 {fmt_ms(pct(s, 50))} ms")
        label = "1 client, nothing else" if level == "alone" else "1 client + 4 clients at ~200 appends/s"
        rows.append([label, str(len(g)),
                     fmt_ms(pct(g, 50)), fmt_ms(pct(g, 99)),
                     fmt_ms(pct(s, 50)), fmt_ms(pct(s, 99)),
                     f"**{fmt_ratio(pct(g, 50) / pct(s, 50))}**", fmt_ratio(pct(g, 99) / pct(s, 99))])
    headers = ["load", "samples per variant", "group p50 ms", "group p99 ms", "single p50 ms", "single p99 ms",
               "p50 group ÷ single", "p99 group ÷ single"]
    return table(headers, rows)


# -- 4: append cost vs conversation length ------------------------------------


async def length_independence(cfg: Config, store: Store) -> tuple[str, Conv]:
    # long: turn after turn of 1000-event batches, the last turn left open
    long = Conv(uuid.uuid4(), "")
    await store.create_conversation(PRINCIPAL, long.id, {"metadata": {"bench": "long"}})
    written = 1
    turns = cfg.long_events // 1000
    t0 = time.perf_counter()
    for t in range(turns):
        turn_id = f"turn-{t}"
        last = t == turns - 1
        body = [NewEvent("text.delta", {"turn_id": turn_id, "text": TEXTS[k % len(TEXTS)]})
                for k in range(999 if last else 998)]
        events = [NewEvent("turn.started", {"turn_id": turn_id, "model": "bench-model"})] + body
        if not last:
            events.append(NewEvent("turn.finished", {"turn_id": turn_id, "finish_reason": "stop"}))
        result = await store.append(PRINCIPAL, long.id, events)
        written = result.last_seq
    build_seconds = time.perf_counter() - t0
    long = Conv(long.id, f"turn-{turns - 1}")
    log(f"built a {written:,}-event conversation in {build_seconds:.1f} s")

    # short: 10 events each (created, turn.started, 8 deltas); many of them so
    # each takes only a few of the measured appends and stays short
    shorts = await asyncio.gather(*(new_conversation(store, deltas=8) for _ in range(50)))
    samples: dict[str, list[float]] = {"short": [], "long": []}
    for i in range(cfg.length_samples):
        pair = (("short", shorts[i % len(shorts)]), ("long", long))
        for kind, conv in (pair if i % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            await store.append(PRINCIPAL, conv.id, conv.batch(1))
            samples[kind].append(time.perf_counter() - t)
    s, lg = samples["short"], samples["long"]
    log(f"length: short p50 {fmt_ms(pct(s, 50))} ms, long p50 {fmt_ms(pct(lg, 50))} ms")
    most = 10 + -(-cfg.length_samples // len(shorts))
    rows = [[f"10 (≤ {most} by the end)", str(len(s)), fmt_ms(pct(s, 50)), fmt_ms(pct(s, 99)), "1.00×"],
            [f"{written:,}", str(len(lg)), fmt_ms(pct(lg, 50)), fmt_ms(pct(lg, 99)),
             f"**{fmt_ratio(pct(lg, 50) / pct(s, 50))}**"]]
    text = table(["conversation length (events)", "samples", "p50 ms", "p99 ms", "p50 ÷ short p50"], rows)
    text += (f"\n\nBuilding the long conversation: {turns} appends of 1000 events, one after the other, "
             f"{build_seconds:.1f} s = {fmt_int((written - 1) / build_seconds)} events/s.")
    return text, long


# -- 5: reads ---------------------------------------------------------------------


async def reads(cfg: Config, store: Store, long: Conv) -> str:
    async def feed_pass() -> tuple[int, float, list[float]]:
        after, n, pages = 0, 0, []
        t0 = time.perf_counter()
        while n < cfg.read_cap:
            t = time.perf_counter()
            page = await store.read_feed(PRINCIPAL, after, 1000)
            pages.append(time.perf_counter() - t)
            if not page:
                break
            n += len(page)
            after = page[-1]["position"]
        return n, time.perf_counter() - t0, pages

    async def conversation_pass() -> tuple[int, float, list[float]]:
        after, n, pages = 0, 0, []
        t0 = time.perf_counter()
        while n < cfg.read_cap:
            t = time.perf_counter()
            events, _ = await store.read_events(PRINCIPAL, long.id, after, 1000)
            pages.append(time.perf_counter() - t)
            if not events:
                break
            n += len(events)
            after = events[-1]["seq"]
        return n, time.perf_counter() - t0, pages

    passes = {"feed": feed_pass, "conv": conversation_pass}
    totals = {k: [0, 0.0, []] for k in passes}
    for r in range(cfg.read_rounds):
        for kind in (("feed", "conv") if r % 2 == 0 else ("conv", "feed")):
            n, seconds, pages = await passes[kind]()
            totals[kind][0] += n
            totals[kind][1] += seconds
            totals[kind][2] += pages
    rates = {k: v[0] / v[1] for k, v in totals.items()}
    log(f"reads: feed {rates['feed']:,.0f} ev/s, read_events {rates['conv']:,.0f} ev/s")
    rows = [
        ["global feed `read_feed(limit=1000)`", fmt_int(totals["feed"][0]), fmt_int(rates["feed"]),
         fmt_ms(pct(totals["feed"][2], 50)), fmt_ms(pct(totals["feed"][2], 99)),
         f"**{fmt_ratio(rates['feed'] / rates['conv'])}**"],
        ["one conversation `read_events(limit=1000)`", fmt_int(totals["conv"][0]), fmt_int(rates["conv"]),
         fmt_ms(pct(totals["conv"][2], 50)), fmt_ms(pct(totals["conv"][2], 99)), "1.00×"],
    ]
    return table(["read", "events read", "events/s", "page p50 ms", "page p99 ms", "÷ read_events"], rows)


# -- main ---------------------------------------------------------------------


async def main(cfg: Config) -> None:
    started = time.perf_counter()
    server = TestServer()
    admin_url = await server.start()
    source = ("TEST_DATABASE_URL/DATABASE_URL" if (os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL"))
              else "embedded (pgserver)" if server.embedded is not None else "local 127.0.0.1:5432")
    name = f"chatlog_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        server.databases.append(name)  # server.close() drops it
        pg_version = await admin.fetchval("SHOW server_version")
        sync_commit = await admin.fetchval("SHOW synchronous_commit")
    finally:
        await admin.close()
    dsn = with_database(admin_url, name)
    grouped = single = None
    try:
        from store.migrate import migrate

        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

        # The store as the app opens it, and the same store with grouping off.
        grouped = await Store.open(dsn, pool_size=10, writers=4)
        single = Store(await create_pool(dsn, min_size=2, max_size=10), writers=4, max_group_events=1)

        cpu_model = platform.processor() or "?"
        try:
            with open("/proc/cpuinfo") as f:
                cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        out = [f"## chatlog append benchmark ({'--quick' if cfg.quick else 'full'})", "",
               f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model}; "
               f"load average before start {os.getloadavg()[0]:.2f}",
               f"- PostgreSQL {pg_version} ({source}), synchronous_commit={sync_commit}; "
               f"Python {platform.python_version()}, asyncpg {asyncpg.__version__}",
               "- variants: **group** = `Store.open(dsn, pool_size=10, writers=4)` (group commit); "
               "**single** = `Store(pool of 10, writers=4, max_group_events=1)`: same code, one append per "
               "transaction",
               f"- bench process and PostgreSQL share the machine; each throughput cell runs {cfg.pairs} "
               f"back-to-back pairs (G S, S G, …) of {cfg.cell_seconds} s each; absolute figures are totals, "
               "the ratio is the median of the pairs' ratios",
               "- noise floor: with 1 appender both variants run the same code (every group holds one "
               "append), so the 1-appender rows' group ÷ single is an A/A comparison; its distance "
               "from 1.00× is this run's noise", ""]

        log("creating conversations")
        convs = list(await asyncio.gather(*(new_conversation(grouped)
                                            for _ in range(max(CONCURRENCY) * CONVS_PER_APPENDER))))
        log("warming up")
        for store in (grouped, single):
            await run_cell(store, convs, 10, 8, 0.3)

        log("1+2: throughput")
        out += ["### 1+2. Append throughput: group commit vs one transaction per append",
                "`text.delta` events inside an open turn; each appender appends to its own "
                f"{CONVS_PER_APPENDER} conversations in turn ({max(CONCURRENCY) * CONVS_PER_APPENDER} "
                "conversations in all). Appends and transactions are the GroupWriter counters `ops` and `transactions`.",
                "", await throughput(cfg, grouped, single, convs), ""]

        log("3: latency")
        out += ["### 3. Latency of one 1-event append under light load",
                "Chunks of 10 sequential appends, alternating G S / S G between the variants.", "",
                await latency(cfg, grouped, single), ""]

        log(f"4: building a {cfg.long_events:,}-event conversation")
        text, long = await length_independence(cfg, grouped)
        out += ["### 4. Append cost vs conversation length (group store, 1-event appends, alternating)", "",
                text, ""]

        log("5: reads")
        # Autovacuum may or may not have analysed the freshly filled table by
        # now; without statistics the feed query's plan reads every matching
        # row per page. ANALYZE so the figures are the steady state.
        await grouped.pool.execute("ANALYZE events")
        total = await grouped.pool.fetchval("SELECT count(*) FROM events WHERE principal = $1", PRINCIPAL)
        out += ["### 5. Reads",
                f"The feed holds {total:,} events of this principal, from many conversations; the conversation "
                f"read is the long one from 4. At most {cfg.read_cap:,} events per pass, "
                f"{cfg.read_rounds} pass(es) each, alternating; `ANALYZE events` first.", "",
                await reads(cfg, grouped, long), ""]
        out.append(f"_total run time {time.perf_counter() - started:.0f} s_")
        print("\n".join(out), flush=True)
    finally:
        for store in (grouped, single):
            if store is not None:
                await store.close()
        await server.close()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.append", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< ~40 s)")
    args = parser.parse_args()
    asyncio.run(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
