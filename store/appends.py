"""Appends, a group at a time: whatever a group holds, two statements.

The writer (store/writer.py) hands every append of its group here at once,
inside the group's transaction, after it has taken the group's locks. Then:

1. ONE statement reads, for all of them: every conversation row they name
   (FOR UPDATE), the stored events carrying the event ids they give (the
   idempotency probe), and the history facts for the turn and tool-call ids
   they name (one probe of migration 008's unique indexes per id). It comes
   after the lock statement, so its snapshot sees every earlier writer of
   these conversations committed.
2. The rules are checked in Python, append after append in arrival order,
   each against the state the previous one left: its seq, its live rule
   state, the ids it wrote (a retry of a batch earlier in the group gets that
   batch's events) and the turns and calls it started or ended. A refused
   append changes nothing of that state and is answered alone.
3. ONE statement inserts every event of every accepted append, moves every
   conversation's head and sends the notifications (delivered at COMMIT).

Positions are the transaction's xid << INDEX_BITS plus the index the writer's
Transaction hands out, so the statement returns only the xid, and the stored
events are built here.

The hash chain (domain/chain.py) is computed here too, in Python, between the
two statements: statement 1 reads each conversation's head hash with its
locked row, and its own timestamp, which is the events' created_at (never
earlier than the conversation's last write: created_at does not go backwards
within a conversation even if the clock does). Every event of the group is
hashed from those, statement 3 stores the hashes and moves each head hash. So
an append costs the same hashing however long its conversation is, and no
round trip more.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

import domain
from domain import chain
from store.errors import IdempotencyConflict, InvalidEvent, NotFound, SeqConflict, StoreError, Unavailable
from store.positions import INDEX_BITS
from store.rows import rfc3339
from store.writer import Batched, Transaction

# Statement 1. $1/$2: the conversations (principal, id), numbered from 1 in
# this order; the probes name a conversation by that number. Every result row
# says what it is: 'head' (a locked conversation row, its head hash and this
# statement's timestamp), 'event' (a stored event with a given id), 'turn' (a
# turn id already used), 'call' (a tool call that exists and is not live;
# `final`: it has its final result). Calls the row's saved state holds are
# live: not probed.
_READ = """
WITH k AS MATERIALIZED (
    SELECT principal, id, n::int FROM unnest($1::text[], $2::uuid[]) WITH ORDINALITY AS k(principal, id, n)
), head AS MATERIALIZED (
    SELECT k.n, c.seq, c.state, c.updated_at, c.head_hash
      FROM k JOIN conversations c ON c.principal = k.principal AND c.id = k.id
     ORDER BY k.n
       FOR UPDATE OF c
)
SELECT 'head' AS kind, n, seq, state, updated_at AS at, NULL::text AS id, NULL::bigint AS position,
       NULL::text AS type, NULL::jsonb AS data, NULL::boolean AS final, head_hash AS hash,
       statement_timestamp() AS now
  FROM head
UNION ALL
SELECT 'event', p.n, e.seq, NULL, e.created_at, e.id, e.position, e.type, e.data, NULL, e.hash, NULL
  FROM unnest($3::int[], $4::text[]) AS p(n, id) JOIN k USING (n)
 -- one unique-index lookup per id (LIMIT 1 keeps the planner from
 -- flattening it into a walk of the whole conversation)
 CROSS JOIN LATERAL (
       SELECT seq, position, id, type, data, created_at, hash FROM events
        WHERE principal = k.principal AND conversation_id = k.id AND id = p.id LIMIT 1) e
UNION ALL
SELECT 'turn', p.n, NULL, NULL, NULL, p.id, NULL, NULL, NULL, NULL, NULL, NULL
  FROM unnest($5::int[], $6::text[]) AS p(n, id) JOIN k USING (n)
 WHERE EXISTS (SELECT 1 FROM events e WHERE e.principal = k.principal AND e.conversation_id = k.id
                  AND e.type = 'turn.started' AND e.data ->> 'turn_id' = p.id)
UNION ALL
SELECT 'call', p.n, NULL, NULL, NULL, p.id, NULL, NULL, NULL,
       EXISTS (SELECT 1 FROM events e WHERE e.principal = k.principal AND e.conversation_id = k.id
                  AND e.type = 'tool.result' AND (e.data ->> 'status') <> 'pending'
                  AND e.data ->> 'tool_call_id' = p.id), NULL, NULL
  FROM unnest($7::int[], $8::text[]) AS p(n, id) JOIN k USING (n) JOIN head USING (n)
 WHERE NOT (head.state -> 'calls' ? p.id)
   AND EXISTS (SELECT 1 FROM events e WHERE e.principal = k.principal AND e.conversation_id = k.id
                  AND e.type = 'tool_call.started' AND e.data ->> 'tool_call_id' = p.id)
