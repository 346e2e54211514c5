"""`format=anthropic`: `{"system", "messages"}` the Messages API accepts as is.

Same grouping as format=openai (projections.grouping), translated into content
blocks under the Messages API's own rules, each of which has broken someone's
production history:
- roles strictly alternate starting with `user`: adjacent same-role messages are
  merged into one, blocks concatenated; a history that starts with the
  assistant gets a placeholder user message first (OPENING_USER_TEXT).
- system text has no place among the messages: the conversation's system prompt
  and every message.system, in order, joined with "\n\n", form `system`.
- every `tool_use` is answered by a `tool_result` in the very next user message,
  before anything else in it: tool results open the following user message.
- text blocks must contain non-whitespace text: others are left out, and so is
  a message left with no blocks. Empty tool results become EMPTY_RESULT_TEXT
  (the API refuses empty content for `is_error` results).
- `tool_use.input` must be an object: other JSON arguments become `{"value": ...}`.
- tool ids must match `^[a-zA-Z0-9_-]+$`: other ids are mapped (see _tool_id).
Content is always a list of blocks, also for a single user string.
"""

from __future__ import annotations

import hashlib
import re

import orjson

from projections.grouping import grouped

OPENING_USER_TEXT = "(conversation start)"
EMPTY_RESULT_TEXT = "(no output)"

_VALID_ID = re.compile(r"[a-zA-Z0-9_-]+")
_INVALID_ID_CHAR = re.compile(r"[^a-zA-Z0-9_-]")
_DATA_URL = re.compile(r"data:([^;,]+);base64,(.*)", re.DOTALL)


def render_anthropic(state: dict) -> dict:
    system: list[str] = []
    messages: list[dict] = []
    for entry in grouped(state):
        role = entry[0]
        if role == "system":
            if entry[1].strip():
                system.append(entry[1])
        elif role == "user":
            _add(messages, "user", _user_blocks(entry[1]))
        elif role == "assistant":
            _, text, calls = entry
            blocks = [{"type": "text", "text": text}] if text.strip() else []
            blocks += [{"type": "tool_use", "id": _tool_id(call_id), "name": call["name"],
                        "input": _input(call["arguments"])} for call_id, call in calls]
            _add(messages, "assistant", blocks)
        else:
            _, call_id, content, status = entry
            block = {"type": "tool_result", "tool_use_id": _tool_id(call_id),
                     "content": content if content.strip() else EMPTY_RESULT_TEXT}
            if status == "error":
                block["is_error"] = True
            _add(messages, "user", [block])
    if messages and messages[0]["role"] == "assistant":
        messages.insert(0, {"role": "user", "content": [{"type": "text", "text": OPENING_USER_TEXT}]})
    return {"system": "\n\n".join(system) or None, "messages": messages}


def _add(messages: list[dict], role: str, blocks: list[dict]) -> None:
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _user_blocks(content) -> list[dict]:
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    blocks = []
    for part in parts:
        kind = part.get("type")
        if kind == "text":
            if part["text"].strip():
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part["image_url"]["url"]))
        else:
            # No Anthropic equivalent we can be sure of: passed on as given,
            # which also lets clients store Anthropic-native blocks.
            blocks.append(part)
    return blocks


def _image(url: str) -> dict:
    match = _DATA_URL.fullmatch(url)
    if match:
        return {"type": "image", "source": {"type": "base64", "media_type": match[1], "data": match[2]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _input(arguments: str) -> dict:
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        # The domain only accepts strict JSON arguments (orjson), but events
        # written before that rule may hold text orjson refuses (NaN,
        # Infinity): keep such text rather than fail the read.
        return {"value": arguments}
    return value if isinstance(value, dict) else {"value": value}


def _tool_id(call_id: str) -> str:
    """Ids from other providers (e.g. "functions.get_weather:0") break the
    API's id pattern. They are mapped deterministically, so tool_use and
    tool_result still match: invalid characters become "_" and a hash of the
    original keeps two such ids from colliding."""
    if _VALID_ID.fullmatch(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:12]
    return f"{_INVALID_ID_CHAR.sub('_', call_id)}_{digest}"
