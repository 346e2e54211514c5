"""Real servers for the streaming tests, and an SSE client that resumes like a browser.

Streams need what `httpx.ASGITransport` cannot give: a response that never
ends, a client that hangs up mid-frame, several processes sharing one
database, a process killed with SIGKILL. So:

- `ChatlogServer`: one `chatlog serve` process (workers=1) on a free port, on
  this run's database, with API keys and a 1 s heartbeat; logs go to a file
  and the tail of every server's log is attached to a failing test's report.
  Fixtures: `chatlog_servers` (two processes for the whole session) and
  `start_server` (extra processes, stopped at the end of the test).
- `InProcessServer`: uvicorn serving `create_app(store=<the test store>)` in
  the test's own event loop, for tests that look inside the process
  (listener tails, asyncio tasks, the pool). Fixture: `inprocess_server`.
- `open_sse` / `SSEStream`: an httpx response read with the SSE parser of
  tests/helpers.py (ids are opaque strings, the last id persists across frames
  as in EventSource); `RawSSE`: the same over a bare socket; `ResumingReader`
  and `FollowingReader` keep reading a stream across drops and outages,
  reconnecting with `Last-Event-ID` as a browser does.

Test modules use it with `pytest_plugins = ("tests.servers",)` (PYTEST_DONT_REWRITE: they
import it before pytest loads it as a plugin).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import httpx
import pytest

from bench.sse import Dechunker  # HTTP/1.1 chunked decoding, shared with the bench's raw clients
from tests.helpers import Comment, Frame, Item, SSEParser, bearer, eventually

CHATLOG = Path(sys.executable).parent / "chatlog"

# Keys every real server of the session accepts (the database is this run's own).
KEYS = {"alice": "key-alice", "bob": "key-bob"}
API_KEYS = ",".join(f"{key}={principal}" for principal, key in KEYS.items())
HEARTBEAT_SECONDS = 1.0


def auth(principal: str = "alice") -> dict[str, str]:
    return bearer(KEYS[principal])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- real `chatlog serve` processes ---------------------------------------------


class ChatlogServer:
    """One `chatlog serve` process. start() waits for /readyz; stop() is SIGTERM then SIGKILL."""

    started: list["ChatlogServer"] = []  # every server of the session, for failure reports

    def __init__(self, name: str, database_url: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.database_url = database_url
        self.log_path = log_dir / f"{name}.log"
        self.env = env or {}
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.ended_at: float | None = None  # when it was stopped or killed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, principal: str | None = "alice", timeout: float = 15.0, **kwargs) -> httpx.AsyncClient:
        headers = auth(principal) if principal else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout), **kwargs)

    async def start(self, timeout: float = 30.0) -> "ChatlogServer":
        for _ in range(3):  # a free port can be taken between free_port() and bind
            self.port = free_port()
            env = {**os.environ, "DATABASE_URL": self.database_url, "CHATLOG_API_KEYS": API_KEYS,
                   "CHATLOG_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS), "CHATLOG_WORKERS": "1",
                   "CHATLOG_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1", **self.env}
            env.pop("TEST_DATABASE_URL", None)
            with open(self.log_path, "ab") as log:
                log.write(f"\n==== {self.name}: chatlog serve --port {self.port} ====\n".encode())
                log.flush()
                # its own session: stop() signals the process group, workers included
                self.proc = subprocess.Popen([str(CHATLOG), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                             env=env, cwd=self.log_path.parent, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            if await self._wait_ready(timeout):
                self.ended_at = None
                if self not in ChatlogServer.started:
                    ChatlogServer.started.append(self)
                return self
            if "address already in use" not in self.log_tail().lower():
                break
        await self.stop()
        raise RuntimeError(f"chatlog serve {self.name} did not become ready; its log:\n{self.log_tail()}")

    async def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        return False

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group this server's Popen created
        except ProcessLookupError:
            pass

    async def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        self.ended_at = time.monotonic()

    def kill9(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients or PostgreSQL."""
        self._signal(signal.SIGKILL)
        self.proc.wait(10)
        self.ended_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chatlog-serve-logs")


