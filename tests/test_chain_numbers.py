"""Numbers and the hash chain: what the API accepts hashes the same after jsonb's
round trip (so verify agrees with the append), and what could not is refused."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import chain
from tests.helpers import TURN, append, new_conversation

# Any JSON a client may send that the API accepts: numbers within ±(2^53 - 1)
# (floats of any size below it, the tiny and the integral ones included),
# strings and keys without NUL (PostgreSQL cannot store it).
_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=10)
accepted_json = st.recursive(
    st.none() | st.booleans() | st.integers(-chain.MAX_SAFE, chain.MAX_SAFE)
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-chain.MAX_SAFE, max_value=chain.MAX_SAFE)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=25)


async def test_any_accepted_json_hashes_the_same_after_the_jsonb_round_trip(store):
    values: list = []

    @settings(max_examples=1500, deadline=None)
    @given(accepted_json)
    def collect(value):
        # as the API holds it: parsed from the JSON text a client sent
        values.append(orjson.loads(orjson.dumps(value)))

    collect()
    values += [1e16 / 4, 1.0, 5.0, -0.0, 0.1, 1e-7, 5e-324, 2.5e15, chain.MAX_SAFE, -chain.MAX_SAFE, 1e15 + 0.5]
    rows = await store.pool.fetch(  # stored as the append stores data (orjson text, cast to jsonb), read back
        "SELECT n, x::jsonb AS x FROM unnest($1::text[]) WITH ORDINALITY AS v(x, n) ORDER BY n",
        [orjson.dumps({"v": v}).decode() for v in values])
    assert len(rows) == len(values)
    for value, row in zip(values, rows):
        assert chain.canonical({"v": value}) == chain.canonical(row["x"]), (value, row["x"])


async def test_a_number_beyond_the_safe_range_is_refused_and_nothing_is_written(client, ledger):
    cid = await new_conversation(client)
    await append(client, cid, TURN[:9])  # the turn, its call completed, the turn finished
    for number in (2**53, -(2**53), 1e16, 1.5e300):
        body = {"events": [{"type": "tool.result",
                            "data": {"tool_call_id": "call_1", "status": "ok", "content": {"rows": [1, number]}}}]}
        error = await ledger.refused(client.post(f"/v1/conversations/{cid}/events", json=body), 422, "invalid_event")
        assert error["details"]["rule"] == "safe_numbers" and error["details"]["index"] == 0, error
        assert "content.rows.1" in error["message"]
    error = await ledger.refused(client.post("/v1/conversations", json={"metadata": {"big": 2**60}}),
                                 422, "invalid_request")
    assert error["details"]["errors"][0]["field"] == "metadata.big", error


async def test_the_largest_safe_numbers_are_kept_exactly_and_verify(client):
    cid = await new_conversation(client, metadata={"max": chain.MAX_SAFE, "min": -chain.MAX_SAFE, "f": 1e15 + 0.5})
    await append(client, cid, TURN[:9])
    data = {"tool_call_id": "call_1", "status": "ok",
            "content": {"max": chain.MAX_SAFE, "f": 2.5e15, "tiny": 5e-324, "one": 1.0}}
    stored = (await append(client, cid, [{"type": "tool.result", "data": data}]))["events"][0]
    read = (await client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    assert read[-1]["hash"] == stored["hash"]
    assert chain.canonical(read[-1]["data"]) == chain.canonical(data)
    assert (await client.get(f"/v1/conversations/{cid}/verify")).json()["ok"] is True