"""

# Statement 3. $1..$8: the new heads (one per conversation written: `at` is
# its events' created_at, `head_hash` its last event's hash); $9..$15: the
# events, each naming its head by number; $16: the notifications.
_WRITE = f"""
WITH h AS MATERIALIZED (
    SELECT principal, id, seq, state::jsonb, open_turn_id, title, at, head_hash, n::int
      FROM unnest($1::text[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
                  $8::text[])
           WITH ORDINALITY AS h(principal, id, seq, state, open_turn_id, title, at, head_hash, n)
), ins AS (
    INSERT INTO events (principal, conversation_id, seq, position, id, type, data, created_at, hash)
    SELECT h.principal, h.id, e.seq, (pg_current_xact_id()::text::bigint << {INDEX_BITS}) + e.idx,
           e.id, e.type, e.data::jsonb, h.at, e.hash
      FROM unnest($9::int[], $10::int[], $11::int[], $12::text[], $13::text[], $14::text[], $15::text[])
           AS e(n, seq, idx, id, type, data, hash)
      JOIN h USING (n)
), moved AS (
    UPDATE conversations c
       SET seq = h.seq, state = h.state, updated_at = h.at, head_hash = h.head_hash,
           open_turn_id = h.open_turn_id, title = coalesce(h.title, c.title)
      FROM h
     WHERE c.principal = h.principal AND c.id = h.id
)
SELECT pg_current_xact_id()::text::bigint AS xid,
       (SELECT count(pg_notify('chatlog_events', x)) FROM unnest($16::text[]) AS x) AS notified
"""

# A write this large (a fork's copy, a huge batch) may take longer than a statement is allowed.
_BIG_WRITE = 5000


@dataclass(frozen=True)
class NewEvent:
    """An event to append: its data already has the right shape for its type."""

    type: str
    data: dict
    id: str | None = None
    # `data` as JSON when the caller already encoded it (the API does, to check
    # size and NUL): the insert then does not encode it again
    encoded: bytes | None = None


@dataclass(frozen=True)
class Appended:
    events: list[dict]
    last_seq: int
    retried: bool  # True: an idempotent retry of a stored batch; nothing was written


def new_ids(n: int) -> list[str]:
    """n random (version 4) UUIDs as text, spelled straight from one call for
    randomness (a third of what building uuid.UUID objects costs)."""
    h = os.urandom(16 * n).hex()
    return [f"{h[k:k + 8]}-{h[k + 8:k + 12]}-4{h[k + 13:k + 16]}-{_VARIANT[h[k + 16]]}{h[k + 17:k + 20]}-{h[k + 20:k + 32]}"
            for k in range(0, 32 * n, 32)]


_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}  # RFC 4122's variant bits 10xx


@dataclass(eq=False)
class _Write:
    """An accepted append: its events, where they go, and (after statement 3) how they were stored."""

    head: "_Head"
    events: list[NewEvent]
    first_seq: int
    first_index: int
    ids: list[str]
    hashes: list[str]
    stored: list[dict] = field(default_factory=list)

    @property
    def conversation_id(self) -> uuid.UUID:
        return self.head.conversation_id


@dataclass(eq=False)
class _Head:
    """One conversation of the group, as the appends before the current one left it."""

    principal: str
    conversation_id: uuid.UUID
    seq: int
    state: dict
    at: datetime  # its events' created_at: statement 1's time, or its last write time if the clock went back
    hash: str | None  # the hash of its last event (the head of its chain)
    stored: dict[str, Any] = field(default_factory=dict)  # probed event id -> stored row
    turn_ids: set[str] = field(default_factory=set)  # turn ids used (stored or in this group)
    calls: dict[str, str] = field(default_factory=dict)  # calls no longer live: id -> FINAL or ABANDONED
    mine: dict[str, tuple[_Write, int]] = field(default_factory=dict)  # event id -> written in this group
    writes: list[_Write] = field(default_factory=list)
    open_turn_id: str | None = None
    title: str | None = None  # set by this group (None: unchanged)

    def retry_of(self, events: list[NewEvent]) -> list | None:
        """What this batch repeats (stored rows, or (write, index) of this group), if it is a retry.

        Raises IdempotencyConflict when a given id is already used otherwise.
        """
        ids = [e.id for e in events if e.id is not None]
        if not ids:
            return None
        found: dict[str, Any] = {}
        for i in ids:
            if i in self.mine:
                write, k = self.mine[i]
                found[i] = (write.events[k].type, write.events[k].data, ("mine", write, k))
            elif i in self.stored:
                row = self.stored[i]
                found[i] = (row["type"], row["data"], ("stored", row, None))
        if not found:
            return None
        differing = [e.id for e in events if e.id in found and (found[e.id][0] != e.type or found[e.id][1] != e.data)]
        if differing or sum(i in found for i in ids) != len(events):
            raise IdempotencyConflict(
                "event ids were already used with other content" if differing
                else "some event ids of this batch were already used by another batch",
                ids=differing or [e.id for e in events if e.id in found],
            )
        return [found[e.id][2] for e in events]

    def check(self, events: list[NewEvent], expected_seq: int | None,
              hashing: bool = True) -> tuple[domain.Rules, list[bytes]]:
        """The rule state after `events` and their data as the chain hashes it
        (JCS), or the refusal (nothing of this head changes either way)."""
        if expected_seq is not None and expected_seq != self.seq:
            raise SeqConflict(f"expected_seq is {expected_seq} but the conversation is at seq {self.seq}",
                              current_seq=self.seq)
        if self.hash is None and hashing:
            raise Unavailable(f"conversation {self.conversation_id} has no head hash yet: the hash chain's backfill "
                              "(chatlog migrate) has not finished; nothing was written")
        known = domain.Known(turn_ids=frozenset(self.turn_ids), calls=self.calls)
        conversation = domain.resume(self.state, known)
        datas = []
        for index, new in enumerate(events):
            try:
                domain.check(conversation, new.type, new.data)
                datas.append(chain.canonical_new(new.data) if hashing else b"")
            except domain.RuleBroken as broken:
                raise InvalidEvent.at(index, new.type, broken.rule, broken.message) from None
            except chain.UnsafeNumber as unsafe:
                raise InvalidEvent.at(index, new.type, "safe_numbers", f"data.{unsafe}") from None
        return conversation, datas

    def accept(self, tx: Transaction, events: list[NewEvent], checked: tuple[domain.Rules, list[bytes]],
               hashing: bool = True) -> _Write:
        conversation, datas = checked
        ids = [e.id for e in events]
        if None in ids:
            fresh = iter(new_ids(ids.count(None)))
            ids = [i if i is not None else next(fresh) for i in ids]
        hashes = []
        if hashing:
            cid, at, prev = str(self.conversation_id), rfc3339(self.at), self.hash
            for k, (new, data) in enumerate(zip(events, datas)):
                prev = chain.link(prev, chain.event_bytes(cid, self.seq + 1 + k, ids[k], new.type, data, at))
                hashes.append(prev)
            self.hash = prev
        else:  # the bench's side-by-side measurement only (Store(hash_chain=False)): no chain at all
            hashes = [chain.ZERO] * len(events)
        write = _Write(self, events, self.seq + 1, tx.take(len(events)), ids, hashes)
        for k, i in enumerate(ids):
            self.mine[i] = (write, k)
        self.writes.append(write)
        self.seq += len(events)
        self.state = domain.to_state(conversation)
        self.open_turn_id = conversation.open_turn_id
        if conversation.title is not None:
            self.title = conversation.title
        self.turn_ids |= conversation.turn_ids
        self.calls = {**self.calls, **{c: status for c, (_, status) in conversation.calls.items()
                                       if status in (domain.FINAL, domain.ABANDONED)}}
        return write


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(eq=False)
class Append(Batched):
    """One append, as the writer runs it: with the other appends of its group (`run_all`)."""

    principal: str
    conversation_id: uuid.UUID
    events: list[NewEvent]
    expected_seq: int | None = None
    hashing: bool = True  # False only for the bench's measurement of what the chain costs

    @classmethod
    async def run_all(cls, tx: Transaction, ops: list["Append"]) -> list[tuple[bool, Any]]:
        heads = await _read(tx, ops)
        outcomes: list[Any] = []  # a _Write, ("retry", head, parts) or a refusal
        for op in ops:
            head = heads.get((op.principal, op.conversation_id))
            try:
                if head is None:
                    raise NotFound(f"conversation {op.conversation_id} was not found")
                retry = head.retry_of(op.events)
                if retry is not None:
                    outcomes.append(("retry", head, retry))
                    continue
                outcomes.append(head.accept(tx, op.events, head.check(op.events, op.expected_seq, op.hashing),
                                            op.hashing))
            except StoreError as refused:
                outcomes.append(refused)
        written = [h for h in heads.values() if h.writes]
        if written:
            await _write(tx, written)
        return [_answer(o) for o in outcomes]


def _answer(outcome: Any) -> tuple[bool, Any]:
    if isinstance(outcome, StoreError):
        return False, outcome
    if isinstance(outcome, _Write):
        return True, Appended(outcome.stored, outcome.stored[-1]["seq"], retried=False)
    _, head, parts = outcome
    cid = str(head.conversation_id)
    events = [where.stored[k] if source == "mine" else _stored_row(cid, where) for source, where, k in parts]
    return True, Appended(events, max(e["seq"] for e in events), retried=True)


def _stored_row(conversation_id: str, row: Any) -> dict:
    return {"conversation_id": conversation_id, "seq": row["seq"], "position": row["position"], "id": row["id"],
            "type": row["type"], "data": row["data"], "created_at": rfc3339(row["at"]), "hash": row["hash"]}


async def _read(tx: Transaction, ops: list[Append]) -> dict[tuple[str, uuid.UUID], _Head]:
    """Statement 1: the heads of the conversations `ops` name, locked, with their probes."""
    numbers: dict[tuple[str, uuid.UUID], int] = {}
    probes: dict[str, tuple[list[int], list[str]]] = {"event": ([], []), "turn": ([], []), "call": ([], [])}
    seen: set[tuple[str, int, str]] = set()

    def probe(kind: str, n: int, value: str) -> None:
        if (kind, n, value) not in seen:
            seen.add((kind, n, value))
            probes[kind][0].append(n)
            probes[kind][1].append(value)

    for op in ops:
        n = numbers.setdefault((op.principal, op.conversation_id), len(numbers) + 1)
        for e in op.events:
            if e.id is not None:
                probe("event", n, e.id)
        turns, calls = domain.ids_named([(e.type, e.data) for e in op.events])
        for turn in turns:
            probe("turn", n, turn)
        for call in calls:
            probe("call", n, call)
    keys = list(numbers)
    rows = await tx.conn.fetch(_READ, [k[0] for k in keys], [k[1] for k in keys],
                               *probes["event"], *probes["turn"], *probes["call"])
    heads: dict[int, _Head] = {}
    for row in rows:
        if row["kind"] == "head":
            principal, cid = keys[row["n"] - 1]
            heads[row["n"]] = _Head(principal, cid, row["seq"], row["state"], max(row["now"], row["at"]), row["hash"])
    for row in rows:
        head = heads.get(row["n"])
        if head is None:
            continue
        kind = row["kind"]
        if kind == "event":
            head.stored[row["id"]] = row
        elif kind == "turn":
            head.turn_ids.add(row["id"])
        elif kind == "call":
            head.calls[row["id"]] = domain.FINAL if row["final"] else domain.ABANDONED
    for head in heads.values():
        if head.state["open_turn_id"]:
            head.turn_ids.add(head.state["open_turn_id"])
    return {(h.principal, h.conversation_id): h for h in heads.values()}


async def _write(tx: Transaction, heads: list[_Head]) -> None:
    """Statement 3: every accepted event, every moved head, every notification; fills in `stored`."""
    h_cols: tuple[list, ...] = ([], [], [], [], [], [], [], [])
    e_cols: tuple[list, ...] = ([], [], [], [], [], [], [])
    total = 0
    for n, head in enumerate(heads, start=1):
        for column, value in zip(h_cols, (head.principal, head.conversation_id, head.seq, _dumps(head.state),
                                          head.open_turn_id, head.title, head.at, head.hash)):
            column.append(value)
        for write in head.writes:
            events = write.events
            total += len(events)
            e_cols[0].extend([n] * len(events))
            e_cols[1].extend(range(write.first_seq, write.first_seq + len(events)))
            e_cols[2].extend(range(write.first_index, write.first_index + len(events)))
            e_cols[3].extend(write.ids)
            e_cols[4].extend([e.type for e in events])
            e_cols[5].extend([e.encoded.decode() if e.encoded is not None else _dumps(e.data) for e in events])
            e_cols[6].extend(write.hashes)
        tx.notifications.append(f"{head.conversation_id}:{head.writes[0].first_seq}:{head.seq}:{head.principal}")
    notifications, tx.notifications = tx.notifications, []
    row = await tx.conn.fetchrow(_WRITE, *h_cols, *e_cols, notifications,
                                 timeout=None if total < _BIG_WRITE else 60.0)
    base = row["xid"] << INDEX_BITS
    first = heads[0].writes[0]
    tx.wrote(first.head.principal, first.head.conversation_id, first.first_seq, base + first.first_index)
    for head in heads:
        moment = rfc3339(head.at)
        cid = str(head.conversation_id)
        for write in head.writes:
            idx, seq = base + write.first_index, write.first_seq
            write.stored = [
                {"conversation_id": cid, "seq": seq + k, "position": idx + k, "id": write.ids[k], "type": e.type,
                 "data": e.data, "created_at": moment, "hash": write.hashes[k]}
                for k, e in enumerate(write.events)]
