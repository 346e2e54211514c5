"""What the store refuses, in the contract's terms. The API maps each to a status."""

from __future__ import annotations


class StoreError(Exception):
    code = "store_error"

    def __init__(self, message: str, **details) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(StoreError):
    code = "not_found"


class ConversationExists(StoreError):
    code = "conversation_exists"


class SeqConflict(StoreError):
    code = "seq_conflict"


class IdempotencyConflict(StoreError):
    code = "idempotency_conflict"


class InvalidEvent(StoreError):
    code = "invalid_event"


class Unavailable(StoreError):
    code = "store_unavailable"


class OutOfRange(StoreError):
    code = "out_of_range"
