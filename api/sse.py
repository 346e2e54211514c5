"""Server-Sent Events framing and the resume point.

Frames are built here and nowhere else: `id:`, `event:`, `data:`, blank line;
`retry:` first; heartbeats are comments (`: ping`), never data frames;
`data: [DONE]` where the UI stream's renderer puts projections.ui.DONE.
"""

from __future__ import annotations

import re
from contextlib import aclosing
from typing import AsyncIterator, Iterable, Protocol

import orjson

from api.errors import ApiError
from api.bodies import MAX_SEQ
from projections import ui
from projections.compact import compact as compact_events


class Render(Protocol):
    """A stream's format: EventFrames, or projections.ui.UiStream."""

    # readers whose renderers have the same `share` and stand at the same
    # cursor make the same frames of a live batch (None: this one does not)
    share: str | None

    def __call__(self, live: bool, events: list[dict]) -> Iterable[tuple | str]:
        """The batch's items: (id, data) or (id, data, event name), or ui.DONE."""

    def handoff(self) -> object:
        """Its state after the last batch, given up to the batch's memo (not changed afterwards)."""

    def adopt(self, state: object) -> None:
        """Continue from the state another reader handed off after the same batch."""


RETRY_MS = 3000
PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"

# ASCII digits only (`\d` would take any script's digits), and no more of
# them than a seq can have (int() itself refuses past 4,300 digits)
_RESUME = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?")


def _at_most(limit: int) -> str:
    """A regex for the decimal numbers 0..limit (leading zeros allowed, as
    many digits as `limit` has at most)."""
    top = str(limit)
    tails = [f"{top[:i]}[0-{int(top[i]) - 1}][0-9]{{{len(top) - i - 1}}}" for i in range(len(top)) if top[i] != "0"]
    return "(?:" + "|".join([f"[0-9]{{1,{len(top) - 1}}}", *tails, top]) + ")"


# What `resume_point` accepts, for the API document: empty, `<seq>` or `<seq>:<k>`.
RESUME_PATTERN = f"^(?:{_at_most(MAX_SEQ)}(?::{_at_most(MAX_SEQ)})?)?$"


def retry(ms: int = RETRY_MS) -> bytes:
    return f"retry: {ms}\n\n".encode()


def frame(id_: str, data: dict, event: str | None = None) -> bytes:
    head = f"id: {id_}\n" + (f"event: {event}\n" if event else "")
    return head.encode() + b"data: " + orjson.dumps(data) + b"\n\n"


async def body(batches: AsyncIterator[tuple[bool, list[dict]]], render: Render,
               until_turn: str | None = None) -> AsyncIterator[bytes]:
    """A response body: `retry:` first, then each batch's items as frames,
    `: ping` for a heartbeat (an empty batch). A turn's stream (`until_turn`)
    ends right after the turn's closing event.

    A live batch's frames are encoded once for all the process's readers of
    that batch with the same `render.share`: the first one stores them in the
    batch's memo (store/listener.py LiveBatch), with its renderer's state
    after the batch, which the others adopt. A batch is one write; the
    response's first frame goes out alone, as soon as it is made."""
    yield retry()
    first = True
    async with aclosing(batches):
        async for live, events in batches:
            if not events:
                yield PING
                continue
            memo = getattr(events, "memo", None)
            key = None if memo is None or render.share is None else (render.share, until_turn)
            if key is not None and (hit := memo.get(key)) is not None:
                data, ended, state = hit
                render.adopt(state)
            else:
                ended = False
                if until_turn is not None:
                    events, ended = ui.through_turn_end(events, until_turn)
                items = iter(render(live, events))
                if first and key is None:
                    for item in items:  # the first frame, before the rest of the batch is made
                        yield DONE if item is ui.DONE else frame(*item)
                        first = False
                        break
                data = b"".join([DONE if item is ui.DONE else frame(*item) for item in items])
                if key is not None:
                    memo[key] = (data, ended, render.handoff())
            if data:
                first = False
                yield data
            if ended:
                return


class EventFrames:
    """format=events: a frame per stored event, id its seq, `event:` its type;
    the catch-up compacted when asked (a live batch never: its deltas are sent
    as they come, so every reader of a live batch gets the same frames)."""

    share = "events"

    def __init__(self, compact: bool) -> None:
        self.compact = compact

    def __call__(self, live: bool, events: list[dict]) -> Iterable[tuple[str, dict, str]]:
        for event in events if live or not self.compact else compact_events(events):
            yield str(event["seq"]), event, event["type"]

    def adopt(self, state: None) -> None:
        pass

    def handoff(self) -> None:
        return None


def event_frames(compact: bool) -> Render:
    return EventFrames(compact)


def resume_point(last_event_id: str | None, after: str | None) -> tuple[int, int | None]:
    """(seq, k) to resume after: `Last-Event-ID` wins over `after` (browsers
    resend the original URL on reconnect), else 0. k is None for `<seq>` ids
    and the chunk index for `<seq>:<k>` ids. Both are checked when both come:
    a garbled `after` is refused even when the header makes it moot."""
    from_after = _parse(after, "after")
    from_header = _parse(last_event_id, "Last-Event-ID")
    return from_header or from_after or (0, None)


def _parse(raw: str | None, source: str) -> tuple[int, int | None] | None:
    if raw in (None, ""):
        return None
    match = _RESUME.fullmatch(raw)
    if match is None:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise ApiError(422, "invalid_request", f"{source} must be a seq like 12 or a frame id like 12:3, not {shown!r}",
                       field=source)
    seq, k = int(match.group(1)), None if match.group(2) is None else int(match.group(2))
    if seq == 0:  # no event has seq 0: any "frame" of it is before everything
        k = None
    if seq > MAX_SEQ or (k is not None and k > MAX_SEQ):
        raise ApiError(422, "invalid_request", f"{source} is out of range: a seq is at most {MAX_SEQ}", field=source)
    return seq, k
