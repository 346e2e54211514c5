"""Helpers the test modules share: plain functions and classes, no fixtures.

- waiting: `eventually` (every poll has a deadline and a message);
- the API: `new_conversation`, `append`, `stored_events`, in-process clients,
  and the same at the store (`new_store_conversation`, `user_messages`, `all_events`);
- errors: `assert_error`, `assert_contract_error`, `error_of`, `Ledger`
  (a refused request wrote nothing);
- events: `TURN`, `user_event`, `tool_turns`, `long_turn`;
- SSE: `SSEParser` and its `Frame` / `Comment` / `Retry`, `parse_sse`;
- streams read while written: `Writer`, `read_a_long_turn_while_dropping`,
  `read_a_long_turn_across_a_kill9`; what they leave in the process:
  `our_tails`, `assert_nothing_left_behind`;
- outages: `Outages`, `first_seen`, `events_locked`, `stored_log`.

Fixtures live in conftest.py, servers and their SSE clients in servers.py.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

import asyncpg
import httpx
import orjson

from store import NewEvent

# -- waiting ------------------------------------------------------------------------


async def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0, interval: float = 0.02):
    """Wait until check() (a value, or an awaitable of one) is truthy, and return it.

    Past `timeout` seconds it fails, saying `what` it was waiting for, instead of hanging."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout:g}s: {what}")
        await asyncio.sleep(interval)


# -- the API --------------------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def asgi_client(app, headers: dict | None = None) -> httpx.AsyncClient:
    """A client on `app` in this process (no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatlog",
                             headers=headers or {})


async def new_conversation(client: httpx.AsyncClient, **body) -> str:
    r = await client.post("/v1/conversations", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def append(client: httpx.AsyncClient, cid: str, events: list[dict]) -> dict:
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": events})
    assert r.status_code == 201, r.text
    return r.json()


async def stored_events(client: httpx.AsyncClient, cid: str) -> dict[int, dict]:
    """Every stored event of the conversation, by seq (read page by page)."""
    by_seq, after = {}, 0
    while True:
        r = await client.get(f"/v1/conversations/{cid}/events", params={"after": after, "compact": "false"})
        assert r.status_code == 200, r.text
        events = r.json()["events"]
        if not events:
            return by_seq
        by_seq.update((e["seq"], e) for e in events)
        after = events[-1]["seq"]


async def new_store_conversation(store, principal: str) -> uuid.UUID:
    return uuid.UUID((await store.create_conversation(principal))["id"])


async def all_events(store, principal: str, cid: uuid.UUID) -> list[dict]:
    """Every stored event of the conversation, read through the store page by page."""
    out: list[dict] = []
    while True:
        page, current = await store.read_events(principal, cid, after=out[-1]["seq"] if out else 0, limit=1000)
        out.extend(page)
        if not page or out[-1]["seq"] >= current:
            return out


def user_messages(n: int, tag: str, with_ids: bool = False) -> list[NewEvent]:
    """`n` user messages `<tag>-<i>` (with that as their id too, if `with_ids`)."""
    return [NewEvent("message.user", {"content": f"{tag}-{i}"}, f"{tag}-{i}" if with_ids else None)
            for i in range(n)]


# -- errors ----------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """The status, and a body that is only an error with this code and a message; the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def assert_contract_error(response: httpx.Response, status: int | tuple[int, ...],
                          codes: str | tuple[str, ...]) -> dict:
    """The error of a refused request, checked against the contract's whole shape (JSON, no
    other keys, details an object); `status` and `codes` may name alternatives."""
    statuses = (status,) if isinstance(status, int) else status
    codes = (codes,) if isinstance(codes, str) else codes
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "details"}, error
    assert error["code"] in codes, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error.get("details", {}), dict), error
    return error


