"""`compact=true`: each run of consecutive deltas of one stream becomes one event.

Used on hot read paths (catch-up of /events and of SSE streams), so it is one
pass over the events and each run's text is joined once.
"""

from __future__ import annotations

from domain.schemas import DELTAS as _RUN_FIELD  # delta type -> the field naming its run's stream


def compact(events: list[dict]) -> list[dict]:
    """Merge each run of consecutive deltas of the same stream (same type and
    turn_id, or same tool_call_id) into one event of that type.

    The merged event is the run's last event (its seq, position, id and
    created_at: a reader resuming after it must not see any of the run again)
    with `data` = the run's first data, `text` = the run's texts joined, and
    `first_seq` = the seq of the run's first event.

    Every delta in the answer carries `first_seq`, runs of one included
    (`first_seq == seq`), so clients handle one shape. Compacting compacted
    events changes nothing: a merged event's own `first_seq` is kept.
    Events outside runs are returned as given (the same objects); input events
    are never modified.
    """
    out: list[dict] = []
    run: list[dict] = []
    run_key = None
    for event in events:
        field = _RUN_FIELD.get(event["type"])
        key = (event["type"], event["data"][field]) if field else None
        if run and key != run_key:
            out.append(_merge(run))
            run = []
        if key is None:
            out.append(event)
        else:
            run.append(event)
            run_key = key
    if run:
        out.append(_merge(run))
    return out


def _merge(run: list[dict]) -> dict:
    first, last = run[0], run[-1]
    merged = dict(last)
    merged["data"] = {
        **first["data"],
        "text": "".join(e["data"]["text"] for e in run),
        "first_seq": first["data"].get("first_seq", first["seq"]),
    }
    return merged
