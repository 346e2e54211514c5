"""Fuzz the API against its own OpenAPI document (schemathesis 4, in process).

The app runs on the session's real PostgreSQL through the `store` fixture, on
the test's event loop. Schemathesis is synchronous and drives ASGI apps from
an event loop of its own (a thread), so it is given `OnLoop`: an ASGI app that
runs each request on the test's loop, where the store lives, and records what
each request did to the database.

Every phase runs (examples, coverage, fuzzing, stateful with the document's
links) with schemathesis' standard checks plus one of ours (errors in the
contract's shape); afterwards: no 5xx at all, and no rejected request (4xx)
wrote anything (events and conversations rows, counted around each request).

Streams that follow (`follow=true`, an open turn's stream) never end: their
reads are bounded by a short request timeout on the two stream operations
(schemathesis keeps the frames read by then and checks them).

Budget: CHATLOG_FUZZ_EXAMPLES examples per operation and phase (default 10,
about half a minute); raise it for a longer campaign, e.g.
`CHATLOG_FUZZ_EXAMPLES=200 pytest tests/test_schemathesis.py -s`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from dataclasses import dataclass, field

import orjson
import schemathesis
from schemathesis import engine
from schemathesis.engine import events

from api.app import create_app
from api.settings import Settings
from tests.helpers import TURN, append, asgi_client, bearer, new_conversation

EXAMPLES = int(os.environ.get("CHATLOG_FUZZ_EXAMPLES", "10"))
STREAM_READ_SECONDS = 0.5  # also the time a stream has to start answering
UNFUZZED = ("start_turn", "ai_sdk_chat")  # they start turns: see fuzz()


@dataclass
class Exchange:
    method: str
    path: str
    status: int | None = None
    wrote: bool = False
    cut: bool = False


class OnLoop:
    """An ASGI app that runs `app` on `loop` (where its asyncpg pool lives),
    whatever loop calls it, and notes each request's status and whether the
    database changed while it ran."""

    def __init__(self, app, loop: asyncio.AbstractEventLoop, store, principal: str) -> None:
        self.app, self.loop, self.store, self.principal = app, loop, store, principal
        self.exchanges: list[Exchange] = []

    async def _there(self, coroutine):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def fingerprint(self) -> tuple:
        # the fuzzing key's principal's rows: all a request with that key can write (its tenant
        # isolation is tests/test_tenants_sealed.py's), read through its indexes, so the check
        # costs the same however much the rest of the session wrote (it runs inside each
        # request's time limit)
        return tuple(await self.store.pool.fetchrow(
            "SELECT (SELECT count(*) FROM events WHERE principal = $1),"
            "       (SELECT coalesce(max(position), 0) FROM events WHERE principal = $1),"
            "       (SELECT count(*) FROM conversations WHERE principal = $1),"
            "       (SELECT max(updated_at) FROM conversations WHERE principal = $1)", self.principal))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the store is the fixture's: nothing to start or stop
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        here = asyncio.get_running_loop()
        exchange = Exchange(scope["method"], scope["path"])
        self.exchanges.append(exchange)

        async def receive_here():
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(receive(), here))

        async def send_here(message):
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(message), here))

        before = await self._there(self.fingerprint())
        call = asyncio.run_coroutine_threadsafe(self.app(scope, receive_here, send_here), self.loop)
        try:
            await asyncio.wrap_future(call)
        except asyncio.CancelledError:  # a stream cut at its read deadline (streams write nothing)
            call.cancel()
            exchange.cut = True
            raise
        exchange.wrote = await self._there(self.fingerprint()) != before


_CODE = re.compile(r"^[a-z][a-z0-9_]*$")


@schemathesis.check
def errors_in_the_contract_shape(ctx, response, case):
    """Every 4xx/5xx body is {"error": {"code", "message", "details"?}}, whatever its status."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), "an error is not JSON"
    body = orjson.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, f"not the contract's error shape: {body!r}"
    error = body["error"]
    assert set(error) <= {"code", "message", "details"} and {"code", "message"} <= set(error), error
    assert isinstance(error["code"], str) and _CODE.match(error["code"]), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error.get("details", {}), dict), error
    return None


@dataclass
class Run:
    cases: int = 0
    by_phase: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# schemathesis' defaults, plus 410: once a conversation is erased (DELETE, which the stateful phase
# reaches through the links), every operation on it answers 410 conversation_erased, whatever the data
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "410", "415", "422", "428", "429", "5xx"]


