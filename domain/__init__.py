"""Pure domain: the conversation aggregate and its events. No I/O here."""

from domain.conversation import (ABANDONED, FINAL, Conversation, Known, Rules, apply, check, create, from_state, ids_named,
                                 resume, to_state)
from domain.errors import RuleBroken
from domain.schemas import EVENT_TYPES, TURN_ENDS, VOCABULARY, InvalidData, check_data

__all__ = ["ABANDONED", "Conversation", "EVENT_TYPES", "FINAL", "InvalidData", "Known", "RuleBroken", "Rules", "TURN_ENDS",
           "VOCABULARY", "apply", "check", "check_data", "create", "from_state", "ids_named", "resume", "to_state"]
