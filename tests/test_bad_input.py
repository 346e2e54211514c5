"""Bad input never reaches a 500: what a fuzzer will not find alone.

Every case: an answer below 500, in the contract's error shape, and nothing
written (the rows of this test's principals are counted around the request).
Requests that could stream forever if a refusal regressed are bounded by a
deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from api.app import create_app
from api.deps import MAX_JSON_DEPTH
from api.bodies import MAX_SEQ
from api.errors import allowed_methods
from api.openapi import http_routes
from api.settings import Settings
from api.sse import RESUME_PATTERN
from tests.helpers import TURN, append, asgi_client, assert_contract_error, bearer, new_conversation

DEADLINE = 10  # seconds; no answer here may take longer
BODY_LIMIT = 1 << 20  # max_body_bytes of these tests' app
MSG = {"type": "message.user", "data": {"content": "fine"}}


# -- helpers ---------------------------------------------------------------------

async def raw(app, method: str, path: str, *, query: bytes = b"", headers: list | None = None,
              body: bytes = b"") -> httpx.Response:
    """One request straight into the ASGI app, for what an HTTP client will not
    send: a path holding a lone surrogate (a server decoding with
    surrogateescape), raw header bytes."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogatepass"),
             "root_path": "", "query_string": query, "client": ("127.0.0.1", 1), "server": ("chatlog", 80),
             "headers": [(b"host", b"chatlog"), *(headers or [])]}
    if not any(name == b"content-length" for name, _ in scope["headers"]):
        scope["headers"].append((b"content-length", str(len(body)).encode()))
    sent, messages = False, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(DEADLINE)
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    await asyncio.wait_for(app(scope, receive, send), DEADLINE)
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return httpx.Response(start["status"], headers=start["headers"], content=content)


def nested(depth: int, leaf: Any = 1) -> Any:
    """A JSON value `depth` levels deep (alternating lists and objects)."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def deep_json(depth: int) -> bytes:
    """Raw JSON `depth` levels deep, beyond what orjson.dumps could write."""
    return b"[" * depth + b"1" + b"]" * depth


# -- fixtures --------------------------------------------------------------------

@pytest.fixture
def app(store, api_keys):
    return create_app(Settings(database_url=None, api_keys=api_keys, max_body_bytes=BODY_LIMIT,
                               heartbeat_seconds=0.05), store=store)


@pytest.fixture
async def alice(app, keys):
    async with asgi_client(app, bearer(keys["alice"])) as client:
        yield client


@pytest.fixture
async def anonymous(app):
    async with asgi_client(app) as client:
        yield client


@pytest.fixture
async def cid(alice) -> str:
    """Alice's conversation with a finished turn t1 (and a tool call)."""
    cid = await new_conversation(alice)
    await append(alice, cid, TURN)
    return cid


# -- the document says which parameters are integers ---------------------------------

SPEC = create_app(Settings(database_url=None, api_keys="k=p")).openapi()


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _is_integer(schema: dict) -> bool:
    options = schema.get("anyOf", [schema])
    return any(o.get("type") == "integer" for o in options) or schema.get("pattern") == RESUME_PATTERN


def _maximum(schema: dict) -> int:
    """The largest value the parameter takes (a seq's, for the seq-valued strings)."""
    if schema.get("pattern") == RESUME_PATTERN:
        return MAX_SEQ
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") == "integer"]
    return min((o["maximum"] for o in options if "maximum" in o), default=2**63 - 1)


def integer_inputs():
    """Every integer an operation takes (query, header, top-level body field),
    and the seq-valued strings (`after` of the streams, Last-Event-ID), with
    the largest value each takes."""
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                if param["in"] in ("query", "header") and _is_integer(param["schema"]):
                    yield pytest.param(method, path, param["in"], param["name"], _maximum(param["schema"]),
                                       id=f"{method.upper()} {path} {param['in']} {param['name']}")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            for name, schema in _resolve(body or {}).get("properties", {}).items():
                if _is_integer(schema):
                    yield pytest.param(method, path, "body", name, _maximum(schema),
                                       id=f"{method.upper()} {path} body {name}")


