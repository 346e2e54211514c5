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


class ConversationErased(NotFound):
    """The principal's conversation was erased (DELETE): gone for good, 410
    for its owner. A NotFound still, to every caller that only asks whether
    the conversation is there; details are its tombstone (store/erasure.py)."""

    code = "conversation_erased"


class ConversationExists(StoreError):
    code = "conversation_exists"


class ErasedIdReused(ConversationExists):
    """Creating (or forking into) the id of an erased conversation: an id is never used twice."""

    code = "conversation_erased"


class SeqConflict(StoreError):
    code = "seq_conflict"


class IdempotencyConflict(StoreError):
    code = "idempotency_conflict"


class InvalidEvent(StoreError):
    """One event of a batch breaks a rule (its shape, or the domain's); nothing of the batch is written."""

    code = "invalid_event"

    @classmethod
    def at(cls, index: int, type_: str | None, rule: str, message: str, **details) -> "InvalidEvent":
        """The one way an `invalid_event` answer is built (API checks and store rules alike)."""
        where = f"event {index} ({type_})" if type_ else f"event {index}"
        extra = {"type": type_} if type_ else {}
        return cls(f"{where} breaks a rule: {message}", index=index, rule=rule, **extra, **details)


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
