"""The baselines chatlog is measured against, each on a fresh database of the
same PostgreSQL (Redis aside): what one could write with the raw driver, with
the eventsourcing library chatlog is built on, and with Redis Streams.

Each is a Variant: `setup()` once, then `measure(seconds)` as many times as the
rounds ask (interleaved with chatlog's variants by bench/ingest.py), `close()`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import unquote, urlsplit, parse_qs

import asyncpg
import orjson

from bench.core import Bench, free_port

# `hash`: the row carries its 64-hex hash as chatlog's events do (a stand-in here: computing it is
# chatlog's cost, writing it is the row's)
COLUMNS = ["conversation_id", "seq", "position", "id", "type", "data", "created_at", "principal", "hash"]
DATA = {"turn_id": "bench-turn", "text": " token"}


class Variant:
    name = ""
    unit = "events/s"
    note = ""

    async def setup(self, bench: Bench) -> None: ...

    async def measure(self, seconds: float) -> float: ...  # events/s

    async def close(self) -> None: ...


class _Rows:
    """Rows shaped like `events` for one writer: its own conversations, seqs 1, 2, …"""

    def __init__(self, conversations: int = 4) -> None:
        self.ids = [uuid.uuid4() for _ in range(conversations)]
        self.seq = {c: 0 for c in self.ids}
        self.k = 0
        self.data = orjson.dumps(DATA).decode()

    def take(self, n: int) -> list[tuple]:
        now = datetime.now(timezone.utc)
        rows = []
        for _ in range(n):
            c = self.ids[self.k % len(self.ids)]
            self.k += 1
            self.seq[c] += 1
            rows.append((c, self.seq[c], (self.k << 16) + self.seq[c] % 65536, uuid.uuid4().hex, "text.delta",
                         self.data, now, "bench", os.urandom(32).hex()))
        return rows


async def _events_like_table(url: str, table: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        # every column, default, constraint and index of `events` (not its triggers or foreign key)
        await conn.execute(f"CREATE TABLE {table} (LIKE events INCLUDING ALL)")
    finally:
        await conn.close()


class Copy(Variant):
    name = "asyncpg COPY into a table like events, batches of 1000, 1 connection"
    note = "the physical limit here: the ratio denominator"

    async def setup(self, bench: Bench) -> None:
        url = await bench.database()
        await _events_like_table(url, "copy_events")
        self.conn = await asyncpg.connect(url)
        self.rows = _Rows(conversations=16)

    async def measure(self, seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await self.conn.copy_records_to_table("copy_events", records=self.rows.take(1000), columns=COLUMNS)
            n += 1000
        return n / (time.perf_counter() - t0)

    async def close(self) -> None:
        await self.conn.close()


class Unnest(Variant):
    name = "INSERT … unnest into a table like events, batch 10, 32 connections"

    async def setup(self, bench: Bench) -> None:
        url = await bench.database()
        await _events_like_table(url, "unnest_events")
        self.url = url
        self.writers = [_Rows() for _ in range(32)]

    async def measure(self, seconds: float) -> float:
        sql = ("INSERT INTO unnest_events (" + ", ".join(COLUMNS) + ") SELECT * FROM unnest($1::uuid[], "
               "$2::int[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::timestamptz[], $8::text[], $9::text[])")
        count = [0]
        # connected only while measured: 32 connections held through the whole
        # section would crowd a shared server's max_connections
        async with asyncpg.create_pool(self.url, min_size=32, max_size=32) as pool:
            t0 = time.perf_counter()

            async def writer(rows: _Rows) -> None:
                async with pool.acquire() as conn:
                    while time.perf_counter() - t0 < seconds:
                        await conn.execute(sql, *map(list, zip(*rows.take(10))))
                        count[0] += 10

            await asyncio.gather(*(writer(w) for w in self.writers))
            return count[0] / (time.perf_counter() - t0)


class EventSourcingRecorder(Variant):
    name = "eventsourcing library's PostgreSQL recorder, 1 event per save, 8 threads"
    note = "eventsourcing.postgres through an Application (its public API)"

    async def setup(self, bench: Bench) -> None:
        url = await bench.database()
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = parts.hostname or (query.get("host") or ["127.0.0.1"])[0]
        env = {"PERSISTENCE_MODULE": "eventsourcing.postgres", "POSTGRES_DBNAME": parts.path.lstrip("/"),
               "POSTGRES_HOST": unquote(host), "POSTGRES_PORT": str(parts.port or 5432),
               "POSTGRES_USER": unquote(parts.username or "postgres"),
               "POSTGRES_PASSWORD": unquote(parts.password or ""), "POSTGRES_POOL_SIZE": "8",
               "POSTGRES_MAX_OVERFLOW": "0", "CREATE_TABLE": "y"}
        from eventsourcing.application import Application
        from eventsourcing.domain import Aggregate, event

        class Turn(Aggregate):
            def __init__(self) -> None:
                self.deltas = 0

            @event("TextDelta")
            def delta(self, text: str) -> None:
                self.deltas += 1

        self.turn_class = Turn
        self.app = await asyncio.to_thread(Application, env=env)

    def _thread(self, seconds: float, t0: float, counts: list[int], k: int) -> None:
        turn = self.turn_class()
        self.app.save(turn)
        while time.perf_counter() - t0 < seconds:
            turn.delta(text=" token")
            self.app.save(turn)  # one new event per save
            counts[k] += 1

    async def measure(self, seconds: float) -> float:
        counts = [0] * 8
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self._thread, args=(seconds, t0, counts, k)) for k in range(8)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        return sum(counts) / (time.perf_counter() - t0)

    async def close(self) -> None:
        self.app.close()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisXadd(Variant):
    name = "Redis Streams XADD, pipelines of 10, 8 clients"
    note = "not durable here (no fsync per write)"

    async def setup(self, bench: Bench) -> None:
        import redis.asyncio as redis

        self.server = None
        port = 6379
        if not _redis_answers(port):
            port = free_port()
            binary = shutil.which("redis-server")
            if binary is None:
                bench.progress("redis-server is missing: apt-get install -y redis-server")
                sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
                subprocess.run(sudo + ["apt-get", "install", "-y", "redis-server"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=300)
                binary = shutil.which("redis-server")
                if binary is None:
                    raise RuntimeError("no Redis on 127.0.0.1:6379 and redis-server could not be installed")
            bench.progress(f"no Redis on 127.0.0.1:6379: starting redis-server on port {port}")
            self.server = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not _redis_answers(port):
                if time.monotonic() > deadline or self.server.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                await asyncio.sleep(0.05)
        self.client = redis.Redis(host="127.0.0.1", port=port)
        self.keys = [f"chatlog-bench:{uuid.uuid4().hex}" for _ in range(8)]
        self.fields = {"type": "text.delta", "data": orjson.dumps(DATA)}

    async def measure(self, seconds: float) -> float:
        count = [0]
        t0 = time.perf_counter()

        async def client(key: str) -> None:
            while time.perf_counter() - t0 < seconds:
                pipe = self.client.pipeline(transaction=False)
                for _ in range(10):
                    pipe.xadd(key, self.fields)
                await pipe.execute()
                count[0] += 10

        await asyncio.gather(*(client(k) for k in self.keys))
        rate = count[0] / (time.perf_counter() - t0)
        await self.client.delete(*self.keys)
        return rate

    async def close(self) -> None:
        try:
            await self.client.delete(*self.keys)
            await self.client.aclose()
        finally:
            if self.server is not None:
                self.server.terminate()
                self.server.wait(10)
