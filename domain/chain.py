"""The hash chain over a conversation's events: what is hashed, and how a chain is checked. No I/O.

An event's hash is hex SHA-256 over the previous event's hash (64 hex digits,
"0" * 64 for seq 1) followed by the RFC 8785 (JCS) serialisation of
`{conversation_id, seq, id, type, data, created_at}`. So each hash commits to
its event and to every event before it: the last one (the conversation's head)
commits to the whole history.

JCS comes from the `rfc8785` package. It is pure Python (about 20 µs for one
small event), so an append does not call it for what orjson writes
identically: orjson's sorted output *is* the JCS form of a value holding no
floats, only integers in the safe range and only ASCII keys (strings are
escaped the same way for every code point: tests/test_chain.py checks each).
Everything else goes through rfc8785.

Numbers: JCS reads every number as an IEEE double. An integer beyond ±(2^53 − 1)
cannot be held exactly by one, nor survive jsonb's round trip as the same JSON
(jsonb gives back `1e16` as `10000000000000000`), so appends refuse them
(`unsafe_number`, the rule `safe_numbers`). Events stored before the rule
existed may hold one: those are hashed as JCS hashes any JSON text, as the
nearest double, so their hash is reproducible, if blind to their low digits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import orjson
import rfc8785

ZERO = "0" * 64  # the "previous hash" of seq 1
MAX_SAFE = 2**53 - 1  # I-JSON (RFC 7493): the integers a double holds exactly

# The envelope's keys in JCS order (UTF-16 code units; all ASCII here).
_ENVELOPE = (b'{"conversation_id":', b',"created_at":', b',"data":', b',"id":', b',"seq":', b',"type":', b"}")


# -- numbers -----------------------------------------------------------------------


def unsafe_number(value: Any, path: tuple = ()) -> tuple | None:
    """The path of the first number beyond ±(2^53 − 1) in a JSON value, else None."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind is int or kind is float:
            if not -MAX_SAFE <= value <= MAX_SAFE:
                return path
        elif kind is dict:
            stack.extend((item, (*path, key)) for key, item in reversed(value.items()))
        elif kind is list:
            stack.extend((item, (*path, i)) for i, item in reversed(list(enumerate(value))))
    return None


# -- JCS ---------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    """True when orjson's sorted output of `value` is its JCS form."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return True
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key.isascii():
                return False  # JCS sorts by UTF-16 code units, orjson by code points
            if type(item) is not str and not _plain(item):
                return False
        return True
    if kind is list:
        return all(_plain(item) for item in value)
    if kind is int:
        return -MAX_SAFE <= value <= MAX_SAFE
    return False  # floats: JCS writes them as ECMAScript does (1.0 -> 1, 1e16 -> 10000000000000000)


def _as_doubles(value: Any) -> Any:
    """`value` with every integer beyond the safe range as the double JCS reads it as."""
    kind = type(value)
    if kind is int and not -MAX_SAFE <= value <= MAX_SAFE:
        return float(value)  # OverflowError beyond 1.8e308: no JSON parser holds that either
    if kind is dict:
        return {k: _as_doubles(v) for k, v in value.items()}
    if kind is list:
        return [_as_doubles(v) for v in value]
    return value


def canonical(value: Any) -> bytes:
    """The RFC 8785 (JCS) serialisation of a JSON value (UTF-8)."""
    if _plain(value):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    try:
        return rfc8785.dumps(value)
    except rfc8785.IntegerDomainError:
        return rfc8785.dumps(_as_doubles(value))


class UnsafeNumber(ValueError):
    """A number beyond ±(2^53 − 1): no hash of it survives the way back from the store (rule `safe_numbers`)."""

    def __init__(self, path: tuple) -> None:
        where = ".".join(map(str, path)) or "the value"
        super().__init__(f"{where} is a number beyond ±(2^53 − 1) (9007199254740991), which JSON parsers and the "
                         "hash chain cannot hold exactly; send it as a string")
        self.path = path


def canonical_new(value: Any) -> bytes:
    """canonical() of data about to be stored: UnsafeNumber when it holds a number the chain cannot keep."""
    if _plain(value):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    path = unsafe_number(value)
    if path is not None:
        raise UnsafeNumber(path)
    return rfc8785.dumps(value)


