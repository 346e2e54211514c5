"""Server memory with many SSE readers that never read (issue 7: idle readers cost bounded memory).

    .venv/bin/python -m bench.idle_readers                    # 1,000 readers, 10,000 events, ~30 s
    .venv/bin/python -m bench.idle_readers --rounds 2 --json idle.json
    .venv/bin/python -m bench.idle_readers --readers 2000 --events 20000 --conversations 20

One real `chatlog serve` process (workers=1, so uvicorn serves in that very
process) on a fresh database `chatlog_bench_idle_*` (PostgreSQL found as the
tests find it, dropped at the end). Layout: `--conversations` conversations
(default 10), reader i follows conversation i mod C (format=events,
compact=false, follow=true). Every reader is a bare socket with a 4 KB
SO_RCVBUF (and a 4 KB asyncio read limit) that reads the response head and
then never reads again: the worst case, the server's writes back up. They
connect 10 at a time (a 503 is retried, as a client would). Then `--events`
`text.delta` events of `--event-bytes` text are appended through the HTTP
API in batches of `--batch`, round-robin over the same conversations, while
the readers stall. Last, every reader hangs up (a close with unread data:
an RST). `--rounds 2` does it all again on the same server with fresh
conversations: memory the allocator kept after round 1 is reused by round 2,
where a leak would add up again.

The server's RSS (VmRSS of `chatlog serve` and any children, from /proc) is
recorded at: an idle baseline (after a warm-up stream), with the readers
connected, during (peak) and after the appends, and after the readers
closed; each figure once RSS has stopped changing (polled, with a deadline).
Beside RSS: the bytes the kernel holds for the server's sockets (Send-Q of
its established connections on the port, from `ss`) and the machine's TCP
memory (/proc/net/sockstat), the server's CPU time, the number of listener
tails the server still held when it was stopped (its shutdown log line; 0
once every reader has gone), and a read-back of one conversation by a reader
that does read.

What must stay bounded is the growth during the appends: a stalled reader may
cost the server a fixed amount (its transport's write buffer up to the high
water mark, the one batch it is stuck in), never a copy of every event
appended after it stopped reading. Beware: on loopback the kernel grows a
stalled socket's send buffer to MBs (net.ipv4.tcp_wmem max) and takes most
of the backlog itself, outside RSS; readers × per-reader backlog is kernel
memory of the whole machine (keep it well under net.ipv4.tcp_mem). The
machine is shared and noisy: read the figures as orders of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from tests.pg import TestServer, with_database
from tests.servers import ChatlogServer, RawSSE, auth

RCVBUF = 4096
CONNECT_WAVE = 10  # readers connecting at once
CONNECT_ATTEMPTS = 5
MB = 1024 * 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- what the server holds --------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo and len(out) < 1000:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def _summed(pid: int, name: str, value) -> float:
    """value(text of /proc/<p>/<name>) summed over `pid` and its descendants (gone ones count 0)."""
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/{name}") as f:
                total += value(f.read())
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and its descendants (with workers=1 there are none: uvicorn serves in-process)."""
    return int(_summed(pid, "status", lambda text: int(text.split("VmRSS:")[1].split()[0]) * 1024))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants so far."""
    def ticks(text: str) -> float:
        fields = text.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return _summed(pid, "stat", ticks)


def server_send_queue(port: int) -> tuple[int, int]:
    """(established connections, bytes in their Send-Q) of the server's side of `port`."""
    try:
        out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return -1, -1
    conns = queued = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2:  # Recv-Q Send-Q Local Peer (the state column is left out with `state`)
            conns += 1
            queued += int(fields[1])
    return conns, queued


async def settled_rss(pid: int, what: str, quiet: float = 2.0, deadline: float = 30.0,
                      tolerance: int = 512 * 1024) -> tuple[int, bool]:
    """RSS once it has not moved by more than `tolerance` for `quiet` seconds, or at `deadline`."""
    start = time.monotonic()
    samples: list[tuple[float, int]] = []
    while True:
        now = time.monotonic()
        samples.append((now, rss_bytes(pid)))
        window = [r for t, r in samples if t >= now - quiet]
        if now - start >= quiet and max(window) - min(window) <= tolerance:
            return samples[-1][1], True
        if now - start > deadline:
            log(f"{what}: RSS still moving after {deadline:.0f} s; taking the last sample")
            return samples[-1][1], False
        await asyncio.sleep(0.25)


# -- readers, writer -----------------------------------------------------------------------


