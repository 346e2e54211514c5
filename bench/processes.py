"""The same HTTP load (wrk, 200 connections; 50 with --quick) on 1, 2 and 4 workers
(`chatlog serve --workers N`), each on a fresh database; what runs out first,
from the CPU the server's processes, PostgreSQL's backends and wrk used
(/proc) while it ran. Rounds alternate the order of the worker counts."""

from __future__ import annotations

import statistics

from bench.core import Bench
from bench.ingest import HttpIngest, HttpTarget

WORKERS = (1, 2, 4)


async def run(bench: Bench) -> None:
    rounds, seconds = (1, 1.0) if bench.quick else (2, 5.0)
    connections = 50 if bench.quick else 200
    batches = (10,) if bench.quick else (1, 10)
    figures: dict[tuple[int, int], list[float]] = {}
    why: dict[tuple[int, int], str] = {}
    for r in range(rounds):
        for workers in (WORKERS if r % 2 == 0 else WORKERS[::-1]):
            bench.progress(f"round {r + 1}/{rounds}: {workers} worker(s)")
            async with HttpTarget(bench, workers, 50 if bench.quick else 1000) as http:
                for batch in batches:
                    variant = HttpIngest(http, batch, connections)
                    rate = await http.load(variant, seconds)
                    figures.setdefault((workers, batch), []).append(rate)
                    cpu = http.last_cpu
                    why[(workers, batch)] = (f"{variant.last.describe()}; {cpu.describe()}; first to run out: "
                                             f"{cpu.first_to_run_out(workers)}")
                    bench.progress(f"{workers} worker(s), batch {batch}: {rate:,.0f} events/s; {why[(workers, batch)]}")
    for batch in batches:
        one = statistics.median(figures[(1, batch)])
        for workers in WORKERS:
            value = statistics.median(figures[(workers, batch)])
            bench.row(f"HTTP (wrk), {connections} connections, batch {batch}, {workers} worker(s)", value, "events/s",
                      ratio=value / one if one else None, ratio_of=f"1 worker, batch {batch}",
                      note=why[(workers, batch)] + f"; {rounds} round(s): "
                      + ", ".join(f"{x:,.0f}" for x in figures[(workers, batch)]))