def jcs_object(members: dict[str, bytes]) -> bytes:
    """The JCS form of an object whose members' values are already JCS bytes
    (for large values, e.g. a digest's list, serialised once, piece by piece)."""
    keys = sorted(members, key=lambda k: k.encode("utf-16-be"))
    return b"{" + b",".join(orjson.dumps(k) + b":" + members[k] for k in keys) + b"}"


# -- the hash ----------------------------------------------------------------------


def event_bytes(conversation_id: str, seq: int, id: str, type: str, data: bytes, created_at: str) -> bytes:
    """JCS of {conversation_id, seq, id, type, data, created_at}; `data` already canonical()."""
    c, t, d, i, s, y, end = _ENVELOPE
    return b"".join((c, orjson.dumps(conversation_id), t, orjson.dumps(created_at), d, data, i, orjson.dumps(id),
                     s, canonical(seq), y, orjson.dumps(type), end))


def link(prev_hex: str, jcs: bytes) -> str:
    return hashlib.sha256(prev_hex.encode() + jcs).hexdigest()


def event_hash(prev_hex: str, event: dict) -> str:
    """The hash of a stored event (a dict with the contract's keys) following `prev_hex`."""
    return link(prev_hex, event_bytes(str(event["conversation_id"]), event["seq"], event["id"], event["type"],
                                      canonical(event["data"]), event["created_at"]))


# -- checking a chain ----------------------------------------------------------------

# How a chain broke, at its first bad seq:
ALTERED = "altered"  # the event's content or its hash changed
REMOVED = "removed"  # an event is missing (the seqs skip one, or the chain resumes further on)
INSERTED = "inserted"  # an event that was never in the chain (an extra seq, or one whose hash does not link)
REORDERED = "reordered"  # events swapped places: the one here is valid at another position
REASONS = (ALTERED, REMOVED, INSERTED, REORDERED)

# a chain that resumes further on: up to this many events removed (and the rest renumbered) are recognised
_MAX_SHIFT = 16


@dataclass(frozen=True)
class Verdict:
    ok: bool
    verified_through_seq: int  # the last seq whose hash was recomputed and matched
    head_hash: str | None  # the recomputed hash at verified_through_seq
    first_bad_seq: int | None = None
    reason: str | None = None
    checkpoint_hash: str | None = None  # the recomputed hash at `checkpoint`, when verified that far

    def answer(self) -> dict:
        """As GET /verify answers it."""
        if self.ok:
            return {"ok": True, "verified_through_seq": self.verified_through_seq, "head_hash": self.head_hash}
        return {"ok": False, "first_bad_seq": self.first_bad_seq, "reason": self.reason}