def error_of(response: httpx.Response) -> dict | None:
    """The contract's error object, or None when the body does not have that shape."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)
            and set(error) <= {"code", "message", "details"}):
        return None
    return error


def outcome_unknown(response: httpx.Response) -> bool:
    error = error_of(response)
    return response.status_code == 503 and error is not None and (error.get("details") or {}).get("outcome") == "unknown"


class Ledger:
    """What the store holds for some principals, to show a request wrote nothing."""

    def __init__(self, store, principals: list[str], deadline: float = 10.0) -> None:
        self.store, self.principals, self.deadline = store, principals, deadline

    async def state(self) -> tuple:
        return tuple(await self.store.pool.fetchrow(
            """SELECT (SELECT count(*) FROM events WHERE principal = ANY($1)),
                      (SELECT count(*) FROM conversations WHERE principal = ANY($1)),
                      (SELECT max(updated_at) FROM conversations WHERE principal = ANY($1))""",
            self.principals))

    async def refused(self, request, status, codes) -> dict:
        """Send `request` (a coroutine): refused in the contract's shape, nothing written."""
        before = await self.state()
        response = await asyncio.wait_for(request, self.deadline)
        error = assert_contract_error(response, status, codes)
        assert await self.state() == before, "a refused request wrote"
        return error


# -- events ----------------------------------------------------------------------------

# A turn with a tool call, its result after the turn (seqs 2..11 after conversation.created).
TURN = [
    {"type": "message.user", "data": {"content": "What is the weather in Paris?"}},
    {"type": "turn.started", "data": {"turn_id": "t1", "model": "gpt-4o"}},
    {"type": "text.delta", "data": {"turn_id": "t1", "text": "Let me "}},
    {"type": "text.delta", "data": {"turn_id": "t1", "text": "check."}},
    {"type": "tool_call.started", "data": {"turn_id": "t1", "tool_call_id": "call_1", "name": "weather"}},
    {"type": "tool_call.delta", "data": {"tool_call_id": "call_1", "text": '{"city":'}},
    {"type": "tool_call.delta", "data": {"tool_call_id": "call_1", "text": '"Paris"}'}},
    {"type": "tool_call.completed", "data": {"tool_call_id": "call_1"}},
    {"type": "turn.finished", "data": {"turn_id": "t1", "finish_reason": "tool_calls"}},
    {"type": "tool.result", "data": {"tool_call_id": "call_1", "content": {"temp_c": 18}, "status": "ok"}},
]


def user_event(marker: str, with_id: bool = True) -> dict:
    """A `message.user` whose content is `marker` (so a duplicate shows even without an id)."""
    event = {"type": "message.user", "data": {"content": marker}}
    return {"id": marker, **event} if with_id else event


def tool_turns(count: int, deltas: int, answered: Callable[[int], bool] = lambda t: True) -> list[dict]:
    """`count` finished turns t0, t1, ...: a question, `deltas` text deltas, a tool call
    completed at once, and (for each turn where answered(t)) its result after the turn."""
    events = []
    for t in range(count):
        events += [{"type": "message.user", "data": {"content": f"q{t}"}},
                   {"type": "turn.started", "data": {"turn_id": f"t{t}"}}]
        events += [{"type": "text.delta", "data": {"turn_id": f"t{t}", "text": f"w{i} "}} for i in range(deltas)]
        events += [{"type": "tool_call.started", "data": {"turn_id": f"t{t}", "tool_call_id": f"c{t}", "name": "f"}},
                   {"type": "tool_call.completed", "data": {"tool_call_id": f"c{t}", "arguments": "{}"}},
                   {"type": "turn.finished", "data": {"turn_id": f"t{t}", "finish_reason": "tool_calls"}}]
        if answered(t):
            events.append({"type": "tool.result", "data": {"tool_call_id": f"c{t}", "content": t, "status": "ok"}})
    return events


# Texts a naive SSE writer would break: newlines, CRs, things that look like SSE fields, non-ASCII.
TRICKY = [" the", "\n\n", "data: x\n\nid: 99\n\n", "\r\n", "é—😀", "\u2028", ": ping", "event: turn.finished",
          "{\"json\": true}", "  ", "retry: 1"]


