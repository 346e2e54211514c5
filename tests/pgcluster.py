"""A private PostgreSQL cluster that tests may stop, crash and restart.

The machine's PostgreSQL (and the session's database on it) is shared: a test
must never stop it. Tests about outages start a cluster of their own instead:
`initdb` into a temp dir owned by the `postgres` OS user (PostgreSQL refuses to
run as root), trust auth, listening on 127.0.0.1 only, on a free port that
stays the same across restarts (servers keep their DATABASE_URL). Every
command runs as a subprocess with a timeout; close() stops it (immediate) and
deletes the directory, and an atexit hook does the same if the test process
is interrupted before that.

`private_cluster` (module scope) is a started cluster; `cluster.create_database()`
gives a fresh migrated database on it.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.pg import create_migrated_database
from tests.servers import free_port

OS_USER = "postgres"


def _bindir() -> Path:
    return Path(subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip())


class PrivateCluster:
    """One throw-away PostgreSQL cluster: init() once, then start/stop/restart at will."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="chatlog-private-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgresql.log"
        self.port = free_port()
        self.databases: list[str] = []
        self._closed = False
        atexit.register(self._close_now)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- commands, as the postgres OS user ------------------------------------

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bindir / program), *args]
        return ["runuser", "-u", OS_USER, "--", *command] if os.geteuid() == 0 else command

    async def _run(self, program: str, *args: str, timeout: float = 60.0) -> str:
        proc = await asyncio.create_subprocess_exec(*self._command(program, *args), stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{program} {' '.join(args)} took over {timeout}s;\n{self.log_tail()}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({proc.returncode}):\n{out.decode()}\n"
                               f"{self.log_tail()}")
        return out.decode()

    async def init(self) -> "PrivateCluster":
        if os.geteuid() == 0:
            user = pwd.getpwnam(OS_USER)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        await self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--no-sync", "--no-instructions")
        # Durability as the tests need it: a crash of PostgreSQL (stop -m immediate)
        # keeps what the OS has; only a machine crash would lose it, and fsync off makes
        # restarts quick. Sockets: loopback TCP and a unix socket in our own dir.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.dir}'\n"
                       "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
                       "shared_buffers = 32MB\nlog_min_messages = warning\n")
        return self

    async def start(self, timeout: float = 30.0) -> None:
        await self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path), "-w",
                        "-t", str(int(timeout)), timeout=timeout + 5)

    async def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """mode: `fast` (clients disconnected, clean shutdown) or `immediate` (a crash: recovery on start)."""
        assert mode in ("smart", "fast", "immediate"), mode
        await self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)),
                        timeout=timeout + 5)

    async def restart(self, mode: str = "fast") -> None:
        await self.stop(mode)
        await self.start()

    async def running(self) -> bool:
        proc = await asyncio.create_subprocess_exec(*self._command("pg_ctl", "status", "-D", str(self.data)),
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 10) == 0

    # -- databases --------------------------------------------------------------

    async def create_database(self) -> str:
        """A new, migrated database on this cluster; its URL."""
        return await create_migrated_database(self.url(), "chatlog_private", self.databases, timeout=10)

    # -- the end ------------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no PostgreSQL log)"

    async def close(self) -> None:
        await asyncio.to_thread(self._close_now)

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._command("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "20"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
async def private_cluster():
    """A started private cluster for this module (stopped and deleted at its end)."""
    cluster = PrivateCluster()
    try:
        await cluster.init()
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


@pytest.fixture
async def running_cluster(private_cluster):
    """The module's private cluster, started again if an earlier test left it stopped."""
    if not await private_cluster.running():
        await private_cluster.start()
    return private_cluster
