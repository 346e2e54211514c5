"""A fake OpenAI-compatible Chat Completions upstream with scripted replies.

`chatlog serve --fake-upstream` gives a newcomer without an API key a chat that
streams, and the tests drive every scenario the runner must survive through it,
over real HTTP. It speaks the wire format of OpenAI's streaming Chat Completions
(`data: {chat.completion.chunk}` events, the role in the first chunk, tool-call
fragments by `index`, `usage` in a last chunk with `choices: []` when
`stream_options.include_usage`, then `data: [DONE]`), the non-streaming answer,
`GET /models`, and OpenAI's 400 for the request mistakes a runner could make
(a tool message answering no preceding tool call, a tool call left unanswered).

The reply is chosen by directives `[fake:...]` in the last user message (several
combine: `[fake:slow 20ms] [fake:break after 5]`), or by a model named
`fake-<directive>` (`-` for spaces: `fake-tools`, `fake-slow-50ms`); a directive it
cannot read is a 400 that says so:

    (none)                     a short friendly text, streamed word by word
    say TEXT                   exactly TEXT, streamed word by word
    reasoning [field=reasoning]  reasoning first (`reasoning_content`, or `reasoning`)
    tools [a,b] [sequential] [steps N]
                               parallel tool calls (all the request's tools when
                               no names), fragments interleaved by index unless
                               `sequential`; after the results (role "tool") a text
                               that quotes them; `steps N`: N rounds of calls
    error [STATUS] [after N]   STATUS (500) before any chunk (OpenAI's error JSON), or
                               an in-stream error event after N chunks
    fail N [STATUS] then ok    STATUS (default 500) N times, then the reply; also
    STATUS then ok             `429 then ok`. Counted per `key K` or per request
                               messages+model, starting over after the success;
                               429 carries Retry-After
                               (`retry-after S`, default 1; `retry-after-ms MS`)
    (N counts `data:` events, the role chunk included)
    break after N              N chunks, then the connection is cut (no [DONE])
    truncate after N           N chunks, then a clean end without finish or [DONE]
    stall after N              N chunks, then nothing until the client closes
    slow [DURATION]            a pause before every chunk (20ms; `1s`; number = ms)
    rate R                     R chunks a second on a fixed schedule (chunk k due k/R s
                               after the first, however late the previous one went out);
                               with `long N`: N deltas at R/s (without: as fast as possible)
    delay DURATION             a pause before the response headers
    at T                       the same pause, until the Unix time T (streams that start
                               together: chatlog bench)
    long [N] [chunks]          N (1000) text chunks `word0 word1 ...`
    length                     finish_reason "length"

Every request is kept (bounded) with its exact body bytes, what was answered
(`answer`: the assistant message, as the next request should carry it back),
the chunks sent and how the exchange ended (`outcome`: done, error, broken,
truncated, client_closed -- a cancelled runner shows as client_closed):
`FakeUpstream.requests`, `await FakeUpstream.wait_for(predicate)`, and
`GET /_fake/requests` (`DELETE` clears them).

In process: `fake = FakeUpstream(); url = await fake.start()` (then `await
fake.stop()`), or `url = fake.start_in_thread()` / `fake.stop_in_thread()`; the
url is the `base_url` for `AsyncOpenAI` (it ends in `/v1`). From a shell:
`python -m runner.fake_upstream --port 8089`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_BODY = 32 * 1024 * 1024
FAKE_MODELS = ("fake", "fake-tools", "fake-reasoning", "fake-long", "fake-slow")

ERROR_SHAPES = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "You didn't provide an API key."),
    404: ("invalid_request_error", "unknown_url", "Unknown request URL."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def error_body(status: int, message: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
    kind, code, default = ERROR_SHAPES.get(status, ("server_error" if status >= 500 else "invalid_request_error",
                                                    None, f"Upstream error {status}."))
    return {"error": {"message": message or default, "type": kind, "param": param, "code": code}}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Received:
    """One request as it reached the fake upstream, and what it answered."""

    n: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status: int = 0
    directives: list[str] = field(default_factory=list)
    answer: dict | None = None       # the assistant message it (began to) send
    chunks_sent: int = 0
    outcome: str = "open"            # done | error | broken | truncated | client_closed
    response: bytes | bytearray = field(default_factory=bytearray)  # the body sent (its first keep_response bytes)

    @property
    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    def to_json(self) -> dict:
        return {"n": self.n, "method": self.method, "path": self.path, "headers": self.headers,
                "body": self.body.decode("utf-8", "replace"),
                "body_base64": base64.b64encode(self.body).decode(),
                "received_at": self.received_at, "status": self.status, "directives": self.directives,
                "answer": self.answer, "chunks_sent": self.chunks_sent, "outcome": self.outcome,
                "response": self.response.decode("utf-8", "replace")}


# --- what to answer ---------------------------------------------------------

@dataclass
class Script:
    status: int = 200
    error: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    deltas: list[dict] = field(default_factory=list)  # the chunks after the role chunk
    role_delta: dict = field(default_factory=lambda: {"role": "assistant", "content": "", "refusal": None})
    finish_reason: str = "stop"
    answer: dict = field(default_factory=dict)
    slow: float = 0.0
    rate: float | None = None
    delay: float = 0.0
    break_after: int | None = None
    truncate_after: int | None = None
    stall_after: int | None = None
    error_after: tuple[int, int] | None = None


def directives_of(request: dict) -> list[str]:
    found: list[str] = []
    model = request.get("model")
    if isinstance(model, str) and model.startswith("fake-"):
        found.append(model[len("fake-"):].replace("-", " "))
    for message in reversed(request["messages"]):
        if message.get("role") == "user":
            found += [d.strip() for d in re.findall(r"\[fake:([^\]]*)\]", text_of(message.get("content")))]
            break
    return found


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else orjson.dumps(content).decode()


def duration(word: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(ms|s)?", word)
    if not m:
        raise ValueError(word)
    value = float(m.group(1))
    return value if m.group(2) == "s" else value / 1000


def words_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


@dataclass
class Plan:
    """What the directives ask for."""

    text: str | None = None
    tools: list[str] | None = None           # [] = every tool of the request
    sequential: bool = False
    steps: int = 1
    reasoning_field: str | None = None
    status: int = 200
    error_after: int | None = None
    fail: tuple[int, int] | None = None      # (times, status)
    key: str | None = None
    retry_after: str = "1"
    retry_after_ms: str | None = None
    slow: float = 0.0
    rate: float | None = None
    delay: float = 0.0
    break_after: int | None = None
    truncate_after: int | None = None
    stall_after: int | None = None
    long: int | None = None
    finish_reason: str = "stop"


def parse_plan(directives: list[str]) -> Plan:
    plan = Plan()
    for directive in directives:
        try:
            _parse(directive, plan)
        except (IndexError, ValueError):
            raise BadRequest(f"fake upstream: cannot read the directive [fake:{directive}] "
                             "(durations: 50ms, 2s; the list: runner/fake_upstream.py)") from None
    return plan


def _parse(directive: str, plan: Plan) -> None:
    w = directive.split()
    if not w:
        return
    head, i = w[0].lower(), 1
    if head == "say":
        plan.text = directive.split(None, 1)[1] if len(w) > 1 else ""
        return
    if head == "reasoning":
        plan.reasoning_field = "reasoning_content"
    elif head == "tools":
        plan.tools = []
        if len(w) > 1 and w[1] not in ("sequential", "steps"):
            plan.tools, i = [t for t in w[1].split(",") if t], 2
    elif head == "error":
        plan.status, i = (int(w[1]), 2) if len(w) > 1 and w[1].isdigit() else (500, 1)
    elif head == "fail":  # fail N [STATUS] then ok
        plan.fail, i = (int(w[1]), 500), 2
        if i < len(w) and w[i].isdigit():
            plan.fail, i = (plan.fail[0], int(w[i])), i + 1
    elif head.isdigit() and "then" in w:  # 429 then ok
        plan.fail = (1, int(head))
    elif head == "at":
        plan.delay, i = max(0.0, float(w[1]) - time.time()), 2
    elif head in ("slow", "delay"):
        setattr(plan, head, duration(w[1]) if len(w) > 1 else 0.02)
        i = 2
    elif head == "rate":
        plan.rate, i = float(w[1]), 2
        if not plan.rate > 0:
            raise ValueError(w[1])
    elif head == "long":
        plan.long, i = (int(w[1]), 2) if len(w) > 1 and w[1].isdigit() else (1000, 1)
    elif head == "length":
        plan.finish_reason = "length"
    elif head not in ("break", "truncate", "stall"):
        raise ValueError(head)
    while i < len(w):  # options, in any directive
        word, arg = w[i].lower(), (w[i + 1] if i + 1 < len(w) else "")
        i += 1
        if word.startswith("field="):
            plan.reasoning_field = word.split("=", 1)[1]
        elif word == "sequential":
            plan.sequential = True
        elif word in ("then", "ok", "chunks"):
            pass
        elif word == "after" and head in ("break", "truncate", "stall", "error"):
            setattr(plan, f"{head}_after", int(arg))
            i += 1
        elif word in ("steps", "key", "retry-after", "retry-after-ms"):
            value = int(arg) if word == "steps" else arg
            setattr(plan, word.replace("-", "_"), value)
            i += 1
        else:
            raise ValueError(word)


class FakeUpstream:
    """The server. `requests` is every request received (the last `max_requests`)."""

    def __init__(self, *, max_requests: int = 1000, keep_response: int = 64 * 1024, max_keys: int = 10_000):
        self.requests: collections.deque[Received] = collections.deque(maxlen=max_requests)
        self.keep_response = keep_response
        self._changed = asyncio.Event()
        self._failures: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._max_keys = max_keys
        self._count = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url: str | None = None

    # -- lifecycle --

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_BODY)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}/v1"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Run on an event loop of its own in a daemon thread (for sync callers and other loops)."""
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start(host, port))
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake upstream did not start within 10 s")
        return self.url

    def stop_in_thread(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate, timeout: float = 10.0) -> Received:
        """The newest kept request for which `predicate(record)` holds, waiting (on the loop
        that started the server) until a request arrives or ends; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                for record in reversed(self.requests):
                    if predicate(record):
                        return record
                await changed.wait()

    # -- the script --

    def script(self, request: dict, record: Received) -> Script:
        record.directives = directives_of(request)
        plan = parse_plan(record.directives)
        s = Script(status=plan.status, slow=plan.slow, rate=plan.rate, delay=plan.delay,
                   finish_reason=plan.finish_reason, break_after=plan.break_after,
                   truncate_after=plan.truncate_after, stall_after=plan.stall_after)
        if plan.error_after is not None:
            s.status, s.error_after = 200, (plan.error_after, plan.status)
        if plan.fail is not None:
            times, status = plan.fail
            key = plan.key or hashlib.sha256(orjson.dumps([request["model"], request["messages"]])).hexdigest()
            failed = self._failures.pop(key, 0)
            if failed < times:  # fail again; after the success the count starts over
                self._failures[key] = failed + 1
                while len(self._failures) > self._max_keys:
                    self._failures.popitem(last=False)
                s.status = status
        if s.status != 200:
            s.error = error_body(s.status)
            if s.status == 429:
                s.headers["retry-after"] = plan.retry_after
                if plan.retry_after_ms:
                    s.headers["retry-after-ms"] = plan.retry_after_ms
            return s

        messages = request["messages"]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        since_user = messages[last_user + 1:]
        results = [m for m in since_user if m.get("role") == "tool"]
        rounds = sum(1 for m in since_user if m.get("role") == "assistant" and m.get("tool_calls"))
        if plan.tools is not None and rounds < plan.steps:
            names = plan.tools or [t["function"]["name"] for t in request.get("tools") or [] if t.get("function")]
            self._tool_calls(s, request, names or ["lookup"], plan.sequential)
        else:
            if results:
                pieces = words_of(answer_from_results(messages, results))
            elif plan.long is not None:
                pieces = [f"word{i} " for i in range(plan.long)]
                pieces[-1:] = [p.rstrip() for p in pieces[-1:]]
            elif plan.text is not None:
                pieces = words_of(plan.text)
            else:
                said = text_of(messages[last_user].get("content")) if last_user >= 0 else ""
                said = re.sub(r"\[fake:[^\]]*\]", "", said).strip()
                pieces = words_of("Hello! This is chatlog's fake upstream: no API key needed, every word you see "
                                  "streamed here was recorded as an event first."
                                  + (f' You said: "{said}"' if said else ""))
            s.deltas = [{"content": p} for p in pieces]
            s.answer = {"role": "assistant", "content": "".join(pieces)}
        if plan.reasoning_field:  # reasoning models think first, before text or tool calls
            field_name, reasoning = plan.reasoning_field, "The user wants an answer. I will think briefly, then reply."
            s.deltas[:0] = [{field_name: p} for p in words_of(reasoning)]
            s.answer[field_name] = reasoning
            s.role_delta = {"role": "assistant", "content": None, field_name: ""}
        return s

    @staticmethod
    def _tool_calls(s: Script, request: dict, names: list[str], sequential: bool) -> None:
        schemas = {t["function"]["name"]: t["function"].get("parameters") or {}
                   for t in request.get("tools") or [] if t.get("function")}
        calls = []
        for index, name in enumerate(names):
            arguments = orjson.dumps(example_arguments(name, schemas.get(name))).decode()
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": name, "arguments": arguments}})
        # each call: its first fragment (id, type, name, empty arguments), then the
        # arguments in pieces of 5 characters
        streams = []
        for index, call in enumerate(calls):
            args = call["function"]["arguments"]
            frags = [{"index": index, "id": call["id"], "type": "function",
                      "function": {"name": call["function"]["name"], "arguments": ""}}]
            frags += [{"index": index, "function": {"arguments": args[j:j + 5]}} for j in range(0, len(args), 5)]
            streams.append(frags)
        if sequential:
            order = [f for frags in streams for f in frags]
        else:  # round-robin: fragments of different calls interleave
            order = [f for group in _zip_longest(streams) for f in group]
        s.role_delta = {"role": "assistant", "content": None, "refusal": None}
        s.deltas = [{"tool_calls": [f]} for f in order]
        s.finish_reason = "tool_calls"
        s.answer = {"role": "assistant", "content": None, "tool_calls": calls}

    # -- HTTP --

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if headers.get("expect", "").lower() == "100-continue":  # curl, for bodies over 1 KiB
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await read_body(reader, headers)
                keep = await self._respond(method, path.split("?", 1)[0], headers, body, reader, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # stop(): asyncio's stream callback would log a cancelled handler as an error
        finally:
            self._connections.discard(task)
            writer.close()

    async def _respond(self, method, path, headers, body, reader, writer) -> bool:
        route = path[3:] if path.startswith("/v1/") else path
        if route == "/chat/completions" and method == "POST":
            return await self._completions(path, headers, body, reader, writer)
        if route == "/models" and method == "GET":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "chatlog"} for m in FAKE_MODELS]
            return await send_json(writer, 200, {"object": "list", "data": data})
        if route == "/_fake/requests" and method == "GET":
            return await send_json(writer, 200, {"requests": [r.to_json() for r in self.requests]})
        if route == "/_fake/requests" and method == "DELETE":
            self.requests.clear()
            return await send_json(writer, 200, {"cleared": True})
        return await send_json(writer, 404, error_body(404, f"Unknown request URL: {method} {path}."))

    async def _completions(self, path, headers, body, reader, writer) -> bool:
        self._count += 1
        record = Received(self._count, "POST", path, headers, body, time.time())
        self.requests.append(record)
        self._touch()
        try:
            if not headers.get("authorization", "").startswith("Bearer "):
                raise BadRequest("You didn't provide an API key. You need to provide your API key in an "
                                 "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                                 status=401)
            request = validate(body)
            script = self.script(request, record)
        except Exception as e:  # a bug here answers 500 with its message rather than hanging the runner
            e = e if isinstance(e, BadRequest) else BadRequest(f"fake upstream bug: {e!r}", status=500)
            record.status, record.outcome = e.status, "error"
            self._touch()
            return await send_json(writer, e.status, error_body(e.status, str(e), e.param), record=record)
        # the client closing its end is how a cancelled (or timed-out) request shows here
        closed = asyncio.ensure_future(reader.read(1))
        try:
            if script.delay:
                await asyncio.wait([closed], timeout=script.delay)
            if closed.done():
                record.outcome = "client_closed"
            elif script.error is not None:
                record.status, record.outcome = script.status, "error"
                await send_json(writer, script.status, script.error, script.headers, record)
            elif request.get("stream"):
                record.status = 200
                record.answer = dict(script.answer, finish_reason=script.finish_reason)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n")
                await self._send_events(stream_events(request, script), script, record, closed, writer)
            else:
                record.status = 200
                record.answer = dict(script.answer, finish_reason=script.finish_reason)
                await send_json(writer, 200, completion(request, script), record=record)
        except ConnectionError:
            record.outcome = "client_closed"
        finally:
            if not closed.done():
                closed.cancel()
            self._touch()
        # keep the connection only when the exchange ended cleanly and the watcher
        # read nothing (a byte it read would be lost)
        return record.outcome in ("done", "error", "truncated") and not closed.done()

    async def _send_events(self, events, script, record, closed, writer) -> None:
        started = time.monotonic()
        for n, event in enumerate(events):
            if script.error_after is not None and n == script.error_after[0]:
                event = orjson.dumps(error_body(script.error_after[1]))
                record.outcome = "error"
            elif script.break_after is not None and n == script.break_after:
                await writer.drain()
                writer.transport.abort()
                record.outcome = "broken"
                return
            elif script.truncate_after is not None and n == script.truncate_after:
                record.outcome = "truncated"
                break
            elif script.stall_after is not None and n == script.stall_after:
                await writer.drain()
                await closed  # until the client gives up
            if script.slow:
                await asyncio.wait([closed], timeout=script.slow)
            if script.rate and (due := started + n / script.rate - time.monotonic()) > 0:
                await writer.drain()
                await asyncio.wait([closed], timeout=due)
            if closed.done():
                record.outcome = "client_closed"
                return
            data = b"data: " + event + b"\n\n"
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            record.chunks_sent += 1
            if len(record.response) < self.keep_response:
                record.response += data
            if record.outcome == "error":
                break
            if n % 32 == 0 or script.slow:
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        if record.outcome == "open":
            record.outcome = "done"


def stream_events(request: dict, script: Script) -> list[bytes]:
    """The `data:` payloads of a streamed answer, as OpenAI sends them."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": request["model"], "service_tier": "default",
            "system_fingerprint": "fp_fake"}
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    tail = {"usage": None} if include_usage else {}  # with include_usage every chunk says usage: null

    def chunk(delta, finish=None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({**base, "choices": [choice], **tail})

    events = [chunk(script.role_delta)] + [chunk(d) for d in script.deltas] + [chunk({}, script.finish_reason)]
    if include_usage:
        events.append(orjson.dumps({**base, "choices": [], "usage": usage(request, script)}))
    events.append(b"[DONE]")
    return events


def _zip_longest(streams):
    for i in range(max(len(s) for s in streams)):
        yield [s[i] for s in streams if i < len(s)]


def example_arguments(name: str, schema: dict | None) -> dict:
    known = {"weather": {"city": "Paris", "unit": "celsius"}, "get_weather": {"city": "Paris", "unit": "celsius"},
             "time": {"timezone": "Europe/Paris"}, "get_time": {"timezone": "Europe/Paris"}}
    props = (schema or {}).get("properties")
    if not props:
        return known.get(name, {"query": f"{name} example"})
    examples = {"string": "example", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    out = {}
    for prop, spec in props.items():
        spec = spec or {}
        out[prop] = spec["enum"][0] if spec.get("enum") else examples.get(spec.get("type"), "example")
    return out


def answer_from_results(messages: list[dict], results: list[dict]) -> str:
    names = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            names[call.get("id")] = (call.get("function") or {}).get("name", "tool")
    parts = [f"{names.get(r.get('tool_call_id'), 'tool')} returned {text_of(r.get('content'))}" for r in results]
    return "Here is what the tools said: " + "; ".join(parts) + "."


def usage(request: dict, script: Script) -> dict:
    prompt = sum(len(text_of(m.get("content")).split()) + 4 for m in request["messages"])
    reasoning = sum(1 for d in script.deltas if "reasoning_content" in d or "reasoning" in d)
    completion_tokens = len(script.deltas)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def completion(request: dict, script: Script) -> dict:
    message = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    message.update(script.answer)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion", "created": int(time.time()),
            "model": request["model"], "choices": [{"index": 0, "message": message, "logprobs": None,
                                                   "finish_reason": script.finish_reason}],
            "usage": usage(request, script), "service_tier": "default", "system_fingerprint": "fp_fake"}


# --- validation: OpenAI's 400s for what a runner could get wrong ---------------

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def validate(body: bytes) -> dict:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                         "using your HTTP library correctly. The OpenAI API expects a JSON payload.)") from None
    if not isinstance(request, dict):
        raise BadRequest(f"{text_of(request)[:80]} is not of type 'object'")
    if not isinstance(request.get("model"), str):
        raise BadRequest("you must provide a model parameter", "model")
    messages = request.get("messages")
    if messages is None:
        raise BadRequest("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages")
    if request.get("stream_options") is not None and not request.get("stream"):
        raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    if request.get("n", 1) != 1:
        raise BadRequest("The fake upstream answers n=1 only.", "n")
    open_calls: list[str] = []  # tool calls of the last assistant message still unanswered
    opened_at = None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise BadRequest(f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', "
                             "'function', 'tool', and 'developer'.", f"messages[{i}].role")
        if role == "tool":
            if m.get("tool_call_id") not in open_calls:
                raise BadRequest("Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                 "message with 'tool_calls'.", f"messages.[{i}].role")
            open_calls.remove(m["tool_call_id"])
            continue
        if open_calls:
            break
        if role == "assistant" and m.get("tool_calls") == []:
            raise BadRequest(f"Invalid 'messages[{i}].tool_calls': empty array. Expected an array with minimum "
                             "length 1, but got an empty array instead.", f"messages[{i}].tool_calls")
        if role == "assistant" and m.get("content") is None and not m.get("tool_calls"):
            raise BadRequest("Invalid value for 'content': expected a string, got null.", f"messages.[{i}].content")
        if role == "assistant" and m.get("tool_calls"):
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") or {}
                if not call.get("id") or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
                    raise BadRequest("Invalid tool call: each needs 'id', 'function.name' and 'function.arguments' "
                                     "(a string).", f"messages.[{i}].tool_calls.[{j}]")
            open_calls, opened_at = [c["id"] for c in m["tool_calls"]], i
        elif role in ("user", "system", "developer") and m.get("content") is None:
            raise BadRequest("Invalid value for 'content': expected a string, got null.", f"messages.[{i}].content")
    if open_calls:
        raise BadRequest("An assistant message with 'tool_calls' must be followed by tool messages responding to "
                         "each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                         + ", ".join(open_calls), f"messages.[{opened_at}].role")
    return request


# --- HTTP plumbing ---------------------------------------------------------------

async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            body = body[:-2]
            if size == 0:
                return body
    length = int(headers.get("content-length") or 0)
    if length > MAX_BODY:
        raise ConnectionError("body too large")
    return await reader.readexactly(length) if length else b""


async def send_json(writer, status: int, payload: dict, headers: dict | None = None,
                    record: Received | None = None) -> bool:
    data = orjson.dumps(payload)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write((f"HTTP/1.1 {status} {REASONS.get(status, 'OK' if status < 300 else 'Error')}\r\n"
                  f"content-type: application/json\r\ncontent-length: {len(data)}\r\n{extra}\r\n").encode() + data)
    if record is not None:
        record.response = data
        if record.outcome == "open":
            record.outcome = "done"
    await writer.drain()
    return True


async def start(host: str = "127.0.0.1", port: int = 0):
    """Start one on the running loop: returns (base url, async stop)."""
    fake = FakeUpstream()
    url = await fake.start(host, port)
    return url, fake.stop


def serve(host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve until interrupted (the `chatlog fake-upstream` command)."""

    async def run() -> None:
        fake = FakeUpstream()
        url = await fake.start(host, port)
        print(f"fake upstream at {url} (CHATLOG_UPSTREAM_BASE_URL={url}, any API key)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatlog fake-upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