INTEGER_INPUTS = list(integer_inputs())


def test_the_document_names_the_integer_parameters_these_tests_cover():
    names = {(p.values[2], p.values[3]) for p in INTEGER_INPUTS}
    assert all(p.values[4] > 0 for p in INTEGER_INPUTS)
    assert {("query", "after"), ("query", "limit"), ("query", "after_position"), ("query", "at_seq"),
            ("header", "last-event-id"), ("body", "expected_seq"), ("body", "at_seq")} <= names


def _fill(path: str, cid: str) -> str:
    return path.replace("{conversation_id}", cid).replace("{turn_id}", "t1")


async def _send_integer(client, method, path, where, name, value: int | str):
    query, headers, content = {}, {}, None
    if "/stream" in path:
        query["follow"] = "false"  # not what is tested; a regression must not stream forever
    if where == "query":
        query[name] = str(value)
    elif where == "header":
        headers[name] = str(value)
    else:
        base = {"events": [MSG]} if path.endswith("/events") else {}
        text = orjson.dumps({**base, name: 0}).replace(f'"{name}":0'.encode(), f'"{name}":{value}'.encode())
        content, headers["content-type"] = text, "application/json"
    return await client.request(method.upper(), path, params=query, headers=headers, content=content)


@pytest.mark.parametrize("method, path, where, name, maximum", INTEGER_INPUTS)
@pytest.mark.parametrize("value", [-1, "maximum + 1", 2**64, "9" * 5000], ids=["-1", "max+1", "2^64", "5000digits"])
async def test_integers_out_of_range_anywhere_are_refused_not_500(alice, ledger, cid, method, path, where, name,
                                                                  maximum, value):
    value = maximum + 1 if value == "maximum + 1" else value
    request = _send_integer(alice, method, _fill(path, cid), where, name, value)
    if where == "body" and isinstance(value, str):  # past any float: orjson cannot read the number
        await ledger.refused(request, 400, "malformed_json")
    else:
        await ledger.refused(request, 422, ("invalid_request", "out_of_range"))


@pytest.mark.parametrize("follow", ["true", "false"])
@pytest.mark.parametrize("format", ["events", "ui"])
async def test_a_resume_point_past_a_32_bit_seq_is_422_before_any_stream_starts(alice, ledger, cid, follow, format):
    for after in ("2147483648", "2147483648:0", "1:2147483648", "9" * 4301):
        params = {"after": after, "format": format, "follow": follow}
        error = await ledger.refused(alice.get(f"/v1/conversations/{cid}/stream", params=params),
                                     422, "invalid_request")
        assert "after" in error["message"]
        error = await ledger.refused(alice.get(f"/v1/conversations/{cid}/stream", params={"format": format},
                                               headers={"Last-Event-ID": after}), 422, "invalid_request")
        assert "Last-Event-ID" in error["message"]
    # the largest seq is a valid resume point: nothing after it
    r = await asyncio.wait_for(alice.get(f"/v1/conversations/{cid}/stream",
                                         params={"after": "2147483647", "format": format, "follow": "false"}),
                               DEADLINE)
    assert r.status_code == 200 and "data:" not in r.text


async def test_the_largest_seq_and_position_read_as_empty_pages(alice, cid):
    page = (await alice.get(f"/v1/conversations/{cid}/events", params={"after": 2**31 - 1})).json()
    assert page == {"events": [], "last_seq": 2**31 - 1, "has_more": False}
    feed = (await alice.get("/v1/events", params={"after_position": 2**63 - 1})).json()
    assert feed == {"events": [], "last_position": 2**63 - 1, "has_more": False}


# -- NUL, which PostgreSQL text cannot hold ----------------------------------------------

