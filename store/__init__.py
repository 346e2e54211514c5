"""The asyncpg store: the only code that talks to PostgreSQL."""

from store.errors import (ConversationExists, IdempotencyConflict, InvalidEvent, NotFound, OutcomeUnknown,
                          SeqConflict, StoreError, Unavailable)
from store.rows import rfc3339
from store.store import Appended, NewEvent, Store, create_pool

__all__ = ["Appended", "ConversationExists", "IdempotencyConflict", "InvalidEvent", "NewEvent", "NotFound", "OutcomeUnknown",
           "SeqConflict", "Store", "StoreError", "Unavailable", "create_pool", "rfc3339"]
