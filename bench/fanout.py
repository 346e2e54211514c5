"""Fan-out: what live readers cost the writers, and what idle readers cost the server.

Appends with readers vs without (goal: p50 ≤ 1.5×). One `chatlog serve`
(workers=1); two sets of conversations, each with an open turn: 300 SSE
readers (in a process of their own, bench/sse.py) follow the first set, nobody
follows the second. After a 1 s warm-up of each (not measured), rounds
alternate between the sets (the order flips every round): one writer per
conversation appends one `text.delta` per HTTP request at a steady rate. The
readers stay connected throughout, so the only difference between the
variants is whether the written conversation has followers. Every reader must
receive every event written to its conversation exactly once, in order;
anything else breaks the run.

Idle readers (was bench/idle_readers.py, issue 7) come first, on the same
server while nothing has used it yet (a clean RSS baseline): 1,000 readers
with a 4 KB receive buffer read the response head and never read again (the
worst case: the server's writes back up) while events are appended to the
conversations they follow. Rows: server RSS per connected reader, RSS growth
per stalled reader while the events pile up (next to the SSE backlog each
reader was sent: what must stay bounded is this growth, never a copy of every
event), server CPU per (reader × event) during the appends, and in its note
the CPU to drop them all. tests/test_idle_readers.py asserts the behaviour
behind these figures.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import orjson

from bench.core import Bench, cpu_seconds
from bench.sse import (Http, Readers, check_exactly_once, pct, raise_fd_limit, rss_bytes, turn_in_progress,
                       write_deltas)

KB = 1024


async def run(bench: Bench) -> None:
    database = await bench.database()
    async with bench.server(database) as url:
        await idle_readers(bench, url)  # first: its baseline is a server nothing has used yet
        await fanout(bench, url)


async def fanout(bench: Bench, url: str) -> None:
    if bench.quick:
        readers, conversations, rate, seconds, rounds = 30, 3, 10.0, 1.5, 2
    else:
        readers, conversations, rate, seconds, rounds = 300, 10, 5.0, 6.0, 4
    https = [await Http.connect(url) for _ in range(conversations)]
    try:
        followed = [await turn_in_progress(https[0]) for _ in range(conversations)]
        alone = [await turn_in_progress(https[0]) for _ in range(conversations)]
        paths = [f"/v1/conversations/{followed[i % conversations][0]}/stream?compact=false"
                 f"&after={followed[i % conversations][1]}" for i in range(readers)]
        bench.progress(f"fan-out: connecting {readers} readers to {conversations} conversations")
        latencies: dict[str, list[float]] = {"followed": [], "alone": []}
        async with Readers(url, paths) as reading:
            # a warm-up round, not measured: the first wake-ups of just-connected readers cost the
            # server more (a full run measured 168 ms vs 15 ms in the first round, equal after)
            warm_up = {}
            for variant, convs in (("alone", alone), ("followed", followed)):
                done = await asyncio.gather(*(write_deltas(http, cid, rate, 1.0)
                                              for http, (cid, _) in zip(https, convs)))
                warm_up[variant] = statistics.median(d[3] for appends in done for d in appends) * 1000
            await reading.until({i: done[i % conversations][-1][0] for i in range(readers)})
            started, reader_cpu = time.monotonic(), reading.cpu_seconds()
            for r in range(rounds):
                this_round: dict[str, list[float]] = {}
                for variant in (("followed", "alone") if r % 2 == 0 else ("alone", "followed")):
                    convs = followed if variant == "followed" else alone
                    done = await asyncio.gather(*(
                        write_deltas(http, cid, rate, seconds, offset=k / (rate * conversations))
                        for k, (http, (cid, _)) in enumerate(zip(https, convs))))
                    this_round[variant] = [d[3] for appends in done for d in appends]
                    latencies[variant] += this_round[variant]
                    if variant == "followed":
                        last = {i: done[i % conversations][-1][0] for i in range(readers)}
                        await reading.until(last)
                bench.progress(f"fan-out: round {r + 1}/{rounds}: append p50 "
                               f"{statistics.median(this_round['followed']) * 1000:.2f} ms followed, "
                               f"{statistics.median(this_round['alone']) * 1000:.2f} ms alone")
            reader_cores = (reading.cpu_seconds() - reader_cpu) / (time.monotonic() - started)
            got = await reading.take()
        heads = {cid: (await https[0].request("GET", f"/v1/conversations/{cid}"))[1] for cid, _ in followed}
    finally:
        for http in https:
            await http.close()
    frames = 0
    for i, (seqs, _) in enumerate(got):
        cid, start = followed[i % conversations]
        head = orjson.loads(heads[cid])["seq"]
        check_exactly_once(seqs, list(range(start + 1, head + 1)), f"reader {i}")
        frames += len(seqs)
    with_readers, alone_p50 = (statistics.median(latencies[v]) * 1000 for v in ("followed", "alone"))
    ratio = with_readers / alone_p50
    note = (f"{conversations} conversations × {readers // conversations} readers, {rate:g} appends/s each, "
            f"{rounds} interleaved rounds of {seconds:g} s; {frames:,} frames, every reader every event once "
            f"(the readers' process used {reader_cores:.2f} of a core); "
            f"p99 {pct(latencies['followed'], 0.99) * 1000:.1f} vs {pct(latencies['alone'], 0.99) * 1000:.1f} ms; "
            f"a 1 s warm-up before the rounds (not counted): p50 {warm_up['followed']:.1f} vs {warm_up['alone']:.1f} ms")
    bench.row(f"append p50, {readers} readers following", with_readers, "ms", ratio=ratio,
              ratio_of="append p50 with none", goal="≤ 1.5×", met=ratio <= 1.5, note=note)
    bench.row("append p50, no readers", alone_p50, "ms", note="the same server, conversations nobody follows")


# -- idle readers -------------------------------------------------------------------------


class Stalled:
    """A reader that reads the response head and then never reads again (4 KB receive buffer)."""

    RCVBUF = 4096

    def __init__(self, sock: socket.socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sock, self.reader, self.writer = sock, reader, writer

    @classmethod
    async def open(cls, url: str, path: str) -> "Stalled | None":
        """The reader, or None when the server answered anything but 200 (a 503 while hundreds connect)."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cls.RCVBUF)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=cls.RCVBUF)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        stalled = cls(sock, reader, writer)
        if head.split(b" ", 2)[1] == b"200":
            return stalled
        stalled.close()
        return None

    def close(self) -> None:
        self.writer.transport.abort()


