"""SSE readers in a process of their own, for the live sections (fanout, latency).

Hundreds of readers parsing frames would eat the event loop of whatever process
holds them, so they live in a child process (multiprocessing, spawn) and the
section talks to it over a pipe:

    async with Readers(url, paths) as readers:      # every reader connected (HTTP 200)
        ...append...
        await readers.until({i: last_seq, ...})     # reader i has seen seq >= last_seq
        got = await readers.take()                  # per reader: (seqs, arrival times), then cleared

A reader is an asyncio Protocol on a bare socket: it stamps `time.time()` once
per socket read, before parsing (the earliest a client could know), and keeps
only each frame's seq (the part of its id before `:`). A reader whose stream
ends, or that gets anything but 200, is an error: `until` and `take` raise.

Also here: a lean HTTP client, a paced writer, percentiles, a server's RSS.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import time
from array import array
from typing import Iterable

import orjson

CONNECT_WAVE = 50  # readers connecting at once
CONNECT_ATTEMPTS = 5  # a 503 while hundreds connect is retried, as a client would


def pct(values: Iterable[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank; NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def raise_fd_limit(needed: int) -> None:
    """Enough descriptors for `needed` sockets here and in processes started after this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


# -- a server process seen from /proc ---------------------------------------------------


def rss_bytes(pids: list[int]) -> int:
    """VmRSS summed over `pids` (a server's processes; gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += int(f.read().split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            pass
    return total


# -- a lean HTTP client ------------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection, for writers and timed reads: a client
    library's own overhead would share the cores with what is measured."""

    IDLE = 3.0  # s; uvicorn closes a keep-alive connection idle for 5 s: open a new one before that

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0.0

    @classmethod
    async def connect(cls, url: str) -> "Http":
        host, port = url.removeprefix("http://").rsplit(":", 1)
        http = cls(host, int(port))
        await http._open()
        return http

    async def _open(self) -> None:
        if self.writer is not None:
            await self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.used = time.monotonic()

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        await self.keep_alive()
        try:
            return await self._request(method, path, body, headers)
        finally:
            self.used = time.monotonic()

    async def keep_alive(self) -> None:
        """Open a new connection if this one has been idle long enough for the server to close it."""
        if time.monotonic() - self.used > self.IDLE:
            await self._open()

    async def _request(self, method: str, path: str, body: bytes | None,
                       headers: dict[str, str] | None) -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}",
                *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in fields:
            return status, await self.reader.readexactly(int(fields["content-length"]))
        dechunk, out = Dechunker(), []
        while not dechunk.done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the response ended early")
            out.append(dechunk.feed(data))
        return status, b"".join(out)

    async def post(self, path: str, body) -> dict:
        """POST JSON; the answer's JSON (anything but 200/201 raises)."""
        status, answer = await self.request("POST", path, orjson.dumps(body))
        if status not in (200, 201):
            raise RuntimeError(f"POST {path}: HTTP {status} {answer[:300]!r}")
        return orjson.loads(answer)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def turn_in_progress(http: Http) -> tuple[str, int]:
    """A new conversation with a user message and an open turn `t`: (its id, its seq)."""
    cid = (await http.post("/v1/conversations", {}))["id"]
    answer = await http.post(f"/v1/conversations/{cid}/events", {"events": [
        {"type": "message.user", "data": {"content": "go"}},
        {"type": "turn.started", "data": {"turn_id": "t"}}]})
    return cid, answer["last_seq"]


async def write_deltas(http: Http, cid: str, rate: float, seconds: float, offset: float = 0.0) -> list[tuple]:
    """One `text.delta` per request to turn `t` every 1/rate s for `seconds`, on
    an absolute schedule starting `offset` s late (a slow append is not followed
    by a pause). Per append: (seq, sent, returned) as time.time(), and its
    duration in s (perf_counter)."""
    done = []
    path = f"/v1/conversations/{cid}/events"
    await http.keep_alive()  # not inside the first timed append
    start = time.monotonic() + offset
    i = 0
    while (due := start + i / rate) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        sent, t0 = time.time(), time.perf_counter()
        answer = await http.post(path, {"events": [{"type": "text.delta", "data": {"turn_id": "t", "text": "x"}}]})
        done.append((answer["last_seq"], sent, time.time(), time.perf_counter() - t0))
        i += 1
    return done


# -- the readers' process ---------------------------------------------------------------


class Dechunker:
    """HTTP/1.1 chunked transfer decoding, incremental."""

    def __init__(self) -> None:
        self.buffer = b""
        self.size: int | None = None  # of the chunk being read; None: at a size line
        self.done = False  # the last (empty) chunk came

    def feed(self, data: bytes) -> bytes:
        buffer, pos, out = self.buffer + data, 0, []
        while not self.done:
            if self.size is None:
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    break
                self.size, pos = int(buffer[pos:end].split(b";")[0], 16), end + 2
                self.done = self.size == 0
            elif len(buffer) - pos >= self.size + 2:
                out.append(buffer[pos:pos + self.size])
                pos, self.size = pos + self.size + 2, None
            else:
                break
        self.buffer = buffer[pos:]
        return b"".join(out)


class _Stream(asyncio.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.body = None  # bytes -> bytes once the head is read
        self.pending = b""
        self.seqs = array("i")
        self.arrivals = array("d")
        self.last = 0
        self.ended: str | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.body is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4:]
            lines = head.split("\r\n")
            chunked = any(line.lower() == "transfer-encoding: chunked" for line in lines[1:])
            self.body = Dechunker().feed if chunked else (lambda b: b)
            if not self.status.done():
                self.status.set_result(int(lines[0].split()[1]))
        self.pending += self.body(data)
        if b"\n\n" not in self.pending:
            return
        *blocks, self.pending = self.pending.split(b"\n\n")
        for block in blocks:
            if block.startswith(b"id: "):  # frames; `retry:` and `: ping` are not
                seq = int(block[4:block.index(b"\n")].split(b":")[0])
                self.seqs.append(seq)
                self.arrivals.append(now)
                self.last = seq

    def connection_lost(self, exc) -> None:
        self.ended = f"connection ended ({exc!r})"
        if not self.status.done():
            self.status.set_result(0)


