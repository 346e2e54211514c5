"""Commit-to-client latency of SSE streams under many readers.

    .venv/bin/python -m bench.stream_latency                 # 500 readers, ~1.5 minutes
    .venv/bin/python -m bench.stream_latency --readers 100 --seconds 10

Real `chatlog serve` processes (workers=1) on a fresh database (found as the
tests find PostgreSQL, dropped at the end). `--readers` SSE readers follow a
handful of conversations, in a process of their own so their parsing does not
share an event loop with the writer. The writer appends one `text.delta` at a
time at a steady rate (each conversation its own writer task); the delta's
text is `time.time()` just before the append is sent, and the writer also
notes when each append returned (the commit is then known). Each reader notes
when each frame arrived. Two latencies per delivered frame:

- append → client: arrival − the stamp in the text (append round trip + wake-up + delivery);
- commit → client: arrival − when the append call returned (can be < 0: the
  NOTIFY may beat the HTTP response back to the writer).

Variants, one after the other in the same run:
- same process: readers on A, writer through A;
- cross process: readers on B, writer through A (B hears commits through its own LISTEN).

Every reader must receive every event exactly once; the table says if not.
The machine is shared and noisy: read the figures as orders of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from array import array
from pathlib import Path

import httpx

from tests.pg import TestServer
from tests.servers import ChatlogServer, Frame, RawSSE, auth


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the readers' process -------------------------------------------------------------


def readers_main(url: str, paths: list[str], ready, stop, results) -> None:
    asyncio.run(_readers(url, paths, ready, stop, results))


async def _readers(url: str, paths: list[str], ready, stop, results) -> None:
    """Connect every reader, report ready, read until told to stop; send back
    (conversation index, seq, arrival) for every frame, and the errors."""
    conv_ix = array("i")
    seqs = array("i")
    arrivals = array("d")
    stamps = array("d")
    errors: list[str] = []
    gate = asyncio.Semaphore(50)  # connect in small waves

    async def read(path: str, index: int, connected: asyncio.Event) -> None:
        async with gate:
            stream = await RawSSE.connect(url, path, auth("alice"))
            status = await stream.start()
        if status != 200:
            errors.append(f"{path}: HTTP {status}")
            connected.set()
            return
        connected.set()
        try:
            async for item in stream.items():
                if isinstance(item, Frame):
                    now = time.time()
                    event = item.json()
                    conv_ix.append(index)
                    seqs.append(event["seq"])
                    arrivals.append(now)
                    stamps.append(float(event["data"]["text"]))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            stream.hang_up()

    events = [asyncio.Event() for _ in paths]
    tasks = [asyncio.create_task(read(path.split("#")[0], int(path.split("#")[1]), event))
             for path, event in zip(paths, events)]
    await asyncio.gather(*(e.wait() for e in events))
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let the last frames arrive
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    results.put((conv_ix.tobytes(), seqs.tobytes(), arrivals.tobytes(), stamps.tobytes(), errors))


# -- the writer and one variant ---------------------------------------------------------


async def new_conversation(client: httpx.AsyncClient) -> tuple[str, int]:
    cid = (await client.post("/v1/conversations", json={})).json()["id"]
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"type": "message.user", "data": {"content": "go"}},
        {"type": "turn.started", "data": {"turn_id": "t"}}]})
    return cid, r.json()["last_seq"]


async def write(client: httpx.AsyncClient, cid: str, rate: float, seconds: float, returned: dict) -> None:
    """One text.delta every 1/rate s (absolute schedule: a slow append is not
    followed by a pause), text = the send time."""
    start = time.monotonic()
    i = 0
    while (due := start + i / rate) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        r = await client.post(f"/v1/conversations/{cid}/events", json={
            "events": [{"type": "text.delta", "data": {"turn_id": "t", "text": repr(time.time())}}]})
        returned[(cid, r.json()["last_seq"])] = time.time()
        i += 1


async def variant(name: str, writer: ChatlogServer, reader: ChatlogServer, readers: int, conversations: int,
                  rate: float, seconds: float) -> dict:
    async with writer.client(limits=httpx.Limits(max_connections=conversations + 2)) as client:
        convs = [await new_conversation(client) for _ in range(conversations)]
        paths = [f"/v1/conversations/{convs[i % conversations][0]}/stream?after={convs[i % conversations][1]}"
                 f"#{i % conversations}" for i in range(readers)]
        ctx = multiprocessing.get_context("spawn")
        ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=readers_main, args=(reader.url, paths, ready, stop, results), daemon=True)
        proc.start()
        log(f"{name}: connecting {readers} readers to {reader.name}")
        while not ready.is_set():
            if not proc.is_alive():
                raise RuntimeError("the readers' process died")
            await asyncio.sleep(0.1)
        log(f"{name}: writing {rate:g} deltas/s through {writer.name} for {seconds:g} s")
        returned: dict[tuple[str, int], float] = {}
        per_conv = rate / conversations
        await asyncio.gather(*(write(client, cid, per_conv, seconds, returned) for cid, _ in convs))
        stop.set()
        raw = await asyncio.to_thread(results.get, True, 120)
        proc.join(30)
    conv_ix, seqs, arrivals, stamps = (array(t, b) for t, b in zip("iidd", raw[:4]))
    errors = raw[4]
    sent_lat, commit_lat = [], []
    seen: dict[tuple[int, int], int] = {}
    for ix, seq, arrival, stamp in zip(conv_ix, seqs, arrivals, stamps):
        cid = convs[ix][0]
        sent_lat.append(arrival - stamp)
        commit_lat.append(arrival - returned[(cid, seq)])
        seen[(ix, seq)] = seen.get((ix, seq), 0) + 1
    readers_per_conv = [sum(1 for i in range(readers) if i % conversations == c) for c in range(conversations)]
    written = {(next(i for i, c in enumerate(convs) if c[0] == cid), seq) for cid, seq in returned}
    expected = sum(readers_per_conv[ix] for ix, _ in written)
    wrong = sum(1 for key in written if seen.get(key, 0) != readers_per_conv[key[0]])
    return {"name": name, "readers": readers, "conversations": conversations, "events": len(returned),
            "rate": len(returned) / seconds, "frames": len(sent_lat), "expected": expected, "wrong": wrong,
            "errors": errors, "sent": sent_lat, "commit": commit_lat}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000 if ordered else float("nan")


def table(rows: list[dict]) -> str:
    out = ["| variant | readers / convs | events written (per s) | frames delivered / expected | latency | "
           "p50 ms | p90 ms | p99 ms | max ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind, label in (("sent", "append → client"), ("commit", "commit → client")):
            values = r[kind]
            out.append(f"| {r['name']} | {r['readers']} / {r['conversations']} | {r['events']} ({r['rate']:.0f}/s) | "
                       f"{r['frames']} / {r['expected']} | {label} | {pct(values, 50):.1f} | {pct(values, 90):.1f} | "
                       f"{pct(values, 99):.1f} | {max(values) * 1000 if values else float('nan'):.1f} |")
    return "\n".join(out)


async def main(args: argparse.Namespace) -> None:
    started, load = time.monotonic(), os.getloadavg()[0]
    pg = TestServer()
    await pg.start()
    database_url = await pg.create_database()
    logs = Path(tempfile.mkdtemp(prefix="chatlog-bench-stream-"))
    a = ChatlogServer("A", database_url, logs)
    b = ChatlogServer("B", database_url, logs)
    try:
        await asyncio.gather(a.start(), b.start())
        rows = [await variant("same process (A→A)", a, a, args.readers, args.conversations, args.rate, args.seconds),
                await variant("cross process (A→B)", a, b, args.readers, args.conversations, args.rate,
                              args.seconds)]
        print()
        print(f"## SSE commit-to-client latency ({os.cpu_count()} CPUs, load average before start "
              f"{load:.2f}; one `chatlog serve` per process, workers=1; readers in one process "
              f"of their own)")
        print()
        print(table(rows))
        for r in rows:
            if r["wrong"] or r["errors"]:
                print(f"\n**{r['name']}: {r['wrong']} (conversation, seq) pairs not delivered exactly once per "
                      f"reader; errors: {r['errors'][:5]}**")
        print(f"\n_total run time {time.monotonic() - started:.0f} s; server logs in {logs}_")
    finally:
        await asyncio.gather(a.stop(), b.stop())
        await pg.close()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=500, help="SSE readers (default 500)")
    parser.add_argument("--conversations", type=int, default=5, help="conversations they follow (default 5)")
    parser.add_argument("--rate", type=float, default=50.0, help="deltas appended per second, in all (default 50)")
    parser.add_argument("--seconds", type=float, default=20.0, help="writing time per variant (default 20)")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
