"""Pure domain: the conversation aggregate and its events. No I/O here."""

from domain.conversation import ABANDONED, FINAL, Conversation, Known, apply, create, from_state, ids_named, to_state
from domain.errors import RuleBroken
from domain.schemas import EVENT_TYPES, TURN_ENDS, VOCABULARY, InvalidData, check_data

__all__ = ["ABANDONED", "Conversation", "EVENT_TYPES", "FINAL", "InvalidData", "Known", "RuleBroken", "TURN_ENDS",
           "VOCABULARY", "apply", "check_data", "create", "from_state", "ids_named", "to_state"]