def config(key: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {key}"},
        "workers": 1,  # one request at a time: the write check counts rows around each
        "request-timeout": 10,
        "max-stream-events": 5,  # the seeded conversation has more frames: its streams end at once
        "generation": {"max-examples": EXAMPLES},
        "phases": {"stateful": {"max-steps": max(10, EXAMPLES * 2)}},
        "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED},
                   "negative_data_rejection": {"expected-statuses": REJECTED}},
        "operations": [
            # following streams never end: read them for a bounded time
            {"include-operation-id": ["stream", "turn_stream"], "request-timeout": STREAM_READ_SECONDS},
            # the examples and coverage phases hand DELETE the conversations the other operations'
            # cases use (ids taken from earlier answers): erased early, the rest of those phases
            # would meet only 410s. DELETE is fuzzed, and reached by every stateful link instead.
            {"include-operation-id": ["delete_conversation"],
             "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}}},
            # schema-valid but refused by the conversation's state (422): at_seq past its seq, a
            # domain rule of the event log (no open turn, unknown tool call, ...), at_seq with at_time
            {"include-operation-id": ["fork", "messages", "append_events"],
             "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "409", "410", "422"]},
                        "negative_data_rejection": {"expected-statuses": REJECTED}}},
        ],
    })


def with_examples(spec: dict, examples: dict[str, str]) -> None:
    """Give path parameters an example (the examples phase starts from them):
    a real conversation and turn, so the turn stream is reached too (a
    generated batch rarely starts a turn that obeys every rule)."""
    for item in spec["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["name"] in examples:
                    param["example"] = examples[param["name"]]


def fuzz(app: OnLoop, key: str, examples: dict[str, str]) -> Run:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config(key))
    schema.validate()  # the served document is valid OpenAPI
    # POST /turns (and /ai-sdk/chat) starts work that writes after its answer, which the "rejections write
    # nothing" fingerprint cannot tell apart (the runner's own tests cover it: test_runner_*)
    schema = schema.exclude(operation_id=list(UNFUZZED))
    with_examples(schema.raw_schema, examples)
    run = Run()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            run.cases += len(event.recorder.cases)
            run.by_phase[event.phase.value] += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures.append(f"{event.recorder.label}: {check.name}: {failure.title}\n"
                                            f"{failure.message}\n{check.failure_info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            run.errors.append(repr(getattr(event, "value", None) or getattr(event, "exception", None)))
    return run


async def test_the_api_answers_its_own_spec_never_with_a_5xx_and_rejections_write_nothing(store, principal):
    key = f"fuzz-{principal}"
    app = create_app(Settings(database_url=None, api_keys=f"{key}=fuzz-{principal}", heartbeat_seconds=0.05),
                     store=store)
    on_loop = OnLoop(app, asyncio.get_running_loop(), store, f"fuzz-{principal}")
    async with asgi_client(app, bearer(key)) as client:
        cid = await new_conversation(client)
        await append(client, cid, TURN)
    run = await asyncio.to_thread(fuzz, on_loop, key, {"conversation_id": cid, "turn_id": "t1"})

    exchanges = on_loop.exchanges
    statuses = collections.Counter(e.status for e in exchanges)
    print(f"\nschemathesis: {run.cases} cases ({dict(run.by_phase)}), {len(exchanges)} requests, "
          f"statuses {dict(sorted(statuses.items(), key=lambda kv: kv[0] or 0))}, "
          f"{len(run.failures)} failures, {len(run.errors)} errors")
    for failure in run.failures:
        print(failure)
    assert not run.errors, "\n".join(run.errors)
    assert not run.failures, "\n\n".join(run.failures[:10])
    assert not [e for e in exchanges if e.status is None or e.status >= 500]
    writes_on_rejection = [e for e in exchanges if e.status is not None and 400 <= e.status < 500 and e.wrote]
    assert not writes_on_rejection, writes_on_rejection[:10]
    # it really ran: every phase, and every operation answered at least once with a success
    assert all(run.by_phase[phase] > 0 for phase in ("coverage", "fuzzing", "stateful")), run.by_phase
    succeeded = {(e.method, _template(e.path)) for e in exchanges if e.status is not None and e.status < 300}
    operations = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method, op in item.items()
                  if op.get("operationId") not in UNFUZZED}
    assert operations <= succeeded, f"never answered with a success: {sorted(operations - succeeded)}"


def _template(path: str) -> str:
    """/v1/conversations/<uuid>/events -> /v1/conversations/{conversation_id}/events (and the same for chat ids)"""
    parts = path.split("/")
    if len(parts) > 3 and parts[1:3] == ["v1", "conversations"]:
        parts[3] = "{conversation_id}"
        if len(parts) > 5 and parts[4] == "turns":
            parts[5] = "{turn_id}"
    if len(parts) > 4 and parts[1:4] == ["v1", "ai-sdk", "chat"]:
        parts[4] = "{chat_id}"
    return "/".join(parts)