class ChainCheck:
    """Checks one conversation's events, fed in seq order one at a time (so a
    caller reading pages holds one page at a time). `add` answers whether it
    wants more; `verdict()` says how it ended.

    `head_seq`/`head_hash` (the conversation's row, when there is one) also
    catch what a chain alone cannot: events past the head, a missing tail.
    `checkpoint`: a seq whose recomputed hash the verdict reports (a digest's).

    After the first event whose hash does not match, the following events
    tell what happened there (each check below names the case it recognises):
    that is also read a row at a time, until the case is decided.
    """

    def __init__(self, conversation_id: str, head_seq: int | None = None, head_hash: str | None = None,
                 checkpoint: int | None = None) -> None:
        self.cid = str(conversation_id)
        self.head_seq, self.head_hash, self.checkpoint = head_seq, head_hash, checkpoint
        self.expected = 1
        self.prev = ZERO  # the verified hash at expected - 1
        self.prev2: str | None = None  # ... and at expected - 2
        self.checkpoint_hash: str | None = None
        self.result: tuple[int, str] | None = None  # (first_bad_seq, reason) once decided
        self.bad: dict | None = None  # the first row that did not match
        self.bad_hash: str | None = None  # its recomputed hash at its place
        self.next_row: dict | None = None  # the row after it

    def _hash(self, prev: str, row: dict, seq: int) -> str | None:
        try:
            return link(prev, event_bytes(self.cid, seq, row["id"], row["type"], canonical(row["data"]),
                                          row["created_at"]))
        except (TypeError, ValueError, OverflowError, KeyError):
            return None  # content no JSON event can have: it matches nothing

    def _fits(self, row: dict, prev: str | None, seq: int) -> bool:
        return prev is not None and row.get("hash") is not None and self._hash(prev, row, seq) == row["hash"]

    def _decide(self, seq: int, reason: str) -> bool:
        self.result = (seq, reason)
        return False

    def add(self, row: dict) -> bool:
        if self.result is not None:
            return False
        if self.bad is not None:
            return self._classify(row)
        seq = row["seq"]
        if seq > self.expected:
            return self._decide(self.expected, REMOVED)
        if seq < self.expected:  # the same seq twice (only a file can say that)
            return self._decide(seq, INSERTED)
        if self.head_seq is not None and seq > self.head_seq:
            # past the conversation's head: never appended (or, when it belongs one
            # place earlier, the one before it was put in and it moved up)
            return self._decide(seq - 1 if self._fits(row, self.prev2, seq - 1) else seq, INSERTED)
        computed = self._hash(self.prev, row, seq)
        if computed is None or computed != row.get("hash"):
            self.bad, self.bad_hash = row, computed
            if self._fits(row, self.prev2, seq - 1):
                # it belongs one place earlier: the event before it was put in
                # (with a hash that links) and the rest moved up by one
                return self._decide(seq - 1, INSERTED)
            return True
        self.prev2, self.prev = self.prev, computed
        if seq == self.checkpoint:
            self.checkpoint_hash = computed
        self.expected += 1
        return True

    def _classify(self, row: dict) -> bool:
        s, bad = self.expected, self.bad
        if self.next_row is None:
            self.next_row = row
            if row["seq"] != s + 1:
                return self._decide(s, ALTERED)
            # the chain goes on from it at the right places: it was altered in place
            if self._fits(row, bad.get("hash"), s + 1) or self._fits(row, self.bad_hash, s + 1):
                return self._decide(s, ALTERED)
            # the next one belongs here: this one was put in (and the rest moved
            # up), unless it belongs right after that one (the two swapped)
            if self._fits(row, self.prev, s):
                return self._decide(s, REORDERED if self._fits(bad, row.get("hash"), s + 1) else INSERTED)
            # the chain goes on from it further on: events were taken out and the rest renumbered
            if any(self._fits(row, bad.get("hash"), s + 1 + k) for k in range(1, _MAX_SHIFT + 1)):
                return self._decide(s, REMOVED)
            return True
        # a later event that belongs here was moved away from here
        if self._fits(row, self.prev, s):
            return self._decide(s, REORDERED)
        return True

    def verdict(self) -> Verdict:
        last = self.expected - 1
        if self.result is None and self.bad is not None:
            last_known = self.next_row is None and self.head_hash is not None
            if last_known and self.head_seq == self.expected \
                    and self.head_hash not in (self.bad.get("hash"), self.bad_hash):
                # the last event, and the head names another: it was never appended
                self.result = (self.expected, INSERTED)
            elif last_known and self.head_seq > self.expected and self.head_hash == self.bad.get("hash"):
                # the head's own event, at an earlier place: events before it were taken out
                self.result = (self.expected, REMOVED)
            else:
                self.result = (self.expected, ALTERED)
        if self.result is None and self.head_seq is not None:
            if last < self.head_seq:
                self.result = (self.expected, REMOVED)  # the tail is gone
            elif self.head_hash is not None and self.prev != self.head_hash:
                self.result = (last, ALTERED)  # the head itself was changed
        if self.result is not None:
            return Verdict(False, last, self.prev if last else None, self.result[0], self.result[1],
                           self.checkpoint_hash)
        return Verdict(True, last, self.prev if last else None, checkpoint_hash=self.checkpoint_hash)


def verify(conversation_id: str, rows: Iterable[dict], head_seq: int | None = None, head_hash: str | None = None,
           checkpoint: int | None = None) -> Verdict:
    """Check a conversation's events (dicts with seq, id, type, data, created_at, hash; in seq order)."""
    check = ChainCheck(conversation_id, head_seq, head_hash, checkpoint)
    for row in rows:
        if not check.add(row):
            break
    return check.verdict()


# -- digests ---------------------------------------------------------------------------


def digest_root(entries: list[dict], taken_at: str, version: int = 1) -> str:
    """SHA-256 of the JCS form of {"conversations": entries, "taken_at", "version"}:
    what a digest's `root` is, so anyone can recompute it from the file."""
    listed = b"[" + b",".join(canonical(e) for e in entries) + b"]"
    return hashlib.sha256(jcs_object({"conversations": listed, "taken_at": canonical(taken_at),
                                      "version": canonical(version)})).hexdigest()