async def open_readers(url: str, cids: list[str], count: int, readers: list[RawSSE], timeout: float) -> int:
    """`count` readers into `readers`, reader i on cids[i % len(cids)]: each reads the response head
    and stops. A refused request (503: the pool is busy while hundreds connect) is retried, as a client
    would; returns how many were."""
    gate = asyncio.Semaphore(CONNECT_WAVE)
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        path = f"/v1/conversations/{cids[i % len(cids)]}/stream?format=events&compact=false&follow=true"
        for attempt in range(CONNECT_ATTEMPTS):
            async with gate:
                reader = await RawSSE.connect(url, path, auth("alice"), rcvbuf=RCVBUF)
                readers.append(reader)
                status = await reader.start()
            if status == 200:
                return
            readers.remove(reader)
            reader.hang_up()
            refused += 1
            await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"reader {i}: HTTP {status} {CONNECT_ATTEMPTS} times")

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(one(i) for i in range(count)))
    return refused


def close_readers(readers: list[RawSSE]) -> None:
    for reader in readers:
        try:
            reader.hang_up()
        except Exception:
            pass
    readers.clear()


def text_of(n: int, size: int) -> str:
    head = f"{n} "
    return head + "x" * max(0, size - len(head))


async def new_conversation(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/conversations", json={})
    r.raise_for_status()
    cid = r.json()["id"]
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"type": "message.user", "data": {"content": "go"}},
        {"type": "turn.started", "data": {"turn_id": "t"}}]})
    r.raise_for_status()
    return cid


