"""The connection pool, with every wait bounded.

Nothing that touches PostgreSQL may hang: taking a connection waits at most
`acquire_timeout` (a pool exhausted by load, a server that accepts no
connections), and a statement at most `statement_timeout` (a server that
stopped answering). A read's statement gets what is left of
`statement_timeout` after the wait for its connection, so a read answers
within about `statement_timeout` whatever failed. Either way, and whenever the
server is gone, the caller gets store.errors.Unavailable, which the API
answers 503 `store_unavailable`.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import asyncpg
import orjson

from store.errors import Unavailable

# What a lost connection, a server going away or a timeout raise.
# (InternalClientError: asyncpg's protocol was left mid-operation by a lost
# connection; that connection is useless.)
CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                     asyncpg.TooManyConnectionsError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                     asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, OSError, TimeoutError)
# Of those, the ones where a connection that worked was lost (not a timeout).
LOST_CONNECTION = (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                   asyncpg.InternalClientError, ConnectionError)


def unavailable(exc: BaseException) -> Unavailable:
    return Unavailable("the event store cannot be reached right now; retry shortly", reason=type(exc).__name__)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection needs on its way back to the pool: nothing.

    asyncpg's default reset runs a query on every release (RESET ALL, UNLISTEN,
    advisory unlock, CLOSE ALL): a round trip each read waits for before it
    answers. Pooled connections here never keep session state (settings are
    SET LOCAL, locks are transaction locks, LISTEN has connections of its
    own), and asyncpg still rolls back a transaction left open before it
    calls this."""


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 10, connect_timeout: float = 1.0,
                      command_timeout: float = 1.5) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection,
                                     reset=_keep_session,
                                     timeout=connect_timeout, command_timeout=command_timeout,
                                     server_settings={"application_name": "chatlog"})


class Pool:
    """asyncpg.Pool's query methods, bounded, failing as Unavailable."""

    # a query is always given at least this long, however long it waited for its connection
    MIN_STATEMENT_SECONDS = 0.25

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float = 1.0, statement_timeout: float = 1.5) -> None:
        self.raw = pool
        self.acquire_timeout = acquire_timeout
        self.statement_timeout = statement_timeout

    def _left(self, started: float) -> float:
        return max(self.statement_timeout - (time.monotonic() - started), self.MIN_STATEMENT_SECONDS)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await self.raw.acquire(timeout=self.acquire_timeout)
        except CONNECTION_ERRORS as exc:
            raise unavailable(exc) from exc
        try:
            yield conn
        except (*CONNECTION_ERRORS, Unavailable):
            conn.terminate()  # never hand a half-broken connection to the next caller
            raise
        finally:
            try:
                await self.raw.release(conn)
            except Exception:
                # asyncpg resets a connection on release and terminates it if
                # that fails; its error must not replace the caller's own (a
                # lost COMMIT reply would look like a failure before COMMIT)
                pass

    async def _call(self, method: str, query: str, *args: Any) -> Any:
        """conn.<method>(query, *args) on a pooled connection, within what is
        left of the statement budget after the wait for the connection."""
        started = time.monotonic()
        async with self.acquire() as conn:
            try:
                return await getattr(conn, method)(query, *args, timeout=self._left(started))
            except CONNECTION_ERRORS as exc:
                raise unavailable(exc) from exc

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call("fetch", query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._call("fetchrow", query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._call("fetchval", query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        return await self._call("execute", query, *args)

    async def executemany(self, query: str, args: Any) -> None:
        await self._call("executemany", query, args)

    def get_size(self) -> int:
        return self.raw.get_size()

    def get_idle_size(self) -> int:
        return self.raw.get_idle_size()

    async def close(self) -> None:
        await self.raw.close()
