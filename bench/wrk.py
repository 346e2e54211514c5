"""HTTP load from wrk (C, one thread by default), so the load generator does
not eat the cores it measures; installed with apt-get when missing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.core import Bench

SCRIPT = Path(__file__).with_name("post.lua")
TURN = "bench-turn"  # the open turn of every conversation post.lua writes to
PRINCIPAL = "open"  # the servers run in open mode (CHATLOG_API_KEYS empty)


def ensure_wrk(bench: Bench) -> str:
    found = shutil.which("wrk")
    if found:
        return found
    bench.progress("wrk is missing: apt-get install -y wrk")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for args in (["apt-get", "install", "-y", "wrk"], ["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        subprocess.run(sudo + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        if args[1] == "install" and shutil.which("wrk"):
            break
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is needed for the HTTP sections and `apt-get install -y wrk` did not install it")
    return found


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int  # answers other than 2xx, connect/read/write errors, timeouts
    p50_ms: float
    p99_ms: float
    unavailable: int = 0  # 503 answers: the documented backpressure, nothing written
    pid: int = 0

    @property
    def per_second(self) -> float:
        """Appends answered 2xx per second."""
        return (self.requests - self.errors) / self.seconds

    def describe(self) -> str:
        busy = f", {self.unavailable} of {self.requests} answers 503 (overload)" if self.unavailable else ""
        return f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms{busy}"


async def open_turns(database_url: str, count: int) -> Path:
    """`count` new conversations of the open-mode principal, each with turn
    `bench-turn` open; a file of their ids for post.lua."""
    from store import NewEvent, Store

    store = await Store.open(database_url, pool_size=4)
    try:
        ids = [uuid.uuid4() for _ in range(count)]

        async def one(cid: uuid.UUID) -> None:
            await store.create_conversation(PRINCIPAL, cid, {"metadata": {"bench": True}})
            await store.append(PRINCIPAL, cid, [NewEvent("turn.started", {"turn_id": TURN, "model": "bench"})])

        for k in range(0, count, 200):  # group commit writes many at once
            await asyncio.gather(*(one(c) for c in ids[k:k + 200]))
    finally:
        await store.close()
    f = tempfile.NamedTemporaryFile("w", prefix="chatlog-bench-ids-", suffix=".txt", delete=False)
    f.write("\n".join(str(c) for c in ids) + "\n")
    f.close()
    return Path(f.name)


async def run_wrk(bench: Bench, url: str, ids: Path, batch: int, connections: int, seconds: float,
                  threads: int = 1, rate_per_thread: float | None = None, on_start=None) -> WrkResult:
    """wrk posting `batch` deltas per request for `seconds`; `on_start(pid)` is
    called once it runs (to measure its CPU)."""
    wrk = ensure_wrk(bench)
    env = dict(os.environ)
    if rate_per_thread:
        env["CHATLOG_WRK_RATE"] = f"{rate_per_thread:.3f}"
    proc = await asyncio.create_subprocess_exec(
        wrk, "-t", str(threads), "-c", str(max(connections, threads)), "-d", f"{max(1, round(seconds))}s",
        "--timeout", "5s", "-s", str(SCRIPT), url, "--", str(ids), str(batch),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    if on_start is not None:
        on_start(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("wrk did not finish a minute after its duration")
    text = out.decode()
    line = next((x for x in text.splitlines() if x.startswith("WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {text[-2000:]} {err.decode()[-2000:]}")
    d = json.loads(line[4:])
    errors = d["unavailable"] + d["failed"] + d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["timeouts"]
    return WrkResult(d["requests"], d["duration_us"] / 1e6, errors, d["p50_us"] / 1000, d["p99_us"] / 1000,
                     d["unavailable"], proc.pid)


async def total_events(database_url: str, settle: float = 15.0) -> int:
    """Events stored in the database (each conversation's last seq, summed), once
    the count stops moving: requests wrk cut off at its end may still commit
    (under load, seconds later). Waits at most `settle` seconds."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        deadline = asyncio.get_running_loop().time() + settle
        last = None
        while True:
            now = int(await conn.fetchval("SELECT coalesce(sum(seq), 0) FROM conversations"))
            if now == last or asyncio.get_running_loop().time() > deadline:
                return now
            last = now
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


def check_nothing_lost(before: int, after: int, result: WrkResult, batch: int, connections: int,
                       what: str) -> None:
    """Every answered append is stored (requests cut off at the end may be stored
    too, never more than one per connection). A run that breaks this raises."""
    answered_ok = (result.requests - result.errors) * batch
    added = after - before
    if not answered_ok <= added <= (result.requests + connections) * batch:
        raise RuntimeError(f"{what}: {result.requests} requests answered ({result.errors} errors) × {batch} events, "
                           f"but the database grew by {added} events: events lost or doubled")
    # 503 store_unavailable is the contract's answer to overload (nothing written,
    # retry later): counted and reported, not a break. Any other failure is.
    if result.errors > result.unavailable:
        raise RuntimeError(f"{what}: {result.errors - result.unavailable} of {result.requests} requests failed "
                           f"(not counting {result.unavailable} answers 503)")
