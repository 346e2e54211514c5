"""A real browser for the tests: Debian's `chromium`, driven headless by Playwright.

`ensure_chromium()` returns the browser's path, installing the distribution's package
(`apt-get install -y chromium`) when it is missing; it never downloads Playwright's own
browsers, and a browser that cannot be installed is an error, never a skip.
`launch(playwright)` starts it headless. `TcpProxy` stands between the browser and a
server so a test can cut every connection at once (a stream that just ends, as when a
server restarts or a network drops), which makes a browser's EventSource reconnect.
"""

from __future__ import annotations

import asyncio
import fcntl
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser")


def _find() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    """The path of a Chromium executable, installed with apt-get when missing."""
    path = _find()
    if path:
        return path
    # one installer at a time when test processes run in parallel
    with open(Path(tempfile.gettempdir()) / "chatlog-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = _find()
        if path:
            return path
        apt = shutil.which("apt-get")
        if apt is None:
            raise RuntimeError("the browser tests need Chromium: install it (`chromium` on Debian); "
                               "no apt-get was found to install it")
        install = [apt, "install", "-y", "chromium"]
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        out = []
        for attempt in range(2):
            done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
            out.append(f"$ {' '.join(install)} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            if done.returncode == 0:
                break
            if attempt == 0:  # the package lists may be missing or stale (a fresh container)
                subprocess.run([apt, "update"], capture_output=True, text=True, timeout=600, env=env)
        path = _find()
        if path is None:
            raise RuntimeError("could not install Chromium with apt-get:\n" + "\n".join(out))
        return path


async def launch(playwright):
    """Headless Chromium (the system's) through Playwright."""
    return await playwright.chromium.launch(
        executable_path=ensure_chromium(), headless=True,
        # --no-sandbox: tests run as root in containers, where Chromium's sandbox cannot start
        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a server; `cut_all()` drops every connection at once."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._server: asyncio.AbstractServer | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.port: int | None = None
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut_all(self) -> None:
        self.cuts += 1
        for link in list(self._links):
            for writer in link:
                writer.transport.abort()
        self._links.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        link = (client_writer, server_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        finally:
            self._links.discard(link)
            for writer in link:
                writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass
