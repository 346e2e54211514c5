"""Pure projections of a conversation's events: no I/O.

- compact(events): the `compact=true` event view.
- the history fold (initial_state, fold, fold_all, state_to_json,
  state_from_json) and its renderers render_openai / render_anthropic.
- render(state, format): the body of GET /messages without `conversation_id`.
"""

from __future__ import annotations

from projections.anthropic import render_anthropic
from projections.compact import compact
from projections.history import fold, fold_all, initial_state, state_from_json, state_to_json
from projections.openai import render_openai

FORMATS = ("openai", "anthropic")

__all__ = ["FORMATS", "compact", "fold", "fold_all", "initial_state",
           "render", "render_anthropic", "render_openai", "state_from_json", "state_to_json"]


def render(state: dict, format: str) -> dict:
    """`{"seq", "messages"}` (openai) or `{"seq", "system", "messages"}` (anthropic);
    `seq` is the last seq the answer reflects."""
    if format == "openai":
        return {"seq": state["seq"], "messages": render_openai(state)}
    if format == "anthropic":
        return {"seq": state["seq"], **render_anthropic(state)}
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
