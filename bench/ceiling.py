"""The ceiling of one PostgreSQL in concurrent streaming turns at 50 deltas/s
each, through one server with 4 workers.

Open loop: wrk (2 threads, one connection per turn) posts one text.delta per
request on a fixed schedule, N × 50 requests/s in all (post.lua paces each
request to the next slot of the schedule, whatever the latency), round robin
over N conversations with an open turn, so each turn gets one delta every
20 ms. N rises step by step; a step holds when the achieved rate is ≥ 95 % of
the offered one and the append p99 is ≤ 100 ms (and nothing fails). The
ceiling is the largest N that held; the CPU figures of the first step that did
not hold say what ran out first."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.core import Bench
from bench.ingest import HttpIngest, HttpTarget

RATE = 50  # deltas per second per turn
THREADS = 2  # wrk threads: the pacing works per thread


def _ladder(bench: Bench) -> list[int]:
    return [10, 40] if bench.quick else [25, 50, 100, 150, 200, 300, 400, 600, 800, 1200]


async def run(bench: Bench) -> None:
    ladder = _ladder(bench)
    seconds = 1.0 if bench.quick else 8.0
    held, failed, steps = 0, None, []
    async with HttpTarget(bench, workers=4, conversations=max(ladder)) as http:
        all_ids = http.ids.read_text().split()
        for n in ladder:
            ids = Path(tempfile.mkstemp(prefix="chatlog-bench-turns-", suffix=".txt")[1])
            ids.write_text("\n".join(all_ids[:n]) + "\n")
            http.ids, whole = ids, http.ids
            try:
                variant = HttpIngest(http, batch=1, connections=n)
                achieved = await http.load(variant, seconds, rate_per_thread=n * RATE / THREADS, threads=THREADS)
            finally:
                http.ids = whole
                ids.unlink(missing_ok=True)
            offered = n * RATE
            p99 = variant.last.p99_ms
            ok = achieved >= 0.95 * offered and p99 <= 100 and variant.last.errors == 0
            step = (f"{n} turns: {achieved:,.0f} of {offered:,} deltas/s ({achieved / offered:.0%}), "
                    f"{variant.last.describe()}, {http.last_cpu.describe()}")
            steps.append(step)
            bench.progress(step + ("" if ok else " — does not hold"))
            if not ok:
                reason = ("rate below 95 % of offered" if achieved < 0.95 * offered
                          else "p99 above 100 ms" if p99 > 100 else "answers 503")
                failed = (n, reason, http.last_cpu.first_to_run_out(4))
                break
            held = n
    if failed is None:
        out_first = f"nothing within the ladder: {ladder[-1]} turns held, the ceiling is higher"
    else:
        out_first = f"at {failed[0]} turns ({failed[1]}): {failed[2]}"
    bench.row(f"concurrent streaming turns at {RATE} deltas/s, 4 workers, 1 delta per request (largest N that held)",
              held, "turns", note=f"first to run out {out_first}. Steps: " + "; ".join(steps))