NUL_BODIES = [
    ("POST", "/v1/conversations", {"system": "be\u0000brief"}, "invalid_request", "system"),
    ("POST", "/v1/conversations", {"metadata": {"k\u0000": 1}}, "invalid_request", "metadata.k\\u0000"),
    ("POST", "/v1/conversations", {"metadata": {"k": "v\u0000"}}, "invalid_request", "metadata.k"),
    ("POST", "/v1/conversations", {"metadata": {"k": [{"deep": ["\u0000"]}]}}, "invalid_request", "metadata.k.0.deep.0"),
    ("POST", "/v1/conversations", {"id": "\u0000"}, "invalid_request", "id"),
    ("POST", "{cid}/fork", {"at_seq": 2, "metadata": {"\u0000": "v"}}, "invalid_request", "metadata.\\u0000"),
    ("POST", "{cid}/fork", {"at_seq": 2, "metadata": {"k": "\u0000"}}, "invalid_request", "metadata.k"),
    ("POST", "{cid}/fork", {"at_seq": 2, "id": "\u0000"}, "invalid_request", "id"),
]


@pytest.mark.parametrize("method, path, body, code, field", NUL_BODIES)
async def test_nul_outside_event_data_is_422_naming_the_field(alice, ledger, cid, method, path, body, code, field):
    url = path.replace("{cid}", f"/v1/conversations/{cid}")
    error = await ledger.refused(alice.request(method, url, json=body), 422, code)
    assert field in error["message"] or error.get("details", {}).get("field") == field, error


@pytest.mark.parametrize("event, rule", [
    ({"id": "e\u00001", **MSG}, "no_nul"),
    ({"type": "message.user", "data": {"content": "x", "name": "\u0000"}}, "no_nul"),
    ({"type": "message.user", "data": {"content": [{"type": "text", "text": "a", "\u0000": 1}]}}, "no_nul"),
    ({"type": "message.user\u0000", "data": {"content": "x"}}, "known_type"),
])
async def test_nul_in_an_event_is_invalid_event_with_its_index(alice, ledger, cid, event, rule):
    error = await ledger.refused(alice.post(f"/v1/conversations/{cid}/events", json={"events": [MSG, event]}),
                                 422, "invalid_event")
    assert error["details"]["index"] == 1 and error["details"]["rule"] == rule


async def test_nul_in_paths_query_parameters_and_headers_is_refused(alice, anonymous, ledger, cid):
    c = f"/v1/conversations/{cid}"
    await ledger.refused(alice.get("/v1/conversations/%00"), 404, "not_found")
    await ledger.refused(alice.get(f"{c}/turns/t%001/stream"), 404, "not_found")
    await ledger.refused(alice.get(f"{c}/turns/%00/stream", params={"format": "ui"}), 404, "not_found")
    await ledger.refused(alice.get("/v1/conversations", params={"before": "\u0000"}), 422, "invalid_request")
    await ledger.refused(alice.get(f"{c}/messages", params={"at_time": "2026-01-01T00:00:00\u0000Z"}),
                         422, "invalid_request")
    await ledger.refused(alice.get(f"{c}/messages", params={"format": "\u0000"}), 422, "invalid_request")
    await ledger.refused(alice.get(f"{c}/events", params={"after": "1\u0000"}), 422, "invalid_request")
    await ledger.refused(alice.get(f"{c}/stream", params={"after": "1\u0000", "follow": "false"}),
                         422, "invalid_request")
    await ledger.refused(alice.get(f"{c}/stream", headers={"Last-Event-ID": "1\u0000"}), 422, "invalid_request")
    await ledger.refused(anonymous.get(f"{c}/stream", params={"token": "a\u0000.b"}), 401, "unauthorized")
    await ledger.refused(anonymous.get("/v1/events", headers={"Authorization": "Bearer \u0000"}), 401, "unauthorized")


# -- lone surrogates ----------------------------------------------------------------------

