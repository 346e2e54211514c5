"""Find a real PostgreSQL server and make scratch databases on it.

Used by the tests (tests/pg.py) and by `chatlog bench`, which must work when
installed and run from any directory, so this lives in a package. It lives in
store/ because store/ is the only package that talks to PostgreSQL.

Order: TEST_DATABASE_URL, DATABASE_URL, the local server on 127.0.0.1:5432 if
it answers, else an embedded one (pgserver) started for this run
(CHATLOG_TEST_SERVER=embedded forces that one). Never a mock, and never a
skip: if none of these works the run fails loudly.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return False
    await conn.close()
    return True


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def create_migrated_database(admin_url: str, prefix: str, created: list[str], timeout: float = 60) -> str:
    """A new, migrated database on the server of `admin_url`; its URL. Its name goes
    to `created` (the databases to drop) as soon as it exists."""
    from store.migrate import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url, timeout=timeout)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    created.append(name)
    url = with_database(admin_url, name)
    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


async def drop_databases(admin_url: str, names: list[str]) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class ScratchServer:
    """The server a run uses; `embedded` is kept alive until close(), which also
    drops every database made with create_database()."""

    def __init__(self, prefix: str = "chatlog_scratch") -> None:
        self.prefix = prefix
        self.admin_url: str | None = None
        self.embedded = None
        self.databases: list[str] = []

    @property
    def source(self) -> str:
        """Where the server came from, in words."""
        if self.embedded is not None:
            return "embedded (pgserver)"
        return "local 127.0.0.1:5432" if self.admin_url == LOCAL else "TEST_DATABASE_URL/DATABASE_URL"

    async def start(self) -> str:
        given = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
        if os.environ.get("CHATLOG_TEST_SERVER") == "embedded":  # force the last resort (to check it works)
            given, local = None, False
        else:
            local = not given and await _answers(LOCAL)
        if given:
            if not await _answers(given):
                raise RuntimeError(f"TEST_DATABASE_URL/DATABASE_URL is set but does not answer: {given}")
            self.admin_url = given
        elif local:
            self.admin_url = LOCAL
        else:
            import pgserver

            self.embedded = pgserver.get_server(tempfile.mkdtemp(prefix="chatlog-test-pg-"), cleanup_mode="delete")
            self.admin_url = self.embedded.get_uri()
        return self.admin_url

    async def create_database(self) -> str:
        """A new, empty, migrated database of this run's own."""
        return await create_migrated_database(self.admin_url, self.prefix, self.databases)

    async def close(self) -> None:
        if self.admin_url and self.databases:
            await drop_databases(self.admin_url, self.databases)
        if self.embedded is not None:
            self.embedded.cleanup()
