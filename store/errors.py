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
    """PostgreSQL cannot be reached (or not in time); nothing of the request was written."""

    code = "store_unavailable"


class OutcomeUnknown(Unavailable):
    """The store went away while a COMMIT was in flight and stayed away past the
    bound: the write may or may not have committed. A retry with the same event
    ids settles it (it is answered 200 with the stored events if it had)."""

    code = "store_unavailable"


class OutOfRange(StoreError):
    code = "out_of_range"
