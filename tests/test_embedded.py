"""`chatlog serve` without DATABASE_URL: the embedded PostgreSQL (api/embedded.py), with real processes.

A normal start says where the data is and how to move it, with no warning; a
`chatlog serve` killed with SIGKILL leaves its PostgreSQL running, and the
next start stops that orphan, comes up on the same data, and stops its own
PostgreSQL when it exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import bearer, eventually
from tests.servers import CHATLOG, free_port

KEY = "key-embedded"


def postgres_of(pgdata: Path) -> list[psutil.Process]:
    """The postmaster (and backends) running on pgdata."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and str(pgdata) in cmdline:
            found.append(process)
    return found


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Serve:
    """`chatlog serve` processes on an embedded PostgreSQL; each one's output in a file."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def start(self, **env: str) -> tuple[subprocess.Popen, str, Path]:
        port = free_port()
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("DATABASE_URL", "CHATLOG_DATABASE_URL", "TEST_DATABASE_URL", "XDG_DATA_HOME")}
        environment.update(CHATLOG_API_KEYS=f"{KEY}=alice", CHATLOG_PORT=str(port), **env)
        log = self.root / f"serve-{len(self.procs)}.log"
        # a working directory of its own: the data directory must not depend on it
        cwd = self.root / f"cwd-{len(self.procs)}"
        cwd.mkdir()
        proc = subprocess.Popen([str(CHATLOG), "serve"], env=environment, cwd=cwd, start_new_session=True,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}", log

    async def ready(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        async def up():
            if proc.poll() is not None:
                raise AssertionError(f"chatlog serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(url + "/readyz", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False
        await eventually(up, "chatlog serve to be ready", timeout=90, interval=0.2)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


@pytest.fixture
def serve():
    # short and absolute: the PostgreSQL socket lives in pgdata, and a unix socket path has ~107 bytes at most
    root = Path(tempfile.mkdtemp(prefix="chatlog-emb-"))
    runner = Serve(root)
    yield runner
    runner.close()
    for process in postgres_of(root):  # whatever a failed test left behind
        process.kill()
    shutil.rmtree(root, ignore_errors=True)


async def test_a_normal_start_prints_the_data_directory_and_no_warning(serve):
    home = serve.root / "home"
    home.mkdir()
    proc, url, log = serve.start(HOME=str(home))  # no CHATLOG_DATA_DIR: the default, under the home directory
    await serve.ready(proc, url, log)
    pgdata = home / ".local" / "share" / "chatlog" / "pgdata"
    assert postgres_of(pgdata), "the embedded PostgreSQL runs in ~/.local/share/chatlog/pgdata"
    assert stop(proc) == 0
    output = log.read_text()
    assert f"data directory: {home / '.local' / 'share' / 'chatlog'}" in output
    assert "CHATLOG_DATA_DIR" in output
    assert [line for line in output.splitlines() if "warn" in line.lower()] == []
    assert not (serve.root / "cwd-0" / ".chatlog").exists()
    await eventually(lambda: not postgres_of(pgdata), "the embedded PostgreSQL to stop with the server")


async def test_after_a_kill9_the_next_start_stops_the_orphan_and_serves_the_same_data(serve):
    data_dir = serve.root / "data"
    pgdata = data_dir / "pgdata"
    proc, url, log = serve.start(CHATLOG_DATA_DIR=str(data_dir))
    await serve.ready(proc, url, log)
    async with httpx.AsyncClient(base_url=url, headers=bearer(KEY), timeout=10) as client:
        cid = (await client.post("/v1/conversations", json={"metadata": {"kept": True}})).json()["id"]
    orphan = postmaster_pid(pgdata)
    proc.kill()
    proc.wait()
    assert alive(orphan), "SIGKILL leaves the embedded PostgreSQL running"

    proc, url, log = serve.start(CHATLOG_DATA_DIR=str(data_dir))
    await serve.ready(proc, url, log)
    await eventually(lambda: not alive(orphan), "the orphaned postmaster to be gone")
    assert postmaster_pid(pgdata) != orphan
    async with httpx.AsyncClient(base_url=url, headers=bearer(KEY), timeout=10) as client:
        assert (await client.get(f"/v1/conversations/{cid}")).json()["metadata"] == {"kept": True}
    assert "left running by a chatlog serve that was killed" in log.read_text()
    # and this one, stopped cleanly, stops its PostgreSQL (the bug: the dead owner kept it running forever)
    assert stop(proc) == 0
    await eventually(lambda: not postgres_of(pgdata), "the embedded PostgreSQL to stop with the server")


async def test_a_start_after_a_stale_pid_file_comes_up(serve):
    """Both processes killed: postmaster.pid names a dead pid, then a live process that is not PostgreSQL
    (a pid reused after a reboot); either way the next start comes up."""
    data_dir = serve.root / "data"
    pgdata = data_dir / "pgdata"
    proc, url, log = serve.start(CHATLOG_DATA_DIR=str(data_dir))
    await serve.ready(proc, url, log)
    for process in postgres_of(pgdata) + [psutil.Process(proc.pid)]:
        process.kill()
    proc.wait()
    await eventually(lambda: not postgres_of(pgdata), "the killed PostgreSQL to be gone")

    proc, url, log = serve.start(CHATLOG_DATA_DIR=str(data_dir))  # the pid file names a dead pid
    await serve.ready(proc, url, log)
    for process in postgres_of(pgdata) + [psutil.Process(proc.pid)]:
        process.kill()
    proc.wait()
    await eventually(lambda: not postgres_of(pgdata), "the killed PostgreSQL to be gone")
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        (pgdata / "postmaster.pid").write_text("\n".join([str(stranger.pid), *lines[1:]]) + "\n")
        proc, url, log = serve.start(CHATLOG_DATA_DIR=str(data_dir))
        await serve.ready(proc, url, log)
        assert stranger.poll() is None, "a process that is not PostgreSQL is left alone"
        assert stop(proc) == 0
        await eventually(lambda: not postgres_of(pgdata), "the embedded PostgreSQL to stop with the server")
    finally:
        stranger.kill()
        stranger.wait()
