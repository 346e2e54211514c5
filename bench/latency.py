"""Live latency: commit → SSE client with 500 readers on one worker (goal: p99 ≤ 20 ms).

Two `chatlog serve` processes (workers=1) on one database, A and B. READERS
SSE readers follow a few conversations on A, in a process of their own
(bench/sse.py), which stamps each frame when its bytes arrive. Rounds
alternate (the order flips every round) between writing through A (the
readers' own process: the commit is heard in-process) and through B (A hears
it through its own LISTEN). Writers append one `text.delta` per request at a
steady rate, one writer per conversation, and note for each append when it
was sent and when its answer came back. Per delivered frame:

- commit → client: arrival − when the append's answer came back. The commit
  happened before the answer was sent, so this is what a reader waits after
  the writer learns its event is durable; it can be < 0 (the NOTIFY may beat
  the HTTP answer back to the writer).
- append → client: arrival − when the append was sent (adds the writer's own
  round trip on the loaded server): shown in the note.

Every reader must receive every event exactly once, in order; anything else
breaks the run. A 1 s warm-up through each server comes first, unmeasured.
(Was bench/stream_latency.py, which moved the readers between
the variants and ran them one after the other.)
"""

from __future__ import annotations

import asyncio
import time

import orjson

from bench.core import Bench
from bench.sse import Http, Readers, ReadersFailed, check_exactly_once, pct, turn_in_progress, write_deltas

GOAL_MS = 20.0


async def run(bench: Bench) -> None:
    if bench.quick:
        readers, conversations, rate, seconds, rounds = 30, 3, 30.0, 1.5, 2
    else:
        readers, conversations, rate, seconds, rounds = 500, 5, 50.0, 8.0, 4
    database = await bench.database()
    async with bench.server(database) as a, bench.server(database) as b:
        writers = {"A": [await Http.connect(a) for _ in range(conversations)],
                   "B": [await Http.connect(b) for _ in range(conversations)]}
        try:
            convs = [await turn_in_progress(writers["A"][0]) for _ in range(conversations)]
            paths = [f"/v1/conversations/{convs[i % conversations][0]}/stream?compact=false"
                     f"&after={convs[i % conversations][1]}" for i in range(readers)]
            got: list[list[int]] = [[] for _ in range(readers)]
            latency = {v: {"commit": [], "append": []} for v in "AB"}
            bench.progress(f"latency: connecting {readers} readers to {conversations} conversations on A")
            async with Readers(a, paths) as reading:
                # a 1 s warm-up through each, not measured (just-connected readers' first wake-ups cost more)
                for via in ("A", "B"):
                    done = await asyncio.gather(*(write_deltas(http, cid, rate / conversations, 1.0)
                                                  for http, (cid, _) in zip(writers[via], convs)))
                    await reading.until({i: done[i % conversations][-1][0] for i in range(readers)})
                for i, (seqs, _) in enumerate(await reading.take()):
                    got[i] += seqs
                started, reader_cpu = time.monotonic(), reading.cpu_seconds()
                for r in range(rounds):
                    for via in ("A", "B") if r % 2 == 0 else ("B", "A"):
                        done = await asyncio.gather(*(
                            write_deltas(http, cid, rate / conversations, seconds, offset=k / rate)
                            for k, (http, (cid, _)) in enumerate(zip(writers[via], convs))))
                        await reading.until({i: done[i % conversations][-1][0] for i in range(readers)})
                        times = [{seq: (sent, returned) for seq, sent, returned, _ in appends} for appends in done]
                        for i, (seqs, arrivals) in enumerate(await reading.take()):
                            written = times[i % conversations]
                            for seq, arrival in zip(seqs, arrivals):
                                if seq not in written:
                                    raise ReadersFailed(f"reader {i} got seq {seq}, not written in this round")
                                sent, returned = written[seq]
                                latency[via]["commit"].append(arrival - returned)
                                latency[via]["append"].append(arrival - sent)
                            got[i] += seqs
                    bench.progress(f"latency: round {r + 1}/{rounds}: commit → client p99 "
                                   f"{pct(latency['A']['commit'], 0.99) * 1000:.1f} ms via A, "
                                   f"{pct(latency['B']['commit'], 0.99) * 1000:.1f} ms via B")
                reader_cores = (reading.cpu_seconds() - reader_cpu) / (time.monotonic() - started)
            heads = [orjson.loads((await writers["A"][0].request("GET", f"/v1/conversations/{cid}"))[1])["seq"]
                     for cid, _ in convs]
        finally:
            for http in writers["A"] + writers["B"]:
                await http.close()
    for i, seqs in enumerate(got):
        start = convs[i % conversations][1]
        check_exactly_once(seqs, list(range(start + 1, heads[i % conversations] + 1)), f"reader {i}")
    frames = sum(len(seqs) for seqs in got)
    setup = (f"{readers} readers on {conversations} conversations on one worker, {rate:g} appends/s, "
             f"{rounds} interleaved rounds of {seconds:g} s per variant; {frames:,} frames, every reader every "
             f"event once; the readers' process used {reader_cores:.2f} of a core")
    for via, where in (("A", "the readers' process"), ("B", "another process")):
        commit, append = (sorted(latency[via][k]) for k in ("commit", "append"))
        p50, p99 = pct(commit, 0.5) * 1000, pct(commit, 0.99) * 1000
        bench.row(f"commit → client p99, writer on {where}", p99, "ms", goal=f"p99 ≤ {GOAL_MS:g} ms",
                  met=p99 <= GOAL_MS, note=setup if via == "A" else "the same readers, on A; the writer through B")
        bench.row(f"commit → client p50, writer on {where}", p50, "ms",
                  note=f"append → client p50 {pct(append, 0.5) * 1000:.1f} ms, p99 {pct(append, 0.99) * 1000:.1f} ms")
