"""Erasure: DELETE /v1/conversations/{id}, and the 410 that follows it.

The work is one SQL function, `chatlog_erase_conversation` (migration 012):
it takes the conversation's write locks, writes the tombstone, deletes the
events (the only DELETE the append-only guard lets through), the snapshots,
the runner's rows and the conversations row, and NOTIFYs `chatlog_erased`,
all in one transaction. This module calls it and answers for the ids it left
behind.

The 410 costs nothing on the way of a live conversation: every read and
write finds its conversations row as before, and only when the row is not
there does `missing` look for a tombstone, to tell "erased" (410, to its
owner) from "never existed, or not yours" (404). Tombstones are keyed by
principal too, so another tenant's erased id is, to anyone else, unknown.
"""

from __future__ import annotations

import uuid

import asyncpg

from store.errors import ConversationErased, NotFound, OutcomeUnknown
from store.pool import CONNECTION_ERRORS, Pool
from store.rows import rfc3339

# NOTIFY channel of the erase function: payload '<conversation id>:<principal>'
CHANNEL = "chatlog_erased"

# Erasing a long conversation deletes every event (measured: 100,000 events in
# about 0.4 s); it may also wait for the appends in flight on it.
ERASE_TIMEOUT = 120.0

_TOMBSTONE = """SELECT erased_at, event_count, last_seq, head_hash FROM erased_conversations
                 WHERE principal = $1 AND conversation_id = $2"""


def tombstone_dict(conversation_id: uuid.UUID, row: asyncpg.Record) -> dict:
    """A tombstone as the API shows it: no content, only what the log held."""
    return {"conversation_id": str(conversation_id), "erased_at": rfc3339(row["erased_at"]),
            "event_count": row["event_count"], "last_seq": row["last_seq"], "head_hash": row["head_hash"]}


async def tombstone(pool: Pool, principal: str, conversation_id: uuid.UUID) -> dict | None:
    row = await pool.fetchrow(_TOMBSTONE, principal, conversation_id)
    return None if row is None else tombstone_dict(conversation_id, row)


async def missing(pool: Pool, principal: str, conversation_id: uuid.UUID, message: str | None = None) -> NotFound:
    """What to raise when the principal's conversation row is not there:
    ConversationErased (with its tombstone) if it was erased, else NotFound
    (with `message`, when the caller looked for something inside it)."""
    erased = await tombstone(pool, principal, conversation_id)
    if erased is not None:
        return ConversationErased(f"conversation {conversation_id} was erased at {erased['erased_at']}", **erased)
    return NotFound(message or f"conversation {conversation_id} was not found")


async def erase(pool: Pool, principal: str, conversation_id: uuid.UUID) -> dict:
    """Erase the conversation; its tombstone. ConversationErased when it
    already was, NotFound when the principal has no such conversation.

    One statement in its own transaction. Lost midway (the connection went,
    the bound passed), it may or may not have committed: OutcomeUnknown, and
    a DELETE again settles it (410 conversation_erased: it was)."""
    async with pool.acquire() as conn:
        try:
            row = await conn.fetchrow("SELECT * FROM chatlog_erase_conversation($1, $2)", principal, conversation_id,
                                      timeout=ERASE_TIMEOUT)
        except CONNECTION_ERRORS as exc:
            raise OutcomeUnknown(
                "the event store went away while this erasure ran; DELETE again to settle it "
                "(410 conversation_erased means it was done)", outcome="unknown", reason=type(exc).__name__) from exc
    if row["conversation_id"] is None:  # the function's NULL: nothing of this principal to erase
        raise await missing(pool, principal, conversation_id)
    return tombstone_dict(conversation_id, row)
