"""Pure domain: the conversation aggregate and its events. No I/O here."""

from domain.conversation import Conversation, apply, create, from_state, replay, to_state
from domain.errors import RuleBroken
from domain.schemas import EVENT_TYPES, InvalidData, check_data

__all__ = ["Conversation", "EVENT_TYPES", "InvalidData", "RuleBroken", "apply", "check_data",
           "create", "from_state", "replay", "to_state"]
