"""What every section of `chatlog bench` shares: databases, server processes, rows.

A section is a module `bench/<name>.py` with `async def run(bench: Bench) -> None`
that measures its variants side by side and reports each figure with
`bench.row(...)`. The run prints one table of ratios (and JSON with --json).
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

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
    # figures other sections divide by, e.g. refs["copy"] (events/s of COPY)
    refs: dict[str, float] = field(default_factory=dict)
    _databases: list[str] = field(default_factory=list)
    _section: str = ""
    _servers: dict[str, int] = field(default_factory=dict)  # base URL -> pid of `chatlog serve`
    _started: float = field(default_factory=time.monotonic)  # the section's start (progress lines)

    def progress(self, text: str) -> None:
        sys.stderr.write(f"[bench {self._section} {time.monotonic() - self._started:5.1f}s] {text}\n")
        sys.stderr.flush()

    def row(self, name: str, value: float, unit: str, **more) -> Row:
        row = Row(self._section, name, value, unit, **more)
        self.rows.append(row)
        return row

    async def database(self) -> str:
        """A new, migrated database of this run's own, dropped when the run ends."""
        from store.scratch import create_migrated_database

        return await create_migrated_database(self.admin_url, "chatlog_bench", self._databases)

    @asynccontextmanager
    async def server(self, database_url: str, workers: int = 1, **env: str) -> AsyncIterator[str]:
        """A real `chatlog serve` process on `database_url`; yields its base URL."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # a quick run is a smoke test that may share PostgreSQL's max_connections
        # with a test session: its servers keep small pools (4 workers x 4)
        env = {**os.environ, "DATABASE_URL": database_url, "CHATLOG_LOG_LEVEL": "warning",
               **({"CHATLOG_POOL_SIZE": "4"} if self.quick else {}), **env}
        async with chatlog_process(["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                                   url + "/readyz", env=env, grace=15) as pid:
            self._servers[url] = pid
            try:
                yield url
            finally:
                self._servers.pop(url, None)

    def server_pids(self, url: str) -> list[int]:
        """The processes of the server at `url`: `chatlog serve` and its workers."""
        return descendants(self._servers[url])

    def ratio(self, value: float, ref: str) -> dict:
        """ratio= and ratio_of= for bench.row(): `value` ÷ refs[ref] (None when that
        reference was not measured in this run, e.g. with --only)."""
        of = REF_NAMES.get(ref, ref)
        if ref not in self.refs or not self.refs[ref]:
            return {"ratio": None, "ratio_of": of + " (not measured in this run)"}
        return {"ratio": value / self.refs[ref], "ratio_of": of}

    def report(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows]}


REF_NAMES = {
    "copy": "asyncpg COPY, batches of 1000, 1 connection",
    "eventsourcing": "eventsourcing PostgreSQL recorder, 1 event per save, 8 threads",
}


# -- CPU time from /proc: who is busy during a run --------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; the name may hold spaces


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process so far (0 when it is gone)."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


async def postgres_pids(database_url: str) -> list[int]:
    """PostgreSQL's processes that work for `database_url`: its backends and the
    server-wide WAL writer, checkpointer, background writer. Empty when the server
    is not on this machine (its pids would then mean nothing here)."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() OR (datname IS NULL AND "
            "backend_type IN ('walwriter', 'checkpointer', 'background writer', 'walsender'))")
    finally:
        await conn.close()
    host = urlsplit(database_url).hostname
    local = host in (None, "", "127.0.0.1", "::1", "localhost") or host.startswith("/")
    return [r["pid"] for r in rows if local and os.path.exists(f"/proc/{r['pid']}")]


class CpuMeter:
    """CPU used by named groups of processes between start() and stop(), in cores
    (CPU seconds ÷ wall seconds); `machine` is the whole machine's busy cores."""

    def __init__(self, children: str | None = None, **groups: list[int]) -> None:
        self.groups = groups
        # a group measured as this process's children that exited meanwhile
        # (getrusage): a load generator is reaped before stop() could read its /proc
        self.children = children
        self.cores: dict[str, float] = {}
        self.per_process_max: dict[str, float] = {}

    def _take(self) -> tuple[float, float, dict[str, dict[int, float]], float]:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.monotonic(), machine_busy_seconds(),
                {g: {p: cpu_seconds(p) for p in pids} for g, pids in self.groups.items()},
                reaped.ru_utime + reaped.ru_stime)

    def start(self) -> "CpuMeter":
        self._start = self._take()
        return self

    def stop(self) -> dict[str, float]:
        t1, busy1, cpu1, reaped1 = self._take()
        t0, busy0, cpu0, reaped0 = self._start
        wall = max(t1 - t0, 1e-9)
        for g in self.groups:
            used = {p: max(0.0, cpu1[g][p] - cpu0[g][p]) / wall for p in self.groups[g]}
            self.cores[g] = sum(used.values())
            self.per_process_max[g] = max(used.values(), default=0.0)
        if self.children:
            self.cores[self.children] = (reaped1 - reaped0) / wall
        self.cores["machine"] = (busy1 - busy0) / wall
        return self.cores

    def describe(self) -> str:
        """e.g. "server 1.02 cores (busiest process 1.00), postgres 0.31, wrk 0.12, machine 1.61 of 2"."""
        parts = []
        for g in [*self.groups, *([self.children] if self.children else [])]:
            part = f"{g} {self.cores[g]:.2f}"
            if g == "server" and len(self.groups[g]) > 1:
                part += f" (busiest process {self.per_process_max[g]:.2f})"
            parts.append(part)
        parts.append(f"machine {self.cores['machine']:.2f} of {os.cpu_count()}")
        return "CPU cores: " + ", ".join(parts)

    def first_to_run_out(self, workers: int) -> str:
        """What ran out first, judged from the CPU figures."""
        cores = os.cpu_count() or 1
        busiest = self.per_process_max.get("server", 0.0)
        if self.cores["machine"] >= 0.9 * cores:
            return (f"the machine's {cores} cores (server {self.cores.get('server', 0):.2f}, "
                    f"postgres {self.cores.get('postgres', 0):.2f}, the rest other processes and the load)")
        if busiest >= 0.85:
            return f"a server process's one core ({busiest:.2f} busy; {workers} worker(s))"
        if self.cores.get("postgres", 0) >= 0.85 * cores:
            return f"PostgreSQL's CPU ({self.cores['postgres']:.2f} cores)"
        return ("no CPU (machine {:.2f} of {}): waits on PostgreSQL (commits, locks) or the load's "
                "concurrency".format(self.cores["machine"], cores))


@asynccontextmanager
async def chatlog_process(args: list[str], ready_url: str, env: dict | None = None,
                          grace: float = 10.0) -> AsyncIterator[int]:
    """`chatlog ARGS` in a process of its own, once `ready_url` answers 200
    (30 s at most); yields its pid and stops it (SIGTERM, then after `grace`
    seconds SIGKILL) on the way out. Its output goes to a log file that is
    named in the error if it dies or never gets ready, and removed after."""
    log = tempfile.NamedTemporaryFile(prefix=f"chatlog-bench-{args[0]}-", suffix=".log", delete=False)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "chatlog"), *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"chatlog {args[0]} exited with {proc.returncode}; log: {log.name}")
                try:
                    if (await client.get(ready_url, timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chatlog {args[0]} did not get ready in 30 s; log: {log.name}")
                await asyncio.sleep(0.1)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)
