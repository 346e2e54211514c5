"""Trying the runner without an API key: `chatlog serve --fake-upstream` is a
chat that streams, and `chatlog fake-upstream --port N` a model to point a
server at."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import httpx
import pytest

from tests.helpers import eventually
from tests.servers import CHATLOG, free_port


async def _ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    async def up():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode}")
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url + path, timeout=1)).status_code == 200
        except httpx.HTTPError:
            return False
    await eventually(up, f"{url}{path} to answer", timeout=timeout, interval=0.1)


@pytest.fixture
def spawn(tmp_path):
    procs: list[subprocess.Popen] = []

    def run(*args: str, **env: str) -> subprocess.Popen:
        environment = {**os.environ, **env}
        environment.pop("TEST_DATABASE_URL", None)
        proc = subprocess.Popen([str(CHATLOG), *args], env=environment, cwd=tmp_path, start_new_session=True,
                                stdout=open(tmp_path / f"{args[0]}-{len(procs)}.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def test_serve_with_fake_upstream_gives_a_chat_that_streams(spawn, database_url):
    port = free_port()
    proc = spawn("serve", "--fake-upstream", "--port", str(port), DATABASE_URL=database_url, CHATLOG_API_KEYS="")
    url = f"http://127.0.0.1:{port}"
    await _ready(url, "/readyz", proc)
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        cid = (await client.post("/v1/conversations", json={})).json()["id"]
        async with client.stream("POST", f"/v1/conversations/{cid}/turns", headers={"Accept": "text/event-stream"},
                                 json={"message": {"role": "user", "content": "hi"}}) as r:
            assert r.status_code == 200
            body = (await r.aread()).decode()
    assert "event: text.delta" in body and "event: turn.finished" in body
    assert body.count("event: text.delta") > 3  # streamed word by word


async def test_fake_upstream_command_serves_chat_completions(spawn):
    port = free_port()
    proc = spawn("fake-upstream", "--port", str(port))
    url = f"http://127.0.0.1:{port}/v1"
    await _ready(url, "/models", proc)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(url + "/chat/completions", headers={"Authorization": "Bearer k"},
                              json={"model": "fake", "messages": [{"role": "user", "content": "[fake:say Hi.]"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hi."
    await asyncio.sleep(0)