SURROGATE_BODIES = [
    ("/v1/conversations", b'{"system": "\\ud800"}'),
    ("/v1/conversations", b'{"metadata": {"\\udc00": 1}}'),
    ("/v1/conversations", b'{"metadata": {"k": ["\\ud800x"]}}'),
    ("/v1/conversations", b'{"id": "\\ud800"}'),
    ("{cid}/events", b'{"events": [{"id": "\\ud800", "type": "message.user", "data": {"content": "x"}}]}'),
    ("{cid}/events", b'{"events": [{"type": "message.user", "data": {"content": "\\udfff"}}]}'),
    ("{cid}/events", b'{"events": [{"type": "message.user\\ud800", "data": {"content": "x"}}]}'),
    ("{cid}/fork", b'{"at_seq": 2, "metadata": {"\\ud800": "v"}}'),
]


@pytest.mark.parametrize("path, body", SURROGATE_BODIES)
async def test_lone_surrogates_in_json_are_refused_as_unreadable_json(alice, ledger, cid, path, body):
    url = path.replace("{cid}", f"/v1/conversations/{cid}")
    error = await ledger.refused(alice.post(url, content=body, headers={"content-type": "application/json"}),
                                 400, "malformed_json")
    assert "surrogate" in error["message"]


async def test_lone_surrogates_in_paths_query_parameters_and_headers_are_refused(app, alice, ledger, cid, keys):
    c = f"/v1/conversations/{cid}"
    auth = (b"authorization", f"Bearer {keys['alice']}".encode())
    # percent-encoded (what clients send: servers decode it with replacement characters)
    await ledger.refused(alice.get("/v1/conversations/%ED%A0%80"), 404, "not_found")
    await ledger.refused(alice.get(f"{c}/turns/%ED%A0%80/stream"), 404, "not_found")
    for query in (f"/v1/conversations?before=%ED%A0%80", f"{c}/events?after=%ED%A0%80",
                  f"{c}/messages?at_time=%ED%A0%80", f"{c}/stream?after=%ED%A0%80&follow=false"):
        await ledger.refused(alice.get(query), 422, "invalid_request")
    # as str in the ASGI scope (a server decoding paths with surrogateescape)
    await ledger.refused(raw(app, "GET", "/v1/conversations/\udc80", headers=[auth]), 404, "not_found")
    await ledger.refused(raw(app, "GET", f"{c}/turns/\udc80/stream", headers=[auth]), 404, "not_found")
    await ledger.refused(raw(app, "GET", f"{c}/turns/t\ud800/stream", headers=[auth]), 404, "not_found")
    # raw bytes in headers (read as latin-1, as HTTP says)
    for value in (b"\xed\xa0\x80", b"1\xed\xa0\x80", b"\xff"):
        await ledger.refused(raw(app, "GET", f"{c}/stream", headers=[auth, (b"last-event-id", value)]),
                             422, "invalid_request")
        await ledger.refused(raw(app, "GET", "/v1/events", headers=[(b"authorization", b"Bearer " + value)]),
                             401, "unauthorized")
        await ledger.refused(raw(app, "GET", f"{c}/stream", query=b"token=" + value.hex().encode() + b".%ED%A0%80"),
                             401, "unauthorized")


# -- JSON nested deep -----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 255, 1023, 1024, 1025, 5000])
async def test_json_nested_past_the_limit_is_refused_anywhere_in_the_body(alice, ledger, cid, depth):
    """`depth` counts the whole body's levels, the body itself being the first."""
    bodies = [
        ("/v1/conversations", b'{"metadata": {"k": ' + deep_json(depth - 2) + b"}}"),
        (f"/v1/conversations/{cid}/events",
         b'{"events": [{"type": "tool.result", "data": {"tool_call_id": "call_1", "status": "ok", "content": '
         + deep_json(depth - 4) + b"}}]}"),
        (f"/v1/conversations/{cid}/fork", b'{"at_seq": 2, "metadata": {"k": ' + deep_json(depth - 2) + b"}}"),
        ("/v1/conversations", deep_json(depth)),
    ]
    for url, body in bodies:
        error = await ledger.refused(alice.post(url, content=body, headers={"content-type": "application/json"}),
                                     422, "too_deep")
        assert error["details"]["limit"] == MAX_JSON_DEPTH and str(MAX_JSON_DEPTH) in error["message"]


