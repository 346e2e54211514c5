"""Projection rebuild: the pure folds of projections/ over 1,000,000 events (goal: ≥ 200,000 events/s).

What rebuilding every conversation's projection from the log costs, without
PostgreSQL: the events of 10,000-event conversations (bench.messages' turns)
as the store returns them (`seq`, `type`, `data`), built in memory once and
folded conversation by conversation, each from a fresh state, until 1,000,000
events have been folded (20,000 with --quick). Timed: the history fold plus
rendering its OpenAI messages (what /messages and snapshots are made of), and
apart from it the UI stream's translator (every frame of `format=ui`).
Building the events is not timed.
"""

from __future__ import annotations

import time

import projections
from bench.core import Bench
from bench.messages import conversation_events
from projections import ui

GOAL = 200_000  # events/s


def stored_events(total: int) -> list[dict]:
    """A conversation of `total` events as the store gives them to the folds, from seq 1."""
    created = {"seq": 1, "type": "conversation.created", "data": {"metadata": {}}}
    return [created] + [{"seq": seq, "type": e.type, "data": e.data}
                        for seq, e in enumerate(conversation_events(total - 1), start=2)]


def rebuild_history(events: list[dict]) -> float:
    """Seconds to fold `events` from a fresh state and render the OpenAI messages."""
    start = time.perf_counter()
    projections.render(projections.fold_all(events), "openai")
    return time.perf_counter() - start


def rebuild_ui(events: list[dict]) -> float:
    """Seconds to translate `events` into every UI stream frame from a fresh state."""
    start = time.perf_counter()
    ui.ui_frames(events)
    return time.perf_counter() - start


def rates(events: list[dict], total: int) -> tuple[float, float]:
    """(history, ui) events/s folding conversations like `events` until `total` events each,
    the two interleaved conversation by conversation."""
    history = translator = 0.0
    for _ in range(max(1, total // len(events))):
        history += rebuild_history(events)
        translator += rebuild_ui(events)
    folded = max(1, total // len(events)) * len(events)
    return folded / history, folded / translator


async def run(bench: Bench) -> None:
    size, total = (2_000, 20_000) if bench.quick else (10_000, 1_000_000)
    history, translator = rates(stored_events(size), total)
    bench.row(f"history fold + OpenAI render, {total:,} events", history, "events/s", goal=f"≥ {GOAL:,}/s", met=history >= GOAL,
              note=f"conversations of {size:,} events, pure folds, one core")
    bench.row(f"UI stream translator, {total:,} events", translator, "events/s",
              note="every frame of format=ui (projections.ui.ui_frames), same events")
