"""The hash chain, pure (domain/chain.py): JCS as RFC 8785 writes it, and a verifier
that names the first broken seq and how it broke, whatever was done to the rows."""

from __future__ import annotations

import hashlib
import uuid

import orjson
import pytest
import rfc8785
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from domain import chain
from domain.chain import ALTERED, INSERTED, REMOVED, REORDERED, ZERO

SOME = settings(max_examples=300, deadline=None)

# -- JCS ---------------------------------------------------------------------------------

keys = st.text(max_size=8)  # any code point: orders by UTF-16 units differ from code points' above U+FFFF
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20)


def test_orjson_escapes_every_code_point_as_jcs_does():
    """The fast path writes strings with orjson: the same bytes as RFC 8785 for each code point."""
    points = [*range(0, 0xD800), *range(0xE000, 0x110000)]
    for start in range(0, len(points), 4096):
        text = "".join(map(chr, points[start:start + 4096]))
        assert orjson.dumps(text) == rfc8785.dumps(text)


@SOME
@given(json_values)
def test_canonical_is_rfc8785_for_any_json_value(value):
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.IntegerDomainError:
        expected = rfc8785.dumps(chain._as_doubles(value))  # stored before safe_numbers: read as doubles
    assert chain.canonical(value) == expected


def test_numbers_print_as_ecmascript_does():
    assert chain.canonical({"b": 1.0, "a": [1e16, 1e21, 0.1, -0.0, 5e-324, 2**53 - 1]}) == \
        b'{"a":[10000000000000000,1e+21,0.1,0,5e-324,9007199254740991],"b":1}'


def test_keys_sort_by_utf16_code_units():
    # U+1F600 is D83D DE00 in UTF-16, before U+FF5E: the opposite of their code points' order
    assert chain.canonical({"\uff5e": 1, "\U0001f600": 2}) == '{"😀":2,"～":1}'.encode()


@pytest.mark.parametrize(("value", "path"), [
    ({"a": 1, "b": [1, 2**53]}, ("b", 1)),
    ({"a": -(2**53)}, ("a",)),
    ({"a": {"b": 1e16}}, ("a", "b")),
    ([0, 1.5e300], (1,)),
    ({"a": 2**53 - 1, "b": -(2**53 - 1), "c": 0.5, "d": True, "e": None}, None),
])
def test_unsafe_number_names_where_the_first_one_is(value, path):
    assert chain.unsafe_number(value) == path


def test_the_hash_is_sha256_of_the_previous_hash_and_the_jcs_of_the_event():
    event = {"conversation_id": "0b7c1b0e-7f1e-4f0e-9f3e-3b0c9c1f0a11", "seq": 1, "id": "é\n", "type": "x",
             "data": {"z": [1, 2.5, "\u2028"], "a": None}, "created_at": "2026-11-21T10:00:00.123456Z"}
    jcs = rfc8785.dumps({k: v for k, v in event.items()})
    assert chain.event_hash(ZERO, event) == hashlib.sha256(ZERO.encode() + jcs).hexdigest()


# -- the verifier ----------------------------------------------------------------------------

CID = str(uuid.UUID(int=7))


def _chain(contents: list[dict]) -> list[dict]:
    """Stored rows for these contents (each {"id", "type", "data", "created_at"}), seq 1 on."""
    rows, prev = [], ZERO
    for seq, content in enumerate(contents, start=1):
        row = {"conversation_id": CID, "seq": seq, **content}
        row["hash"] = prev = chain.event_hash(prev, row)
        rows.append(row)
    return rows


def _contents(n: int, tag: int = 0) -> list[dict]:
    return [{"id": f"e{tag}-{i}", "type": "message.user", "data": {"content": f"m{i}", "n": i % 3},
             "created_at": f"2026-01-01T00:00:{i:02d}.000000Z"} for i in range(n)]


def _verify(rows: list[dict], head: tuple[int, str] | None = None) -> chain.Verdict:
    return chain.verify(CID, sorted(rows, key=lambda r: r["seq"]), *(head or (None, None)))


def _renumber(rows: list[dict], start: int, by: int) -> list[dict]:
    return [{**r, "seq": r["seq"] + by} if r["seq"] >= start else r for r in rows]


chains = st.integers(2, 12).map(lambda n: _chain(_contents(n)))


@SOME
@given(chains, st.booleans())
def test_an_intact_chain_verifies_to_its_head(rows, with_head):
    verdict = _verify(rows, (len(rows), rows[-1]["hash"]) if with_head else None)
    assert verdict.answer() == {"ok": True, "verified_through_seq": len(rows), "head_hash": rows[-1]["hash"]}


@SOME
@given(chains, st.data(), st.booleans(), st.booleans())
def test_altered_content_or_hash_is_named_at_its_seq(rows, data, the_hash, with_head):
    i = data.draw(st.integers(0, len(rows) - 1))
    head = (len(rows), rows[-1]["hash"]) if with_head else None
    if the_hash:
        rows[i] = {**rows[i], "hash": hashlib.sha256(b"forged").hexdigest()}
    else:
        rows[i] = {**rows[i], "data": {**rows[i]["data"], "content": "changed"}}
    assert _verify(rows, head).answer() == {"ok": False, "first_bad_seq": i + 1, "reason": ALTERED}