async def test_json_at_the_depth_limit_is_stored_and_read_back_everywhere(alice, cid):
    # body {events: [{data: {content: [part {k: ...}]}}]}: six levels before the part's value
    part = {"type": "text", "text": "deep", "x": nested(MAX_JSON_DEPTH - 6)}
    body = {"events": [{"type": "message.user", "data": {"content": [part]}}]}
    r = await alice.post(f"/v1/conversations/{cid}/events", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["events"][0]["data"]["content"] == [part]
    for url, params in [(f"/v1/conversations/{cid}/events", {"compact": "true"}),
                        (f"/v1/conversations/{cid}/messages", {"format": "openai"}),
                        (f"/v1/conversations/{cid}/messages", {"format": "anthropic"}),
                        (f"/v1/conversations/{cid}/stream", {"follow": "false"}),
                        (f"/v1/conversations/{cid}/stream", {"follow": "false", "format": "ui"}),
                        ("/v1/events", {})]:
        r = await asyncio.wait_for(alice.get(url, params=params), DEADLINE)
        assert r.status_code == 200, (url, params, r.text[:300])
    conversation = {"metadata": {"k": nested(MAX_JSON_DEPTH - 2)}}
    r = await alice.post("/v1/conversations", json=conversation)
    assert r.status_code == 201, r.text
    assert (await alice.get(f"/v1/conversations/{r.json()['id']}")).json()["metadata"] == conversation["metadata"]


# -- stream tokens ----------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["abc.\u00e9", "\u00e9.\u00e9", "\u00e9", ".", "a.", ".b", "a.b.c", "x" * 10_000,
                                   "eyJwIjoiYSJ9.\u2603\u2603", "%74oken", "\U0001f600.\U0001f600"])
async def test_a_garbled_stream_token_is_401_never_500(anonymous, ledger, cid, token):
    for url in (f"/v1/conversations/{cid}/stream", f"/v1/conversations/{cid}/turns/t1/stream"):
        error = await ledger.refused(anonymous.get(url, params={"token": token, "follow": "false"}),
                                     401, "unauthorized")
        assert "token" in error["message"]


# -- times ------------------------------------------------------------------------------------

@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                    "2026-06-30T23:59:60Z", "2026-13-01T00:00:00Z", "2026-01-01T00:00:00",
                                    "123456", "2026-01-01", "0000-01-01T00:00:00Z"])
async def test_times_outside_what_can_be_represented_are_422(alice, ledger, cid, moment):
    await ledger.refused(alice.get(f"/v1/conversations/{cid}/messages", params={"at_time": moment}),
                         422, "invalid_request")
    await ledger.refused(alice.get("/v1/conversations", params={"before": moment}), 422, "invalid_request")


async def test_times_at_the_edges_of_the_range_are_answered(alice, cid):
    r = await alice.get("/v1/conversations", params={"before": "0001-01-01T00:00:00Z"})
    assert r.status_code == 200 and r.json()["conversations"] == []
    r = await alice.get("/v1/conversations", params={"before": "9999-12-31T23:59:59.999999z"})
    assert r.status_code == 200 and cid in [c["id"] for c in r.json()["conversations"]]
    r = await alice.get(f"/v1/conversations/{cid}/messages", params={"at_time": "9999-12-31T23:59:59Z"})
    assert r.status_code == 200 and r.json()["seq"] == 1 + len(TURN)
    r = await alice.get(f"/v1/conversations/{cid}/messages", params={"at_time": "0001-01-01T00:00:00Z"})
    error = assert_contract_error(r, 422, "out_of_range")
    assert error["details"]["current_seq"] == 1 + len(TURN)


# -- resume points --------------------------------------------------------------------------------

@pytest.mark.parametrize("resume", ["9" * 4301, "9" * 20_000, "1:" + "9" * 5000, "-1", "1.5", " 1", "\u0661",
                                    "\u00b2", "0x10", "1:2:3"])