def _child(url: str, paths: list[str], headers: dict[str, str], conn) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(url, paths, headers, conn))


async def _serve(url: str, paths: list[str], headers: dict[str, str], conn) -> None:
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    gate = asyncio.Semaphore(CONNECT_WAVE)
    streams: list[_Stream | None] = [None] * len(paths)
    errors: list[str] = []
    stopping = False

    async def connect(i: int) -> None:
        head = [f"GET {paths[i]} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream",
                *(f"{k}: {v}" for k, v in headers.items())]
        request = ("\r\n".join(head) + "\r\n\r\n").encode()
        for attempt in range(CONNECT_ATTEMPTS):
            async with gate:
                _, stream = await loop.create_connection(lambda: _Stream(request), host, int(port))
                status = await asyncio.wait_for(stream.status, 30)
            if status == 200:
                streams[i] = stream
                return
            stream.transport.abort()
            await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"reader {i} ({paths[i]}): HTTP {status} {CONNECT_ATTEMPTS} times")

    def broken() -> list[str]:
        return errors + [f"reader {i}: {s.ended}" for i, s in enumerate(streams) if s is not None and s.ended]

    try:
        await asyncio.gather(*(connect(i) for i in range(len(paths))))
        conn.send(("ready", None))
    except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", [repr(e)]))
        stopping = True

    while not stopping:
        # a thread waits for the next command: the pipe stays blocking (an event
        # loop's reader would make it non-blocking, and a large `take` answer fail)
        command, arg = await loop.run_in_executor(None, conn.recv)
        if command == "until":
            targets, timeout = arg
            deadline = time.monotonic() + timeout
            while True:
                behind = [i for i, seq in targets.items() if streams[i].last < seq]
                if broken():
                    conn.send(("error", broken()))
                    break
                if not behind:
                    conn.send(("ok", None))
                    break
                if time.monotonic() > deadline:
                    conn.send(("error", [f"{len(behind)} readers short of their last event after {timeout:.0f} s, "
                                         f"e.g. reader {behind[0]} at seq {streams[behind[0]].last} "
                                         f"< {targets[behind[0]]}"]))
                    break
                await asyncio.sleep(0.02)
        elif command == "take":
            conn.send(("error", broken()) if broken() else
                      ("ok", [(s.seqs.tobytes(), s.arrivals.tobytes()) for s in streams]))
            for s in streams:
                s.seqs, s.arrivals = array("i"), array("d")
        elif command == "stop":
            stopping = True
    for s in streams:
        if s is not None and s.transport is not None:
            s.transport.abort()
    conn.send(("stopped", None))


class ReadersFailed(RuntimeError):
    pass


class Readers:
    """`paths[i]` followed by reader i in a child process; see the module docstring."""

    def __init__(self, url: str, paths: list[str], headers: dict[str, str] | None = None,
                 connect_timeout: float = 120) -> None:
        self.url, self.paths, self.headers = url, paths, headers or {}
        self.connect_timeout = connect_timeout
        self.proc = None
        self.conn = None

    async def _reply(self, timeout: float):
        if not await asyncio.to_thread(self.conn.poll, timeout):
            raise ReadersFailed(f"the readers' process did not answer in {timeout:.0f} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise ReadersFailed(f"the readers' process died (exit code {self.proc.exitcode})") from None
        if kind == "error":
            raise ReadersFailed("; ".join(value[:5]))
        return value

    async def __aenter__(self) -> "Readers":
        raise_fd_limit(len(self.paths) + 512)
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(self.url, self.paths, self.headers, child), daemon=True)
        self.proc.start()
        child.close()
        try:
            await self._reply(self.connect_timeout)
        except BaseException:
            await self.close()
            raise
        return self

    def cpu_seconds(self) -> float:
        """CPU time the readers' process has used so far."""
        from bench.core import cpu_seconds

        return cpu_seconds(self.proc.pid)

    async def until(self, targets: dict[int, int], timeout: float = 30) -> None:
        """Wait until reader i has seen seq >= targets[i] (raises past `timeout`)."""
        self.conn.send(("until", (targets, timeout)))
        await self._reply(timeout + 10)

    async def take(self) -> list[tuple[array, array]]:
        """Per reader: (seqs, arrival times) of the frames since the last take."""
        self.conn.send(("take", None))
        raw = await self._reply(60)
        return [(array("i", s), array("d", a)) for s, a in raw]

    async def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                self.conn.send(("stop", None))
                await asyncio.to_thread(self.proc.join, 10)
        except (OSError, EOFError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            await asyncio.to_thread(self.proc.join, 10)
        self.conn.close()
        self.proc = None

    async def __aexit__(self, *exc) -> None:
        await self.close()


def check_exactly_once(seqs: array, expected: list[int], who: str) -> None:
    """A reader got `expected` (in order), each once: anything else breaks the run."""
    got = list(seqs)
    if got != expected:
        missing = sorted(set(expected) - set(got))
        duplicated = len(got) - len(set(got))
        raise ReadersFailed(f"{who}: got {len(got)} frames, expected {len(expected)}; missing {missing[:5]}, "
                            f"{duplicated} duplicated, in order: {got == sorted(got)}")