@SOME
@given(chains, st.data(), st.booleans())
def test_a_removed_event_is_named_with_or_without_renumbering(rows, data, renumber):
    i = data.draw(st.integers(0, len(rows) - 1))
    head = (len(rows), rows[-1]["hash"])
    rest = rows[:i] + rows[i + 1:]
    if renumber:
        rest = _renumber(rest, i + 2, -1)
    assert _verify(rest, head).answer() == {"ok": False, "first_bad_seq": i + 1, "reason": REMOVED}


@SOME
@given(chains, st.data(), st.booleans())
def test_a_removed_middle_event_is_named_without_the_head(rows, data, renumber):
    """A file has no head: a gap names itself; renumbered, the chain must go on for two more events."""
    assume(len(rows) >= 3 or not renumber)
    i = data.draw(st.integers(0, len(rows) - (3 if renumber else 2)))
    rest = rows[:i] + rows[i + 1:]
    if renumber:
        rest = _renumber(rest, i + 2, -1)
    assert _verify(rest).answer() == {"ok": False, "first_bad_seq": i + 1, "reason": REMOVED}


@SOME
@given(chains, st.data(), st.booleans())
def test_an_inserted_event_is_named_wherever_it_went(rows, data, links):
    """Put in at seq i (the rest renumbered up), or past the head; with a made-up
    hash, or one computed to link to the event before it."""
    i = data.draw(st.integers(0, len(rows)))
    head = (len(rows), rows[-1]["hash"])
    extra = {"conversation_id": CID, "seq": i + 1, **_contents(1, tag=9)[0]}
    prev = rows[i - 1]["hash"] if i else ZERO
    extra["hash"] = chain.event_hash(prev, extra) if links else hashlib.sha256(b"made up").hexdigest()
    changed = _renumber(rows, i + 1, 1) + [extra]
    assert _verify(changed, head).answer() == {"ok": False, "first_bad_seq": i + 1, "reason": INSERTED}


@SOME
@given(chains, st.data(), st.booleans())
def test_two_swapped_events_are_named_at_the_first(rows, data, with_head):
    i, j = sorted(data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=2, max_size=2, unique=True)))
    head = (len(rows), rows[-1]["hash"]) if with_head else None
    rows[i], rows[j] = {**rows[j], "seq": i + 1}, {**rows[i], "seq": j + 1}
    assert _verify(rows, head).answer() == {"ok": False, "first_bad_seq": i + 1, "reason": REORDERED}


@SOME
@given(chains, st.data())
def test_a_rewrite_that_recomputed_every_hash_passes_alone_and_fails_its_checkpoint(rows, data):
    """What a digest is for: a superuser who alters an event and recomputes every
    later hash (and the head) leaves a chain that verifies; the head it ends in
    is not the one a digest recorded."""
    i = data.draw(st.integers(0, len(rows) - 1))
    recorded = (len(rows), rows[-1]["hash"])
    contents = [{k: r[k] for k in ("id", "type", "data", "created_at")} for r in rows]
    contents[i]["data"] = {"content": "rewritten"}
    rewritten = _chain(contents)
    verdict = chain.verify(CID, rewritten, len(rewritten), rewritten[-1]["hash"], checkpoint=recorded[0])
    assert verdict.ok
    assert verdict.checkpoint_hash != recorded[1]
    assert chain.verify(CID, rows, checkpoint=recorded[0]).checkpoint_hash == recorded[1]


def test_an_event_past_the_head_is_inserted_even_when_its_hash_links():
    rows = _chain(_contents(4))
    head = (3, rows[2]["hash"])
    assert _verify(rows, head).answer() == {"ok": False, "first_bad_seq": 4, "reason": INSERTED}


def test_a_changed_head_hash_is_named_at_the_head():
    rows = _chain(_contents(4))
    assert _verify(rows, (4, ZERO)).answer() == {"ok": False, "first_bad_seq": 4, "reason": ALTERED}


def test_content_no_event_can_have_is_a_mismatch_not_a_crash():
    rows = _chain(_contents(3))
    rows[1] = {**rows[1], "data": {"n": 10**400}}
    assert _verify(rows).answer() == {"ok": False, "first_bad_seq": 2, "reason": ALTERED}


def test_a_digest_root_is_sha256_of_the_jcs_of_its_entries_and_time():
    entries = [{"principal": "p", "id": CID, "seq": 3, "head_hash": ZERO}]
    expected = hashlib.sha256(rfc8785.dumps({"conversations": entries, "taken_at": "2026-01-01T00:00:00.000000Z",
                                             "version": 1})).hexdigest()
    assert chain.digest_root(entries, "2026-01-01T00:00:00.000000Z") == expected
