"""Stored rows as the contract shows them."""

from __future__ import annotations

from datetime import datetime, timezone

import asyncpg


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


EVENT_COLUMNS = "conversation_id::text AS conversation_id, seq, position, id, type, data, created_at, hash"


def event_dict(row: asyncpg.Record | dict) -> dict:
    return {
        "conversation_id": row["conversation_id"],
        "seq": row["seq"],
        "position": row["position"],
        "id": row["id"],
        "type": row["type"],
        "data": row["data"],
        "created_at": rfc3339(row["created_at"]),
        "hash": row["hash"],
    }


def conversation_dict(row: asyncpg.Record) -> dict:
    return {
        "id": str(row["id"]),
        "seq": row["seq"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "metadata": row["metadata"],
        "title": row["title"],
        "open_turn_id": row["open_turn_id"],
    }


