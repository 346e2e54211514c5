"""Logs of real `chatlog serve` processes: with CHATLOG_LOG_FORMAT=json every
line is one JSON object (chatlog's and uvicorn's alike), each request has one
access line carrying the request id the client sent (echoed in X-Request-Id)
or a new one, its principal, route template, status, latency and size; and no
API key or stream token appears in any line, in either format."""

from __future__ import annotations

import logging
import re
import uuid

import orjson

from api.logs import JsonFormatter, TextFormatter
from tests.servers import KEYS, ChatlogServer

pytest_plugins = ("tests.servers",)

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def user(content: str) -> dict:
    return {"type": "message.user", "data": {"content": content}}


async def exercise(server: ChatlogServer) -> tuple[dict[str, str], dict[str, str]]:
    """Requests that put credentials on the wire: ({what: request id}, {what: secret})."""
    ids = {}
    async with server.client() as alice, server.client(principal=None) as anonymous:
        r = await alice.post("/v1/conversations", json={"metadata": {"note": "hi"}},
                             headers={"X-Request-Id": "client-req-42"})
        assert r.status_code == 201, r.text
        assert r.headers["x-request-id"] == "client-req-42"
        ids["create"] = "client-req-42"
        cid = r.json()["id"]
        # the append's hot path (api/hot_path.py) gets an access line and the id too
        r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": [user("hello")]},
                             headers={"X-Request-Id": "append-1"})
        assert r.status_code == 201 and r.headers["x-request-id"] == "append-1", r.text
        ids["append"] = "append-1"
        # an id that is not sane (spaces; too long) is replaced by a new one
        r = await alice.get(f"/v1/conversations/{cid}", headers={"X-Request-Id": "no spaces allowed"})
        assert r.status_code == 200 and GENERATED_ID.fullmatch(r.headers["x-request-id"]), r.headers
        ids["insane"] = r.headers["x-request-id"]
        r = await alice.get(f"/v1/conversations/{cid}", headers={"X-Request-Id": "x" * 129})
        assert GENERATED_ID.fullmatch(r.headers["x-request-id"]), r.headers
        # none sent: one is made
        r = await alice.get("/v1/conversations")
        assert GENERATED_ID.fullmatch(r.headers["x-request-id"])
        ids["list"] = r.headers["x-request-id"]
        token = (await alice.post(f"/v1/conversations/{cid}/stream-token")).json()["token"]
        r = await anonymous.get(f"/v1/conversations/{cid}/stream", params={"token": token, "follow": "false"},
                                headers={"X-Request-Id": "stream-1"})
        assert r.status_code == 200, r.text
        ids["stream"] = "stream-1"
        r = await anonymous.get(f"/v1/conversations/{cid}/stream?%74oken={token}x&follow=false")
        assert r.status_code == 401
        r = await anonymous.get("/v1/conversations", headers={"Authorization": "Bearer wrong-key-123",
                                                              "X-Request-Id": "wrong-key"})
        assert r.status_code == 401
        ids["wrong"] = "wrong-key"
        r = await anonymous.get("/v1/conversations", headers={"Authorization": f"Basic {KEYS['bob']}"})
        assert r.status_code == 401
    secrets = {"alice key": KEYS["alice"], "bob key": KEYS["bob"], "wrong key": "wrong-key-123", "token": token,
               "token signature": token.split(".")[1]}
    return ids, secrets


def server_lines(server: ChatlogServer) -> list[str]:
    # the harness writes a "==== name: chatlog serve ..." header before each start
    return [line for line in server.log_text().splitlines() if line.strip() and not line.startswith("==== ")]


async def test_json_logs_one_object_a_line_with_the_request_id_and_no_credentials(start_server):
    server = await start_server("json-logs", CHATLOG_LOG_FORMAT="json")
    ids, secrets = await exercise(server)
    await server.stop()  # shutdown's lines too

    lines = server_lines(server)
    records = [orjson.loads(line) for line in lines]  # every line parses
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    loggers = {r["logger"] for r in records}
    assert "uvicorn.error" in loggers and "chatlog.access" in loggers, loggers  # uvicorn's lines are JSON too
    assert not [r for r in records if r["logger"] == "uvicorn.access"], "uvicorn's own access line is replaced"

    access = {r["request_id"]: r for r in records if r["logger"] == "chatlog.access"}
    create = access[ids["create"]]
    assert create["principal"].startswith("alice") and create["method"] == "POST"
    assert create["route"] == "/v1/conversations" and create["status"] == 201
    assert create["latency_ms"] >= 0 and create["bytes"] > 0
    append = access[ids["append"]]
    assert append["route"] == "/v1/conversations/{conversation_id}/events" and append["status"] == 201
    assert access[ids["insane"]]["route"] == "/v1/conversations/{conversation_id}"
    assert access[ids["list"]]["status"] == 200
    stream = access[ids["stream"]]
    assert stream["principal"] == "alice", stream  # from the stream token
    assert stream["route"] == "/v1/conversations/{conversation_id}/stream"
    assert "token=[redacted]" in stream["path"]
    wrong = access[ids["wrong"]]
    assert wrong["status"] == 401 and wrong["principal"] is None

    for name, value in secrets.items():
        leaked = [line for line in lines if value in line]
        assert not leaked, f"the {name} is in the log: {leaked[:3]}"


async def test_text_access_line_carries_the_request_id_and_no_credentials(start_server):
    server = await start_server("text-logs")  # the default format
    ids, secrets = await exercise(server)
    await server.stop()

    lines = server_lines(server)
    access = [line for line in lines if " chatlog.access: " in line]
    create = [line for line in access if f"request_id={ids['create']}" in line]
    assert len(create) == 1, access
    assert '"POST /v1/conversations HTTP/1.1" 201 /v1/conversations ' in create[0]
    assert "principal=alice" in create[0]
    assert [line for line in access if f"request_id={ids['append']}" in line]
    assert any("token=[redacted]" in line for line in access)
    for name, value in secrets.items():
        leaked = [line for line in lines if value in line]
        assert not leaked, f"the {name} is in the log: {leaked[:3]}"


def test_formatters_redact_keys_bearer_and_tokens_whatever_logs_them(monkeypatch):
    key = f"k-{uuid.uuid4().hex}"
    monkeypatch.setenv("CHATLOG_API_KEYS", f"{key}=alice")
    message = (f"a handler logged {key} and 'Authorization: Bearer {key}x' and "
               "GET /v1/conversations/c/stream?follow=1&%74oken=abc.def and ?token=ghi.jkl")
    record = logging.LogRecord("chatlog.test", logging.WARNING, __file__, 1, message, None, None)
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        for secret in (key, "abc.def", "ghi.jkl"):
            assert secret not in line, (formatter, line)
        assert "[redacted]" in line
    parsed = orjson.loads(JsonFormatter().format(record))
    assert parsed["level"] == "warning" and parsed["logger"] == "chatlog.test"