@pytest.fixture(scope="session")
async def chatlog_servers(database_url, server_log_dir):
    """Two `chatlog serve` processes on this run's database: [A, B]."""
    servers = [ChatlogServer(name, database_url, server_log_dir) for name in ("A", "B")]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield servers
    finally:
        await asyncio.gather(*(s.stop() for s in servers))


@pytest.fixture
async def start_server_on(server_log_dir, request):
    """start_server_on(database_url, name, **env) -> a running server on another database (a private
    cluster, a fault proxy), stopped at the end of the test."""
    servers: list[ChatlogServer] = []

    async def start(database_url: str, name: str, **env: str) -> ChatlogServer:
        server = ChatlogServer(f"{request.node.name}-{name}", database_url, server_log_dir, env)
        servers.append(server)
        return await server.start()

    yield start
    await asyncio.gather(*(s.stop() for s in servers))


@pytest.fixture
def start_server(database_url, start_server_on):
    """start_server(name, **env) -> another running server on this run's database, stopped at the end of the test."""

    async def start(name: str, **env: str) -> ChatlogServer:
        return await start_server_on(database_url, name, **env)

    return start


# A failing test that uses one of these fixtures gets its servers' log tails in its report.
REPORT_LOGS_FOR = {"chatlog_servers", "start_server", "start_server_on"}

_test_started = [0.0]


def pytest_runtest_logstart(nodeid, location):
    _test_started[0] = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report shows the log tail of each server that was up during it."""
    report = yield
    if report.when == "call" and report.failed and REPORT_LOGS_FOR & set(item.fixturenames):
        for server in ChatlogServer.started:
            if not server.alive and (server.ended_at or 0) < _test_started[0]:
                continue
            state = "running" if server.alive else f"exited {server.proc.returncode}"
            report.sections.append((f"chatlog serve {server.name} ({state}) log tail: {server.log_path}",
                                    server.log_tail()))
    return report


# -- uvicorn inside the test's event loop ----------------------------------------


class InProcessServer:
    """The app on a real socket, served by uvicorn in this event loop, on a given store.

    Its connections get a small, fixed send buffer (no autotuning): on
    loopback the kernel would otherwise take ~3 MB from the server before a
    client that stops reading makes the server's writes wait, where a real
    network takes far less."""

    def __init__(self, app, sndbuf: int = 32 * 1024) -> None:
        import uvicorn

        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # accepted sockets inherit it
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self.task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> "InProcessServer":
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="test-uvicorn")

        def started() -> bool:
            if self.task.done():
                self.task.result()  # it failed to start: its exception
            return self.server.started

        await eventually(started, "uvicorn to start serving", timeout=timeout, interval=0.01)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task
        self.socket.close()


@pytest.fixture
async def inprocess_server(store):
    """uvicorn serving the app on the session's `store` in this loop (keys: KEYS, heartbeat 1 s)."""
    from api.app import create_app
    from api.settings import Settings

    app = create_app(Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS), store=store)
    server = await InProcessServer(app).start()
    yield server
    await server.stop()


# -- SSE -------------------------------------------------------------------------


class SSEStream:
    """One SSE response, parsed as it arrives; items() may be re-entered after a break."""

    def __init__(self, response: httpx.Response, last_event_id: str | None) -> None:
        self.response = response
        self.parser = SSEParser(last_event_id)
        self._raw = response.aiter_raw()
        self._ready: deque[Item] = deque()

    @property
    def last_event_id(self) -> str | None:
        return self.parser.last_event_id

    async def items(self, cut_after_bytes: int | None = None) -> AsyncIterator[Item]:
        """Items as they complete. With cut_after_bytes, behave as if the
        connection died after that many more body bytes (mid-frame, usually)."""
        while True:
            while self._ready:
                yield self._ready.popleft()
            if cut_after_bytes is not None and cut_after_bytes <= 0:
                return
            try:
                chunk = await self._raw.__anext__()
            except StopAsyncIteration:
                return
            if cut_after_bytes is not None:
                chunk, cut_after_bytes = chunk[:cut_after_bytes], cut_after_bytes - len(chunk)
            self._ready.extend(self.parser.feed(chunk))

    async def frames(self) -> AsyncIterator[Frame]:
        async for item in self.items():
            if isinstance(item, Frame):
                yield item

    async def read_all(self) -> list[Item]:
        return [item async for item in self.items()]


