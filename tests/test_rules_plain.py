"""The store checks batches on a plain `domain.Rules` (no library event object per event): it must
accept and refuse exactly what the eventsourcing aggregate does, for the same rule, and leave the
same saved state."""

from __future__ import annotations

import uuid

from hypothesis import given, settings

import domain
from tests.strategies import event_sequences_with_one_invalid

CID = uuid.UUID(int=7)


@settings(max_examples=300, deadline=None)
@given(event_sequences_with_one_invalid(max_events=60))
def test_plain_rules_accept_and_refuse_exactly_what_the_aggregate_does(case):
    events, bad = case
    if bad == 0:  # the first event is not conversation.created: nothing to resume
        return
    aggregate = domain.create(CID, events[0]["data"])
    plain = domain.resume(domain.to_state(aggregate))
    for i, event in enumerate(events[1:], start=1):
        refusals = []
        for apply, target in ((domain.apply, aggregate), (domain.check, plain)):
            try:
                apply(target, event["type"], event["data"])
                refusals.append(None)
            except domain.RuleBroken as refused:
                refusals.append(refused.rule)
        assert refusals[0] == refusals[1], (i, event, refusals)
        assert domain.to_state(plain) == domain.to_state(aggregate)
        assert (plain.open_turn_id, plain.title, plain.turn_ids) == (aggregate.open_turn_id, aggregate.title,
                                                                     aggregate.turn_ids)
        if i == bad:
            assert refusals[0] is not None
            break
