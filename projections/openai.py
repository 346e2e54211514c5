"""`format=openai`: a message list a Chat Completions request accepts as is."""

from __future__ import annotations

from projections.grouping import grouped


def render_openai(state: dict) -> list[dict]:
    """Render a folded history (projections.history) as Chat Completions messages.

    User content is returned as stored (the same objects as in the state):
    treat the answer as read-only.
    """
    messages: list[dict] = []
    for entry in grouped(state):
        role = entry[0]
        if role == "assistant":
            _, text, calls = entry
            message = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = [
                    {"id": call_id, "type": "function",
                     "function": {"name": call["name"], "arguments": call["arguments"]}}
                    for call_id, call in calls
                ]
        elif role == "tool":
            message = {"role": "tool", "tool_call_id": entry[1], "content": entry[2]}
        elif role == "user":
            message = {"role": "user", "content": entry[1]}
            if entry[2] is not None:
                message["name"] = entry[2]
        else:
            message = {"role": "system", "content": entry[1]}
        messages.append(message)
    return messages