async def test_resume_points_that_are_not_seqs_are_422(alice, ledger, cid, resume):
    for url in (f"/v1/conversations/{cid}/stream", f"/v1/conversations/{cid}/turns/t1/stream"):
        await ledger.refused(alice.get(url, params={"after": resume, "follow": "false"}), 422, "invalid_request")
        if resume.isascii():  # headers carry latin-1 only
            await ledger.refused(alice.get(url, headers={"Last-Event-ID": resume}), 422, "invalid_request")
        # checked even when a good Last-Event-ID makes it moot
        await ledger.refused(alice.get(url, params={"after": resume, "follow": "false"},
                                       headers={"Last-Event-ID": "1"}), 422, "invalid_request")
    if resume.strip() == resume:  # an integer query parameter may be padded, as everywhere in FastAPI
        await ledger.refused(alice.get(f"/v1/conversations/{cid}/events", params={"after": resume}),
                             422, "invalid_request")


# -- methods -------------------------------------------------------------------------------------

PATHS: dict[str, set[str]] = {}
for _path, _methods, _ in http_routes(create_app(Settings(database_url=None, api_keys="k=p"))):
    PATHS.setdefault(_path, set()).update(_methods)


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_a_method_a_path_does_not_have_is_405_with_allow(app, alice, cid, path):
    url = _fill(path, cid)
    allowed = sorted(PATHS[path])
    assert allowed_methods(app, url) == allowed
    for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - PATHS[path]):
        r = await alice.request(method, url)
        assert_contract_error(r, 405, "method_not_allowed")
        assert sorted(m.strip() for m in r.headers["allow"].split(",")) == allowed


# -- strict request bodies --------------------------------------------------------------------------

@pytest.mark.parametrize("body", [{"at_seq": True}, {"at_seq": 2.0}, {"at_seq": "2"}, {"at_seq": [2]},
                                  {"at_seq": 2, "id": 5}, {"at_seq": 2, "metadata": "x"}])
async def test_fork_takes_only_a_real_integer_at_seq(alice, ledger, cid, body):
    await ledger.refused(alice.post(f"/v1/conversations/{cid}/fork", json=body), 422, "invalid_request")


@pytest.mark.parametrize("expected_seq", [True, False, 11.0, "11", [11]])
async def test_expected_seq_must_be_a_real_integer(alice, ledger, cid, expected_seq):
    body = {"expected_seq": expected_seq, "events": [MSG]}
    await ledger.refused(alice.post(f"/v1/conversations/{cid}/events", json=body), 422, "invalid_request")


@pytest.mark.parametrize("body", [{"system": 5}, {"system": True}, {"id": 1}, {"metadata": []}])
async def test_create_takes_no_coerced_values(alice, ledger, body):
    await ledger.refused(alice.post("/v1/conversations", json=body), 422, "invalid_request")


# -- bodies: size, encoding, content type, duplicate keys -----------------------------------------------

BODY_PATHS = ["/v1/conversations", "{cid}/events", "{cid}/fork"]


def _url(path: str, cid: str) -> str:
    return path.replace("{cid}", f"/v1/conversations/{cid}")


