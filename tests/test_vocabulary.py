"""One event vocabulary (domain/schemas.py VOCABULARY) that every layer reads."""

from __future__ import annotations

from domain.conversation import COMMANDS
from domain.schemas import DELTAS, SCHEMAS, TURN_ENDS, VOCABULARY
from projections import history, ui


def test_every_event_type_has_a_rule_and_the_projections_know_only_real_types():
    # conversation.created is made by creating a conversation, never appended
    assert set(COMMANDS) == set(VOCABULARY) - {"conversation.created"}
    assert set(SCHEMAS) == set(VOCABULARY)
    assert set(history._HANDLERS) <= set(VOCABULARY)
    assert set(ui._HANDLERS) <= set(VOCABULARY)


def test_deltas_and_turn_ends_are_declared_once_and_handled_by_every_fold():
    assert DELTAS == {"text.delta": "turn_id", "reasoning.delta": "turn_id", "tool_call.delta": "tool_call_id"}
    assert TURN_ENDS == {"turn.finished", "turn.cancelled", "turn.failed"}
    for type_ in (*DELTAS, *TURN_ENDS):
        assert type_ in history._HANDLERS and type_ in ui._HANDLERS