def long_turn(rng: random.Random, turn_id: str, at_least: int = 400) -> list[dict]:
    """A turn as a model streams it: interleaved runs of text and reasoning,
    tool calls with argument fragments, results (pending, then final)."""
    events = [{"type": "turn.started", "data": {"turn_id": turn_id, "model": "m"}}]
    calls = 0
    while len(events) < at_least:
        kind = rng.choice(["text", "text", "reasoning", "tool"])
        if kind == "tool":
            calls += 1
            call = f"{turn_id}-call-{calls}"
            arguments = '{"query": "' + "".join(rng.choice("abc xyz") for _ in range(40)) + '", "n": 3}'
            cuts = sorted(rng.sample(range(1, len(arguments)), rng.randint(1, 14)))
            parts = [arguments[i:j] for i, j in zip([0, *cuts], [*cuts, len(arguments)])]
            events.append({"type": "tool_call.started", "data": {"turn_id": turn_id, "tool_call_id": call,
                                                                 "name": "search"}})
            events += [{"type": "tool_call.delta", "data": {"tool_call_id": call, "text": p}} for p in parts]
            events.append({"type": "tool_call.completed", "data": {"tool_call_id": call}})
            if rng.random() < 0.5:
                events.append({"type": "tool.result", "data": {"tool_call_id": call, "content": "working",
                                                               "status": "pending"}})
            events.append({"type": "tool.result", "data": {"tool_call_id": call, "content": {"hits": calls},
                                                           "status": "ok"}})
        else:
            type_ = f"{kind}.delta"
            events += [{"type": type_, "data": {"turn_id": turn_id, "text": rng.choice(TRICKY)}}
                       for _ in range(rng.randint(1, 12))]
    events.append({"type": "turn.finished", "data": {"turn_id": turn_id, "finish_reason": "stop",
                                                     "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                               "total_tokens": 3}}})
    return events


def seeded_rng() -> random.Random:
    seed = random.randrange(1 << 32)
    print(f"random seed {seed}")  # shown with a failure: rerun with random.Random(seed)
    return random.Random(seed)


# -- SSE ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A dispatched SSE event. `id` is the stream's last event id when it was dispatched."""

    id: str | None
    event: str | None
    data: str

    def json(self):
        return orjson.loads(self.data)


@dataclass(frozen=True)
class Comment:
    text: str


@dataclass(frozen=True)
class Retry:
    ms: int


Item = Frame | Comment | Retry


class SSEParser:
    """The WHATWG event-stream interpretation, fed bytes; returns what each feed completes.

    Only complete lines are interpreted and only a blank line dispatches, so a
    connection cut mid-frame leaves that frame undelivered, as in a browser.
    """

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self._pending = b""
        self._data: list[str] = []
        self._event: str | None = None
        self._id = last_event_id

    def feed(self, chunk: bytes) -> list[Item]:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        out: list[Item] = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode()
            if not line:
                self.last_event_id = self._id
                if self._data:
                    out.append(Frame(self._id, self._event, "\n".join(self._data)))
                self._data, self._event = [], None
                continue
            name, colon, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if not name:
                out.append(Comment(value))
            elif name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id" and "\0" not in value:
                self._id = value
            elif name == "retry" and value.isdigit():
                out.append(Retry(int(value)))
        return out


def parse_sse(body: str) -> list[Frame]:
    """The frames of a whole SSE body (comments and retry fields left out)."""
    return [item for item in SSEParser().feed(body.encode()) if isinstance(item, Frame)]


def frame_key(frame: Frame) -> tuple[int, int]:
    """(seq, k) of a frame id `<seq>` (format=events) or `<seq>:<k>` (format=ui)."""
    seq, _, k = frame.id.partition(":")
    return int(seq), int(k or 0)


def frame_seq(frame: Frame) -> int:
    return frame_key(frame)[0]


# -- a long turn, read while it is written --------------------------------------------------


class Writer:
    """Appends a list of events in small batches, never more than `lag` events
    ahead of what the reader has received, so writing and reading interleave
    on any machine (the reader reads WHILE the turn is written).

    `start` is the seq stored before the first batch (the reader's catch-up
    gets it that far); `last` the seq of the last event."""

    def __init__(self, client: httpx.AsyncClient, cid: str, events: list[dict], rng: random.Random,
                 start: int = 0) -> None:
        self.client, self.cid, self.events, self.rng = client, cid, events, rng
        self.start, self.last = start, start + len(events)
        self.received = start  # highest seq the reader has received
        self.written = 0

    def saw(self, frame: Frame) -> None:
        self.received = max(self.received, frame_seq(frame))

    async def run(self, max_lag: int = 6) -> None:
        i = 0
        while i < len(self.events):
            lag = self.rng.randint(0, max_lag)
            await eventually(lambda: self.written - self.received <= lag,
                             f"the reader to get within {lag} events of seq {self.written}", timeout=30,
                             interval=0.002)
            batch = self.events[i:i + self.rng.randint(1, 4)]
            self.written = (await append(self.client, self.cid, batch))["last_seq"]
            i += len(batch)


async def a_long_turn_to_write(client: httpx.AsyncClient, rng: random.Random, at_least: int = 400,
                               stored: int = 0) -> Writer:
    """A new conversation with a user message and the first `stored` events of a
    long turn; the Writer of the rest of the turn."""
    cid = await new_conversation(client)
    turn = long_turn(rng, "t1", at_least)
    start = (await append(client, cid, [{"type": "message.user", "data": {"content": "go"}}, *turn[:stored]]))[
        "last_seq"]
    return Writer(client, cid, turn[stored:], rng, start)


def dropper(rng: random.Random, most: int = 4):
    """Hang up after a random 1..most frames of each connection; half the
    time a few bytes into the next frame, so a partial frame is thrown away."""
    state = {"at": 0}

    def drop(count: int) -> int | None:
        if count == 1:
            state["at"] = rng.randint(1, most)
        if count >= state["at"]:
            return 0 if rng.random() < 0.5 else rng.randint(1, 120)
        return None

    return drop


async def read_a_long_turn_while_dropping(client: httpx.AsyncClient, params: dict,
                                          done: Callable[[Frame, int], bool]):
    """Write a long turn while a reader follows `/stream` with `params`, hanging
    up at random frames; returns (the reader, the stored events, the last seq)."""
    from tests.servers import ResumingReader  # (tests.servers imports this module)

    rng = seeded_rng()
    # some of the turn is already stored when the reader arrives: its first catch-up has whole runs
    writer = await a_long_turn_to_write(client, rng, stored=40)
    reader = ResumingReader([client], f"/v1/conversations/{writer.cid}/stream", params=params)
    await asyncio.wait_for(asyncio.gather(
        writer.run(), reader.run(done=lambda f: done(f, writer.last), drop=dropper(rng), on_frame=writer.saw)), 60)
    return reader, await stored_events(client, writer.cid), writer.last


@dataclass
class KilledMidTurn:
    reader: Any  # tests.servers.ResumingReader
    stored: dict[int, dict]  # by seq
    start: int  # the last seq stored before the turn
    last: int  # the turn's last seq
    on_b: list[int]  # seqs of the turn's frames B delivered
    killed_at: int | None  # the seq of the frame after which B was killed


async def read_a_long_turn_across_a_kill9(a, b, params: dict, kill_after: int,
                                          done: Callable[[Frame, int], bool]) -> KilledMidTurn:
    """Append a long turn through server A while a reader follows it on server B
    (live, via B's own LISTEN); SIGKILL B once it has delivered `kill_after` frames
    of the turn: the reader resumes on A with Last-Event-ID."""
    from tests.servers import ResumingReader  # (tests.servers imports this module)

    rng = seeded_rng()
    async with a.client() as client_a, b.client() as client_b:
        writer = await a_long_turn_to_write(client_a, rng, at_least=150)
        reader = ResumingReader([client_b, client_a], f"/v1/conversations/{writer.cid}/stream", params=params)
        on_b: list[int] = []
        killed_at: list[int] = []

        def on_frame(frame: Frame) -> None:
            if frame.data == "[DONE]":
                return
            writer.saw(frame)
            if reader.use_client == 0 and frame_seq(frame) > writer.start:
                on_b.append(frame_seq(frame))
                if len(on_b) == kill_after:
                    killed_at.append(frame_seq(frame))
                    b.kill9()

        await asyncio.wait_for(asyncio.gather(
            writer.run(), reader.run(done=lambda f: done(f, writer.last), on_frame=on_frame)), 60)
        stored = await stored_events(client_a, writer.cid)
    return KilledMidTurn(reader, stored, writer.start, writer.last, on_b, killed_at[0] if killed_at else None)


# -- what streams leave in the process ----------------------------------------------------------


def our_tails(store, cids: set[uuid.UUID]) -> dict:
    return {key[1]: tail for key, tail in store.listener.tails.items() if key[1] in cids}


async def assert_nothing_left_behind(store, cids: set[uuid.UUID], tasks_before: set) -> None:
    """No tail of these conversations, no pooled connection out, no task left over."""
    await eventually(lambda: not our_tails(store, cids), "every tail is gone")
    await eventually(lambda: store.pool.get_idle_size() == store.pool.get_size(), "every pooled connection is back")

    def leftover():
        return [t for t in asyncio.all_tasks() - tasks_before if t is not asyncio.current_task() and not t.done()]

    try:
        await eventually(lambda: not leftover(), "no task left behind")
    except AssertionError:
        raise AssertionError("tasks left behind:\n" + "\n".join(repr(t) for t in leftover()[:20])) from None


# -- outages ------------------------------------------------------------------------------------

REQUEST_TIMEOUT = 8.0  # s: a client gives up (recorded as a hang)
STALL_BOUND = 5.0  # s: a committed event reaches a live reader within this, or its stream ends


class Outages:
    """When the store was down, so that a delivery delay counts only the time it was up:
    an event committed just before PostgreSQL stopped can reach no one until it is back."""

    def __init__(self) -> None:
        self.windows: list[tuple[float, float]] = []

    @asynccontextmanager
    async def down(self):
        began = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((began, time.monotonic()))

    def up_time(self, start: float, end: float) -> float:
        return end - start - sum(max(0.0, min(end, e) - max(start, s)) for s, e in self.windows)


def first_seen(reader) -> dict[int, float]:
    """seq -> when a FollowingReader first got a frame of it."""
    seen: dict[int, float] = {}
    for received in reader.received:
        if received.frame.data != "[DONE]":
            seen.setdefault(frame_seq(received.frame), received.at)
    return seen


@asynccontextmanager
async def events_locked(database_url: str, mode: str):
    """`LOCK TABLE events IN <mode> MODE` held by another session (as a migration would) for the block."""
    locker = await asyncpg.connect(database_url, timeout=10)
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute(f"LOCK TABLE events IN {mode} MODE")
        yield
        await lock.rollback()
    finally:
        await locker.close()


async def stored_log(database_url: str) -> list[dict]:
    """Every stored event of the database, by position, read from PostgreSQL itself."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            """SELECT conversation_id::text AS conversation_id, seq, position, id, type, data::text AS data
                 FROM events ORDER BY position""")
    finally:
        await conn.close()
    return [{**dict(row), "data": orjson.loads(row["data"])} for row in rows]


# -- oracles (the pure reference a store answer is compared with) ------------------


def messages_at(events, at_seq: int, format: str) -> dict:
    """GET /messages' body from the events themselves: the history exactly as it
    stood at `at_seq` (events in seq order; later ones are not read)."""
    import projections

    return projections.render(projections.fold_all(e for e in events if e["seq"] <= at_seq), format)


def replay(conversation_id, events: list[tuple[str, dict]]):
    """The aggregate rebuilt by applying every event from seq 1 (what the saved state must equal)."""
    import domain

    (first_type, first_data), rest = events[0], events[1:]
    assert first_type == "conversation.created"
    conversation = domain.create(conversation_id, first_data)
    for type_, data in rest:
        domain.apply(conversation, type_, data)
    return conversation


def finished_tool_turn(n: int) -> list:
    """A finished turn with one answered tool call (5 store events), as an agent loop writes them:
    the turn `chatlog bench`'s growth section writes 10,000 of (one builder for both)."""
    from bench.growth import finished_tool_turn

    return finished_tool_turn(n)
