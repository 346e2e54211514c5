"""SIGTERM with streams open: the process ends its streams, finishes what it
was writing and exits promptly and quietly; the clients resume elsewhere and
miss nothing."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.helpers import Frame, append, eventually, new_conversation
from tests.servers import ResumingReader, open_sse

pytest_plugins = ("tests.servers",)

EXIT_BOUND_SECONDS = 8.0  # before: never (uvicorn waited for the SSE clients forever)


def deltas(n: int, tag: str) -> list[dict]:
    return [{"type": "text.delta", "data": {"turn_id": "t1", "text": f"{tag}-{i} "}} for i in range(n)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_ends_open_streams_and_the_process_exits_promptly_and_quietly(
        chatlog_servers, start_server, signum):
    a = chatlog_servers[0]
    doomed = await start_server("doomed")
    async with a.client() as client_a, doomed.client() as client_x:
        cid = await new_conversation(client_a)
        await append(client_a, cid, [{"type": "message.user", "data": {"content": "go"}},
                                     {"type": "turn.started", "data": {"turn_id": "t1"}}, *deltas(3, "before")])
        readers = [ResumingReader([client_x, client_a], f"/v1/conversations/{cid}/stream",
                                  params={"format": fmt, "compact": "false"})
                   for fmt in ("events", "ui") for _ in range(4)]
        last = {"seq": None}

        def done(frame: Frame) -> bool:  # the turn's end: its last event, or [DONE] in format=ui
            return frame.data == "[DONE]" or (frame.event is not None and frame.event.startswith("turn.finished"))

        tasks = [asyncio.create_task(reader.run(done=done)) for reader in readers]
        try:
            await eventually(lambda: all(len(reader.frames) >= 5 for reader in readers), "the readers catch up",
                             timeout=20, interval=0.05)

            writing = asyncio.create_task(append(client_a, cid, deltas(3, "during")))
            signalled = time.monotonic()
            doomed._signal(signum)
            await eventually(lambda: not doomed.alive, "the server exits", timeout=EXIT_BOUND_SECONDS, interval=0.05)
            took = time.monotonic() - signalled
            await writing
            last["seq"] = (await append(client_a, cid, [*deltas(2, "after"), {
                "type": "turn.finished", "data": {"turn_id": "t1", "finish_reason": "stop"}}]))["last_seq"]
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        async with open_sse(client_a, f"/v1/conversations/{cid}/stream",
                            params={"format": "ui", "compact": "false", "follow": "false"}) as stream:
            ui_frames = [f.id for f in await stream.read_all() if isinstance(f, Frame)]

    print(f"exit {took:.2f} s after signal {signum}")
    assert doomed.proc.returncode == 0, f"exit code {doomed.proc.returncode}"
    log = doomed.log_text()
    assert "Traceback" not in log, log[-3000:]
    for reader in readers:
        ids = [f.id for f in reader.frames]
        assert reader.connections >= 2, "the stream on the stopped server ended; the reader resumed on another"
        if reader.params["format"] == "events":
            assert ids == [str(seq) for seq in range(1, last["seq"] + 1)], "every event once, in order"
        else:
            assert ids == ui_frames, "every ui frame once, in order"