@asynccontextmanager
async def open_sse(client: httpx.AsyncClient, url: str, *, last_event_id: str | None = None,
                   headers: dict | None = None, params: dict | None = None) -> AsyncIterator[SSEStream]:
    """GET an SSE endpoint; leaving the block hangs up (the connection is closed, not reused)."""
    headers = {"Accept": "text/event-stream", **(headers or {})}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with client.stream("GET", url, headers=headers, params=params) as response:
        yield SSEStream(response, last_event_id)


class RawSSE:
    """An SSE GET over a bare socket, for many streams at once and for rude
    clients: hang up with FIN or RST at any point, or stop reading altogether
    (with a small receive buffer the server's writes back up quickly)."""

    def __init__(self, sock: socket.socket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sock, self.reader, self.writer = sock, reader, writer
        self.status: int | None = None
        self.parser = SSEParser()
        self._body: Callable[[bytes], bytes] = lambda data: data
        self._ready: deque[Item] = deque()

    @classmethod
    async def connect(cls, url: str, path: str, headers: dict | None = None, rcvbuf: int | None = None) -> "RawSSE":
        """rcvbuf: a small receive buffer, in the kernel and in asyncio's reader, so
        a client that stops reading makes the server's writes back up after a few kB."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf or 2 ** 16)
        head = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream",
                *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        return cls(sock, reader, writer)

    async def start(self) -> int:
        """Read the status line and headers; the status."""
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        if any(line.lower() == "transfer-encoding: chunked" for line in lines[1:]):
            self._body = Dechunker().feed
        return self.status

    async def items(self) -> AsyncIterator[Item]:
        """Items until the response or the connection ends; may be re-entered after a break."""
        if self.status is None:
            await self.start()
        while True:
            while self._ready:
                yield self._ready.popleft()
            data = await self.reader.read(65536)
            if not data:
                return
            self._ready.extend(self.parser.feed(self._body(data)))

    async def frames_until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        frames = []
        async for item in self.items():
            if isinstance(item, Frame):
                frames.append(item)
                if done(item):
                    break
        return frames

    def hang_up(self, reset: bool = False) -> None:
        """Close now: FIN, or with reset=True an RST (SO_LINGER 0), as a crashed client or a NAT would."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@dataclass
class ResumingReader:
    """Reads one stream across many connections, as an EventSource would:
    each reconnect sends `Last-Event-ID` = the id of the last COMPLETE frame.

    When a connection fails (the server went away) it reconnects to the next
    of `clients`, as a client with a list of servers fails over. `drop(n)`
    decides after the n-th frame of a connection whether to hang up. Ids are
    opaque strings, so the same reader serves any `format`.
    """

    clients: list[httpx.AsyncClient]
    path: str
    params: dict = field(default_factory=dict)
    frames: list[Frame] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    connections: int = 0
    drops: int = 0
    last_event_id: str | None = None
    use_client: int = 0

    async def run(self, done: Callable[[Frame], bool], drop: Callable[[int], int | None] = lambda n: None,
                  on_frame: Callable[[Frame], None] = lambda f: None) -> None:
        """Read until done(frame). After each frame, drop(n) may return a
        number of bytes to read before hanging up (0: hang up now)."""

        def take(frame: Frame) -> bool:
            self.frames.append(frame)
            self.last_event_id = frame.id
            on_frame(frame)
            return done(frame)

        while True:
            self.connections += 1
            try:
                async with open_sse(self.clients[self.use_client], self.path, last_event_id=self.last_event_id,
                                    params=self.params) as stream:
                    if stream.response.status_code != 200:
                        await stream.response.aread()
                        raise AssertionError(f"{self.path}: {stream.response.status_code} {stream.response.text}")
                    count, cut = 0, None
                    async for item in stream.items():
                        if isinstance(item, Comment):
                            self.comments.append(item.text)
                        elif isinstance(item, Frame):
                            count += 1
                            if take(item):
                                return
                            if (cut := drop(count)) is not None:
                                break
                    if cut:
                        # the connection dies a few bytes into what follows: a partial frame is never delivered
                        async for item in stream.items(cut_after_bytes=cut):
                            if isinstance(item, Frame) and take(item):
                                return
                    self.drops += 1
            except httpx.TransportError:
                self.drops += 1
                self.use_client = (self.use_client + 1) % len(self.clients)
                await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Received:
    frame: Frame
    at: float  # time.monotonic() when it was complete
    connection: int


class FollowingReader:
    """Follows one stream through outages and restarts, as a patient client does.

    Unlike ResumingReader it never gives up: a refused request (503 or any
    other status) or a transport error is retried after `retry_delay` on the
    next live server of `servers` (objects with `url` and `alive`, read at
    each attempt: a restarted server has a new port); a response the server
    ended is resumed with `Last-Event-ID`. With `drop_probability` it also
    hangs up by itself after a frame now and then (half of the time a few
    bytes into the next one). It records when each frame arrived, so a test
    can tell how long a committed event took to reach it.
    """

    def __init__(self, servers: list, path: str, params: dict | None = None, principal: str = "alice",
                 drop_probability: float = 0.0, rng=None, retry_delay: float = 0.25, first: int = 0) -> None:
        import random
        from collections import Counter

        self.servers, self.path, self.params, self.principal = servers, path, params or {}, principal
        self.drop_probability, self.retry_delay = drop_probability, retry_delay
        self.rng = rng or random.Random(0)
        self.received: list[Received] = []
        self.last_event_id: str | None = None
        self.connections = 0  # requests made
        self.ends = 0  # responses the server ended
        self.hang_ups = 0  # by the reader itself
        self.failures: Counter = Counter()  # refused or failed requests, by status or error
        self._use = first

    @property
    def frames(self) -> list[Frame]:
        return [r.frame for r in self.received]

    def _server(self):
        for _ in range(len(self.servers)):
            server = self.servers[self._use % len(self.servers)]
            if server.alive:
                return server
            self._use += 1
        return self.servers[self._use % len(self.servers)]

    async def run(self, until: Callable[[], bool]) -> None:
        """Read until `until()` holds (checked after every frame and heartbeat)."""
        while not until():
            server = self._server()
            self.connections += 1
            try:
                async with httpx.AsyncClient(base_url=server.url, headers=auth(self.principal),
                                             timeout=httpx.Timeout(10.0)) as client:
                    async with open_sse(client, self.path, last_event_id=self.last_event_id,
                                        params=self.params) as stream:
                        if stream.response.status_code != 200:
                            await stream.response.aread()
                            self.failures[str(stream.response.status_code)] += 1
                            self._use += 1
                        else:
                            outcome = await self._read(stream, until)
                            if outcome == "done":
                                return
                            if outcome == "hung_up":
                                continue  # resume at once
            except httpx.TransportError as exc:
                self.failures[type(exc).__name__] += 1
                self._use += 1
            await asyncio.sleep(self.retry_delay)

    async def _read(self, stream: SSEStream, until: Callable[[], bool]) -> str:
        """One response: "done" when `until()` held, else "hung_up" or "ended" (by the server)."""
        connection = self.connections
        async for item in stream.items():
            if isinstance(item, Frame):
                self.received.append(Received(item, time.monotonic(), connection))
                self.last_event_id = item.id
                if until():
                    return "done"
                if self.rng.random() < self.drop_probability:
                    self.hang_ups += 1
                    cut = self.rng.choice([0, self.rng.randint(1, 60)])
                    async for late in stream.items(cut_after_bytes=cut):  # a frame completed before the cut
                        if isinstance(late, Frame):
                            self.received.append(Received(late, time.monotonic(), connection))
                            self.last_event_id = late.id
                    return "done" if until() else "hung_up"
            elif until():
                return "done"
        self.ends += 1
        return "ended"