async def settled_rss(pids: list[int], quiet: float, deadline: float = 30.0, tolerance: int = 512 * KB) -> int:
    """RSS once it has not moved by more than `tolerance` for `quiet` seconds (or at `deadline`)."""
    start = time.monotonic()
    samples: list[tuple[float, int]] = []
    while True:
        now = time.monotonic()
        samples.append((now, rss_bytes(pids)))
        window = [r for t, r in samples if t >= now - quiet]
        if (now - start >= quiet and max(window) - min(window) <= tolerance) or now - start > deadline:
            return samples[-1][1]
        await asyncio.sleep(0.2)


async def quiet_cpu(pids: list[int], window: float = 0.5, busy: float = 0.05, deadline: float = 30.0) -> None:
    """Until the processes used under `busy` of a core over `window` s (or `deadline` s have passed)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        before = sum(map(cpu_seconds, pids))
        await asyncio.sleep(window)
        if sum(map(cpu_seconds, pids)) - before < busy * window:
            return


async def idle_readers(bench: Bench, url: str) -> None:
    if bench.quick:
        readers, conversations, events, quiet = 50, 5, 1_000, 0.6
    else:
        readers, conversations, events, quiet = 1_000, 10, 10_000, 2.0
    batch, size = 100, 200
    raise_fd_limit(readers + 512)
    pids = bench.server_pids(url)
    http = await Http.connect(url)
    stalled: list[Stalled] = []
    try:
        cids = [(await turn_in_progress(http))[0] for _ in range(conversations)]
        warm = (await turn_in_progress(http))[0]  # the code paths a baseline should already have paid for
        await http.post(f"/v1/conversations/{warm}/events", {"events": [
            {"type": "text.delta", "data": {"turn_id": "t", "text": "x" * size}} for _ in range(batch)]})
        baseline = await settled_rss(pids, quiet)
        bench.progress(f"idle readers: connecting {readers}")
        gate = asyncio.Semaphore(10)

        async def connect(i: int) -> None:
            path = f"/v1/conversations/{cids[i % conversations]}/stream?compact=false"
            for attempt in range(5):
                async with gate:
                    reader = await Stalled.open(url, path)
                if reader is not None:
                    stalled.append(reader)
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
            raise RuntimeError(f"idle reader {i}: refused 5 times")

        async with asyncio.timeout(max(120.0, readers / 5)):
            await asyncio.gather(*(connect(i) for i in range(readers)))
        connected = await settled_rss(pids, quiet)
        bench.progress(f"idle readers: appending {events:,} events while they stall")
        cpu = sum(map(cpu_seconds, pids))
        async with asyncio.timeout(300):
            for b in range(events // batch):
                await http.post(f"/v1/conversations/{cids[b % conversations]}/events", {"events": [
                    {"type": "text.delta", "data": {"turn_id": "t", "text": f"{b}-{i} ".ljust(size, "x")}}
                    for i in range(batch)]})
        cpu = sum(map(cpu_seconds, pids)) - cpu
        after = await settled_rss(pids, quiet, deadline=60.0)
        # the server still serves everything to a reader that reads
        status, body = await http.request("GET", f"/v1/conversations/{cids[0]}/stream?compact=false&follow=false",
                                          headers={"Accept": "text/event-stream"})
        frames = body.count(b"\nid: ")
        head = orjson.loads((await http.request("GET", f"/v1/conversations/{cids[0]}"))[1])["seq"]
        if status != 200 or frames != head:
            raise RuntimeError(f"read-back after the stall: HTTP {status}, {frames} frames of {head}")
        # they all hang up; the server's work until it is quiet again (the fan-out runs next)
        hang_up = sum(map(cpu_seconds, pids))
        for reader in stalled:
            reader.close()
        stalled.clear()
        await quiet_cpu(pids)
        hang_up = sum(map(cpu_seconds, pids)) - hang_up
    finally:
        for reader in stalled:
            reader.close()
        await http.close()
    per_reader_events = events // conversations
    backlog_kb = len(body) / frames * per_reader_events / KB
    growth_kb = (after - connected) / readers / KB
    bench.row("idle reader: server RSS per connected reader", (connected - baseline) / readers / KB, "KB",
              note=f"{readers:,} readers on {conversations} conversations, one server (workers=1)")
    bench.row("stalled reader: RSS growth while events pile up", growth_kb, "KB / reader",
              ratio=growth_kb / backlog_kb, ratio_of=f"the {backlog_kb:.0f} KB of SSE each was sent",
              note=f"{events:,} × {size} B text.delta appended while {readers:,} readers (4 KB receive buffer) "
                   "never read; bounded: must not grow with the backlog")
    bench.row("stalled readers: server CPU per reader per event", cpu / (readers * per_reader_events) * 1e6, "µs",
              note=f"server CPU during the appends {cpu:.1f} s; {hang_up / readers * 1e6:.0f} µs per reader to drop "
                   "them all once they hung up")