async def append_batch(client: httpx.AsyncClient, cid: str, first: int, count: int, size: int) -> int:
    """Append `count` text.deltas; the conversation's last seq."""
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"type": "text.delta", "data": {"turn_id": "t", "text": text_of(first + i, size)}} for i in range(count)]})
    if r.status_code != 201:
        raise RuntimeError(f"append to {cid}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()["last_seq"]


async def warm_up(server: ChatlogServer, client: httpx.AsyncClient, size: int) -> None:
    """One stream, one append, one frame: the code paths a baseline should already have paid for."""
    cid = await new_conversation(client)
    reader = await RawSSE.connect(server.url, f"/v1/conversations/{cid}/stream?compact=false", auth("alice"))
    try:
        async with asyncio.timeout(30):
            await reader.start()
            last = str(await append_batch(client, cid, 0, 100, size))
            await reader.frames_until(lambda f: f.id == last)
    finally:
        reader.hang_up()


async def read_back(client: httpx.AsyncClient, cid: str) -> tuple[int, int, int]:
    """(frames, body bytes, the conversation's seq): a fresh reader (follow=false) reads the whole
    conversation, so the server still serves every event after the stalls."""
    r = await client.get(f"/v1/conversations/{cid}/stream", params={"compact": "false", "follow": "false"},
                         headers={"Accept": "text/event-stream"}, timeout=60.0)
    r.raise_for_status()
    frames = sum(1 for line in r.text.split("\n") if line.startswith("id:"))
    seq = (await client.get(f"/v1/conversations/{cid}")).json()["seq"]
    return frames, len(r.content), seq


async def create_database(pg: TestServer) -> str:
    """A fresh migrated database, chatlog_bench_idle_*; pg.close() drops it."""
    from store.migrate import migrate

    name = f"chatlog_bench_idle_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        pg.databases.append(name)
    finally:
        await admin.close()
    url = with_database(pg.admin_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


def raise_fd_limit(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if new < needed:
            raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed for the readers")
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))  # `chatlog serve` inherits it
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- the run -----------------------------------------------------------------------------------


def tcp_pages() -> int:
    """TCP socket memory of the whole machine, in pages (/proc/net/sockstat `TCP: ... mem N`)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    fields = line.split()
                    return int(fields[fields.index("mem") + 1])
    except (OSError, ValueError):
        pass
    return -1


async def one_round(args: argparse.Namespace, server: ChatlogServer, client: httpx.AsyncClient,
                    baseline: int, number: int) -> dict:
    """Connect N readers to fresh conversations, append M events while they stall, close them."""
    pid = server.proc.pid
    conversations, n, m = args.conversations, args.readers, args.events
    r: dict = {"round": number, "baseline": baseline}
    readers: list[RawSSE] = []
    try:
        cids = [await new_conversation(client) for _ in range(conversations)]
        r["before"], _ = await settled_rss(pid, "before connecting")
        started = time.monotonic()
        r["connect_refused"] = await open_readers(server.url, cids, n, readers, timeout=max(120.0, n / 5))
        r["connect_seconds"] = time.monotonic() - started
        r["with_readers"], _ = await settled_rss(pid, "with readers")
        r["with_readers_sendq"] = server_send_queue(server.port)
        log(f"round {number}: {n} readers connected in {r['connect_seconds']:.1f} s; "
            f"RSS {r['with_readers'] / MB:.1f} MB")

        # appends, round-robin over the conversations; RSS sampled after every batch
        started, peak, sent, cpu = time.monotonic(), 0, [0] * conversations, cpu_seconds(pid)
        batches = (m + args.batch - 1) // args.batch
        async with asyncio.timeout(max(300.0, batches * 5.0)):
            for b in range(batches):
                ix = b % conversations
                count = min(args.batch, m - b * args.batch)
                await append_batch(client, cids[ix], sent[ix], count, args.event_bytes)
                sent[ix] += count
                peak = max(peak, rss_bytes(pid))
        r["append_seconds"] = time.monotonic() - started
        r["append_cpu_seconds"] = cpu_seconds(pid) - cpu
        r["after_events"], r["after_events_settled"] = await settled_rss(pid, "after the appends", deadline=60.0)
        r["peak_during_appends"] = max(peak, r["after_events"])
        r["after_events_sendq"] = server_send_queue(server.port)
        r["after_events_tcp_pages"] = tcp_pages()
        log(f"round {number}: {m} events appended in {r['append_seconds']:.1f} s; RSS "
            f"{r['after_events'] / MB:.1f} MB (peak {r['peak_during_appends'] / MB:.1f}); kernel Send-Q of the "
            f"server's {r['after_events_sendq'][0]} connections: {r['after_events_sendq'][1] / MB:.1f} MB")

        cpu = cpu_seconds(pid)
        close_readers(readers)
        r["after_close"], _ = await settled_rss(pid, "after close", deadline=60.0)
        r["close_cpu_seconds"] = cpu_seconds(pid) - cpu
        r["after_close_sendq"] = server_send_queue(server.port)
        log(f"round {number}: readers closed; RSS {r['after_close'] / MB:.1f} MB")

        # the server still serves every event to a reader that does read
        frames, size, seq = await read_back(client, cids[0])
        r["frames_read_back"], r["frames_expected"] = frames, seq
        r["sse_bytes_per_event"] = size / max(frames, 1)
    finally:
        close_readers(readers)
    r.update(derived(r, n, m // conversations))
    return r


def derived(r: dict, n: int, events_per_reader: int) -> dict:
    return {"per_reader_kb": (r["after_events"] - r["baseline"]) / n / 1024,
            "connect_per_reader_kb": (r["with_readers"] - r["before"]) / n / 1024,
            "append_growth_mb": (r["after_events"] - r["with_readers"]) / MB,
            "append_growth_per_reader_kb": (r["after_events"] - r["with_readers"]) / n / 1024,
            "events_per_reader": events_per_reader,
            "backlog_per_reader_kb": events_per_reader * r["sse_bytes_per_event"] / 1024,
            "sendq_per_reader_kb": r["after_events_sendq"][1] / max(r["after_events_sendq"][0], 1) / 1024,
            "retained_after_close_mb": (r["after_close"] - r["baseline"]) / MB}


def table(result: dict) -> str:
    out = ["| round | readers (convs × readers) | events (per conv) | baseline MB | with N idle readers MB "
           "| after M events MB | peak during appends MB | per-reader KB | growth during appends MB (per reader KB) "
           "| after close MB | kernel Send-Q per reader KB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    n, c, m = result["readers"], result["conversations"], result["events"]
    for r in result["rounds"]:
        out.append(f"| {r['round']} | {n} ({c} × {n // c}{'+' if n % c else ''}) | {m} ({r['events_per_reader']}) "
                   f"| {r['baseline'] / MB:.1f} | {r['with_readers'] / MB:.1f} | {r['after_events'] / MB:.1f} "
                   f"| {r['peak_during_appends'] / MB:.1f} | {r['per_reader_kb']:.1f} "
                   f"| {r['append_growth_mb']:+.1f} ({r['append_growth_per_reader_kb']:+.1f}) "
                   f"| {r['after_close'] / MB:.1f} | {r['sendq_per_reader_kb']:.0f} |")
    return "\n".join(out)


async def main(args: argparse.Namespace) -> dict:
    # SIGTERM cancels the run like Ctrl-C does, so the cleanup below runs (the server is in a session
    # of its own: nothing else would stop it)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    limit = raise_fd_limit(args.readers + 512)
    load = os.getloadavg()[0]
    result: dict = {"readers": args.readers, "events": args.events, "conversations": args.conversations,
                    "batch": args.batch, "event_bytes": args.event_bytes, "rcvbuf": RCVBUF, "fd_limit": limit[0],
                    "load_before": load, "cpus": os.cpu_count(), "rounds": []}
    pg = TestServer()
    await pg.start()
    logs = Path(tempfile.mkdtemp(prefix="chatlog-bench-idle-"))
    server: ChatlogServer | None = None
    try:
        database_url = await create_database(pg)
        server = ChatlogServer("idle", database_url, logs, env={"CHATLOG_HEARTBEAT_SECONDS": "15"})
        await server.start()
        result["server_processes"] = len(_descendants(server.proc.pid))
        async with server.client(limits=httpx.Limits(max_connections=8)) as client:
            await warm_up(server, client, args.event_bytes)
            baseline, _ = await settled_rss(server.proc.pid, "baseline")
            log(f"baseline RSS {baseline / MB:.1f} MB; {args.readers} readers on {args.conversations} conversations")
            for number in range(1, args.rounds + 1):
                result["rounds"].append(await one_round(args, server, client, baseline, number))
    finally:
        if server is not None:
            await server.stop(grace=15.0)
        await pg.close()
    text = server.log_text()
    # the listener's tails when the server was stopped (its shutdown log line), readers all gone by then
    ending = re.findall(r"ending (\d+) live streams' conversations", text)
    result["tails_at_stop"] = int(ending[-1]) if ending else None
    # a stream the server ended (its store reads failed) is a reader that no longer stalls anything
    result["streams_ended_by_server"] = text.count("ending a stream:")
    result["server_log"] = str(logs)

    print()
    print(f"## Server RSS with idle SSE readers ({os.cpu_count()} CPUs, load average before start {load:.2f}; "
          f"one `chatlog serve`, workers=1, {result['server_processes']} process; readers with a "
          f"{RCVBUF // 1024} KB receive buffer that never read; {args.events} × {args.event_bytes} B `text.delta` "
          f"appended in batches of {args.batch} per round)")
    print()
    print(table(result))
    print()
    print("- per-reader KB = (after M events − baseline) / N; kernel Send-Q: bytes the kernel holds for the "
          "server's sockets (`ss`), kernel memory, not in RSS")
    for r in result["rounds"]:
        print(f"- round {r['round']}: connecting cost {r['connect_per_reader_kb']:.1f} KB of RSS per reader; each "
              f"reader's backlog from the appends is {r['events_per_reader']} events × {r['sse_bytes_per_event']:.0f} B"
              f" of SSE = {r['backlog_per_reader_kb']:.0f} KB, of which the kernel holds "
              f"{r['sendq_per_reader_kb']:.0f} KB and RSS grew {r['append_growth_per_reader_kb']:.1f} KB; machine TCP "
              f"memory after the appends {r['after_events_tcp_pages'] * 4096 / MB:.0f} MB; after close "
              f"{r['retained_after_close_mb']:+.1f} MB above the baseline; server CPU {r['append_cpu_seconds']:.1f} s "
              f"during the appends, {r['close_cpu_seconds']:.1f} s while the readers hung up; a fresh reader read back "
              f"{r['frames_read_back']} / {r['frames_expected']} frames of a conversation"
              + ("" if r["after_events_settled"] else "; **RSS still moving when the after-appends figure was taken**"))
    print(f"- tails held when the server stopped: {result['tails_at_stop']}; requests refused while connecting "
          f"(retried): {sum(r['connect_refused'] for r in result['rounds'])}; streams the server ended itself "
          f"(store reads failed): {result['streams_ended_by_server']}")
    print(f"\n_server log in {logs}_")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_readers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=1000, help="SSE readers that never read (default 1000)")
    parser.add_argument("--events", type=int, default=10_000, help="events appended while they stall (default 10000)")
    parser.add_argument("--conversations", type=int, default=10, help="conversations they follow (default 10)")
    parser.add_argument("--batch", type=int, default=100, help="events per append (default 100)")
    parser.add_argument("--event-bytes", type=int, default=200, help="text per event, bytes (default 200)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="connect/append/close rounds on the same server (default 1; 2 tells reuse from a leak)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if min(args.readers, args.conversations, args.batch, args.rounds) < 1 or args.events < 0:
        parser.error("readers, conversations, batch and rounds must be positive; events not negative")
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
