"""Resume mid-turn with Last-Event-ID: time to the first frame (goal: p50 ≤ 5 ms).

A turn still streaming, 10,000 events long (turn.started and 9,999 text
deltas; 1,000 with --quick), written at the store level; one read at its
last seq writes the folds' snapshots, as the first reader of the history
would. A reader that dropped somewhere inside the turn reconnects to a real
`chatlog serve` with `Last-Event-ID` = the last frame it got (a seq drawn at
random inside the turn; `<seq>:0` for format=ui) and the clock runs from
opening the socket to the first complete frame. Variants, interleaved sample
by sample: the conversation's stream and the turn's own stream, each in
format=events and format=ui, with the defaults a client gets (compacted
catch-up, then live). The first frame must come after the resume point.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from bench.core import Bench
from bench.messages import open_store, open_turn, write_history, write_snapshots
from bench.sse import Dechunker, pct

GOAL_MS = 5.0
TURN = "live"


async def first_frame(url: str, path: str, last_event_id: str, timeout: float = 30) -> tuple[float, str]:
    """(ms from connecting to the first complete frame of `path` resumed after `last_event_id`, its id)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
                     f"Last-Event-ID: {last_event_id}\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0]
            if status.split(b" ", 2)[1] != b"200":
                raise RuntimeError(f"GET {path}: {status!r}")
            dechunk, body = Dechunker(), b""
            while True:
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError(f"GET {path}: the stream ended before a frame")
                body += dechunk.feed(data)
                at = body.find(b"id: ")
                if at >= 0 and body.find(b"\n\n", at) >= 0:
                    return (time.perf_counter() - start) * 1000, body[at + 4:body.index(b"\n", at)].decode()
    finally:
        writer.transport.abort()


def variants(cid: uuid.UUID) -> dict[str, tuple[str, str]]:
    """name -> (path, format)"""
    conversation, turn = f"/v1/conversations/{cid}/stream", f"/v1/conversations/{cid}/turns/{TURN}/stream"
    return {"conversation stream, format=events": (conversation, "events"),
            "conversation stream, format=ui": (conversation + "?format=ui", "ui"),
            "turn stream, format=events": (turn, "events"),
            "turn stream, format=ui": (turn + "?format=ui", "ui")}


async def resume_once(url: str, path: str, format: str, seq: int) -> float:
    """Resume after `seq` (checked: the first frame comes after it); ms to the first frame."""
    ms, frame_id = await first_frame(url, path, f"{seq}:0" if format == "ui" else str(seq))
    got = tuple(int(x) for x in frame_id.split(":"))
    if got <= ((seq, 0) if format == "ui" else (seq,)):
        raise RuntimeError(f"{path} resumed after {seq} gave frame {frame_id} first")
    return ms


async def run(bench: Bench) -> None:
    turn, samples = (1_000, 15) if bench.quick else (10_000, 100)
    database = await bench.database()
    store = await open_store(database)
    try:
        cid, last = await write_history(store, open_turn(turn - 1, TURN))
        await write_snapshots(store, cid, last)
    finally:
        await store.close()
    first = last - turn + 1  # turn.started
    timings: dict[str, list[float]] = {name: [] for name in variants(cid)}
    async with bench.server(database) as url:
        rng = random.Random(11)
        for _ in range(samples):
            seq = rng.randint(first + 1, last - 1)
            for name, (path, format) in variants(cid).items():
                timings[name].append(await resume_once(url, path, format, seq))
    for name, values in timings.items():
        p50 = pct(values, 0.5)
        bench.row(f"resume mid-turn, {name}: first frame p50", p50, "ms", goal=f"p50 ≤ {GOAL_MS:g} ms",
                  met=p50 <= GOAL_MS, note=f"{turn:,}-event open turn, {samples} random resume points, interleaved; "
                                           f"p99 {pct(values, 0.99):.1f} ms")