class Trickle:
    """A body of `total` bytes sent in chunks (no Content-Length); counts what was read."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.read = total, chunk, 0

    async def __aiter__(self):
        prefix = b'{"system": "'
        self.read += len(prefix)
        yield prefix
        while self.read < self.total:
            self.read += self.chunk
            yield b"x" * self.chunk


@pytest.mark.parametrize("path", BODY_PATHS)
async def test_a_body_of_many_megabytes_is_413_without_being_read_whole(app, alice, anonymous, ledger, cid, path):
    url = _url(path, cid)
    trickle = Trickle(64 * BODY_LIMIT)
    error = await ledger.refused(alice.post(url, content=trickle), 413, "body_too_large")
    assert error["details"]["limit"] == BODY_LIMIT
    assert trickle.read <= BODY_LIMIT + 2 * trickle.chunk, "the server read past the limit"
    declared = await ledger.refused(raw(app, "POST", url, body=b"{}", headers=[
        (b"authorization", alice.headers["authorization"].encode()),
        (b"content-length", str(50 * BODY_LIMIT).encode())]), 413, "body_too_large")
    assert declared["details"]["limit"] == BODY_LIMIT
    # without credentials nothing of the body is read at all
    stranger = Trickle(64 * BODY_LIMIT)
    await ledger.refused(anonymous.post(url, content=stranger), 401, "unauthorized")
    assert stranger.read <= stranger.chunk + 64


@pytest.mark.parametrize("content_length", ["abc", "-1", "1e3", "99999999999999999999999999", "9" * 5000])
async def test_a_garbled_content_length_is_refused(app, ledger, keys, content_length):
    headers = [(b"authorization", f"Bearer {keys['alice']}".encode()), (b"content-length", content_length.encode())]
    await ledger.refused(raw(app, "POST", "/v1/conversations", body=b"{}", headers=headers),
                         (400, 413), ("malformed_request", "body_too_large"))


@pytest.mark.parametrize("path", BODY_PATHS)
@pytest.mark.parametrize("body", [b'{"system": "\xff"}', b"\xff\xfe{}", b'{"system": "\xc0\xaf"}',
                                  b'{"system": "\xed\xa0\x80"}', b'{"sys\x80tem": 1}', b"\xef\xbb\xbf{}"])
async def test_a_body_that_is_not_utf8_is_400(alice, ledger, cid, path, body):
    await ledger.refused(alice.post(_url(path, cid), content=body, headers={"content-type": "application/json"}),
                         400, "malformed_json")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/octet-stream", "garbage"])
async def test_any_content_type_is_read_as_json(alice, ledger, content_type):
    """Decision: the body is JSON whatever Content-Type says (curl -d sends a
    form type); what is not JSON is 400 malformed_json. Never a 500."""
    headers = {} if content_type is None else {"content-type": content_type}
    r = await alice.post("/v1/conversations", content=b'{"system": "typed"}', headers=headers)
    assert r.status_code == 201, r.text
    first = (await alice.get(f"/v1/conversations/{r.json()['id']}/events")).json()["events"][0]
    assert first["data"]["system"] == "typed"
    await ledger.refused(alice.post("/v1/conversations", content=b"system=typed", headers=headers),
                         400, "malformed_json")
    await ledger.refused(alice.post("/v1/conversations", content=b"--x\r\n\r\nsystem\r\n--x--", headers=headers),
                         400, "malformed_json")


async def test_duplicate_keys_take_the_last_value(alice, cid):
    """Decision: as in JavaScript's JSON.parse (and orjson), the last of
    duplicate keys wins, at every level; what is stored is what the answer shows."""
    r = await alice.post("/v1/conversations", content=b'{"system": "first", "system": "last", '
                                                      b'"metadata": {"k": 1, "k": 2}}')
    assert r.status_code == 201, r.text
    new = r.json()["id"]
    assert r.json()["metadata"] == {"k": 2}
    assert (await alice.get(f"/v1/conversations/{new}/events")).json()["events"][0]["data"]["system"] == "last"
    r = await alice.post(f"/v1/conversations/{cid}/events", content=(
        b'{"events": [{"type": "message.user", "data": {"content": "a"}}],'
        b' "events": [{"type": "message.user", "data": {"content": "b", "content": "c"}}]}'))
    assert r.status_code == 201, r.text
    assert [e["data"] for e in r.json()["events"]] == [{"content": "c"}]
    stored = (await alice.get(f"/v1/conversations/{cid}/events", params={"after": r.json()["last_seq"] - 1})).json()
    assert [e["data"] for e in stored["events"]] == [{"content": "c"}]
    # a duplicate that breaks the shape is refused like any other
    error = assert_contract_error(await alice.post(f"/v1/conversations/{cid}/events", content=(
        b'{"events": [{"type": "message.user", "data": {"content": "a", "content": 5}}]}')), 422, "invalid_event")
    assert error["details"]["rule"] == "data_shape"

