"""A TCP proxy in front of PostgreSQL that breaks connections where it hurts most.

Servers under test connect to PostgreSQL through it (DATABASE_URL = its address).
It reads the client's side of the wire protocol, enough to recognise messages:

* the untyped start-up phase: int32 length + body, whose first int32 is a code.
  SSLRequest / GSSENCRequest get the answer 'N' from the proxy itself (so
  asyncpg's default sslmode=prefer goes on in plain text and the proxy can read
  what follows); the StartupMessage (or a CancelRequest) is forwarded;
* then typed messages: 1 byte type + int32 length (counting itself) + body.

Faults, on demand (`arm`) or with a probability per COMMIT (`commit_faults`):

* `reply_lost`: a simple Query ('Q') whose SQL is COMMIT is forwarded, the
  server's reply is held back, and once the server has answered (so the
  transaction surely committed) both sides are cut: the client cannot know.
* `commit_lost`: both sides are cut before the COMMIT reaches the server:
  the transaction aborts, and again the client cannot know.
* `cut_all()`: every connection is dropped at once.
* `refuse(True)`: new connections are closed as soon as they arrive (the store
  is unreachable, but quickly so); `pause()`: nothing is forwarded and new
  connections get no answer, as a hung server or a lost network would.

Counters of what was injected are in `counts`. It runs in the caller's event
loop (`await start()`) or in a thread of its own (`start_in_thread()`), which
keeps it responsive however busy the test's loop is; the control methods may
be called from either.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from typing import Callable

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
COMMIT_FAULTS = ("reply_lost", "commit_lost")
MAX_MESSAGE = 64 * 1024 * 1024
# how long a held-back COMMIT waits for the server's reply before the cut anyway
REPLY_WAIT_SECONDS = 2.0


def is_commit(query_body: bytes) -> bool:
    """Whether a 'Q' message's body (SQL, NUL-terminated) is a plain COMMIT."""
    sql = query_body.rstrip(b"\0").strip().rstrip(b";").strip().upper()
    return sql in (b"COMMIT", b"END", b"COMMIT TRANSACTION", b"COMMIT WORK")


class _Link:
    """One client connection and its server connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.hold_replies = False  # the COMMIT's reply must not reach the client
        self.replied = asyncio.Event()  # the server answered while replies were held

    def cut(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port: int | None = None
        self.rng = random.Random(seed)
        self.commit_faults: dict[str, float] = {}  # kind -> probability per COMMIT
        self.counts = {kind: 0 for kind in (*COMMIT_FAULTS, "cut_all", "cut_connections", "refused", "commits",
                                            "connections")}
        self.refusing = False
        self._armed: deque[str] = deque()
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- lifetime -----------------------------------------------------------------

    async def start(self) -> "FaultProxy":
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._flowing.set()
        for link in list(self._links):
            link.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    def start_in_thread(self, timeout: float = 10.0) -> "FaultProxy":
        """Serve from a thread with its own event loop."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
        return self

    def close_thread(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        loop = self._loop
        try:
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                loop.close()
            self._thread = None

    # -- control (from any thread) --------------------------------------------------

    def _soon(self, fn: Callable[[], None]) -> None:
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def arm(self, kind: str, count: int = 1, then_refuse: bool = False) -> None:
        """Fault the next `count` COMMITs (any connection) with `kind`. With
        `then_refuse`, the store becomes unreachable right then: every other
        connection is cut too and new ones are refused until `refuse(False)`,
        so the client cannot ask what became of its transaction."""
        assert kind in COMMIT_FAULTS, kind
        self._soon(lambda: self._armed.extend([(kind, then_refuse)] * count))

    def cut_all(self) -> None:
        def cut() -> None:
            self.counts["cut_all"] += 1
            self._cut_links()
        self._soon(cut)

    def _cut_links(self, but: _Link | None = None) -> None:
        for link in list(self._links):
            if link is not but:
                self.counts["cut_connections"] += 1
                link.cut()

    def refuse(self, on: bool = True) -> None:
        self.refusing = on

    def pause(self) -> None:
        """Forward nothing, answer no new connection: a hung store."""
        self._soon(self._flowing.clear)

    def resume(self) -> None:
        self._soon(self._flowing.set)

    # -- the proxy ----------------------------------------------------------------------

    def _commit_fault(self, link: _Link) -> str | None:
        self.counts["commits"] += 1
        if self._armed:
            kind, then_refuse = self._armed.popleft()
            if then_refuse:
                self.refusing = True
                self._cut_links(but=link)  # this one is cut by the fault itself
            return kind
        draw = self.rng.random()
        for kind, probability in self.commit_faults.items():
            if draw < probability:
                return kind
            draw -= probability
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.refusing:
                self.counts["refused"] += 1
                writer.transport.abort()
                return
            await self._flowing.wait()
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
            except (OSError, TimeoutError):
                writer.transport.abort()  # as PostgreSQL's own refusal would look to the client
                return
            self.counts["connections"] += 1
            link = _Link(writer, upstream_writer)
            self._links.add(link)
            pumps = [asyncio.create_task(self._client_to_server(reader, link)),
                     asyncio.create_task(self._server_to_client(upstream_reader, link))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                link.cut()
                self._links.discard(link)
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        await self._flowing.wait()
        writer.write(data)
        await writer.drain()

    async def _client_to_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            # start-up: untyped messages until the StartupMessage
            while True:
                head = await reader.readexactly(4)
                length = int.from_bytes(head, "big")
                if not 8 <= length <= MAX_MESSAGE:
                    return
                body = await reader.readexactly(length - 4)
                code = int.from_bytes(body[:4], "big")
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    await self._send(link.client, b"N")  # no encryption: go on in plain text
                    continue
                await self._send(link.server, head + body)
                if code == CANCEL_REQUEST:
                    return
                break
            # typed messages
            while True:
                head = await reader.readexactly(5)
                length = int.from_bytes(head[1:], "big")
                if not 4 <= length <= MAX_MESSAGE:
                    return
                body = await reader.readexactly(length - 4)
                fault = self._commit_fault(link) if head[:1] == b"Q" and is_commit(body) else None
                if fault == "commit_lost":
                    self.counts[fault] += 1
                    return  # the cut: the server never sees the COMMIT, the transaction aborts
                if fault == "reply_lost":
                    link.hold_replies = True
                    await self._send(link.server, head + body)
                    try:
                        await asyncio.wait_for(link.replied.wait(), REPLY_WAIT_SECONDS)
                    except TimeoutError:
                        pass
                    self.counts[fault] += 1
                    return
                await self._send(link.server, head + body)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return

    async def _server_to_client(self, reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            while data := await reader.read(65536):
                if link.hold_replies:
                    link.replied.set()
                    continue
                await self._send(link.client, data)
        except (ConnectionError, OSError):
            return
