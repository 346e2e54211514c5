"""What every section of `chatlog bench` shares: databases, server processes, rows.

A section is a module `bench/<name>.py` with `async def run(bench: Bench) -> None`
that measures its variants side by side and reports each figure with
`bench.row(...)`. The run prints one table of ratios (and JSON with --json).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator

import httpx


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    ratio: float | None = None  # value ÷ (or, for latencies, relative to) what `ratio_of` names
    ratio_of: str | None = None
    goal: str | None = None  # e.g. "≥ 4×" / "p99 ≤ 20 ms"
    met: bool | None = None
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Bench:
    quick: bool
    admin_url: str  # a PostgreSQL server's URL; databases are made on it
    rows: list[Row] = field(default_factory=list)
    _databases: list[str] = field(default_factory=list)
    _section: str = ""

    def progress(self, text: str) -> None:
        sys.stderr.write(f"[bench {self._section}] {text}\n")
        sys.stderr.flush()

    def row(self, name: str, value: float, unit: str, **more) -> Row:
        row = Row(self._section, name, value, unit, **more)
        self.rows.append(row)
        return row

    async def database(self) -> str:
        """A new, migrated database of this run's own, dropped when the run ends."""
        from tests.pg import create_migrated_database

        return await create_migrated_database(self.admin_url, "chatlog_bench", self._databases)

    @asynccontextmanager
    async def server(self, database_url: str, workers: int = 1, **env: str) -> AsyncIterator[str]:
        """A real `chatlog serve` process on `database_url`; yields its base URL."""
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="chatlog-bench-server-", suffix=".log", delete=False)
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "chatlog"), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers)],
            env={**os.environ, "DATABASE_URL": database_url, "CHATLOG_LOG_LEVEL": "warning", **env},
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            async with httpx.AsyncClient() as client:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"chatlog serve exited with {proc.returncode}; log: {log.name}")
                    try:
                        if (await client.get(url + "/readyz", timeout=1)).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"chatlog serve did not get ready in 30 s; log: {log.name}")
                    await asyncio.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.unlink(log.name)

    def report(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows]}
