"""Feed positions, defined once.

position = (xid << INDEX_BITS) + index: the writing transaction's top-level id,
then the event's place within that transaction. Ordering by position is
ordering by (xid, index), which is what the feed's watermark relies on
(store/feed.py). One transaction therefore holds at most 2^INDEX_BITS events.
"""

INDEX_BITS = 16
MAX_EVENTS_PER_TRANSACTION = 1 << INDEX_BITS

# The advisory lock (two-key form, shared mode) every log-writing transaction
# holds from before it has an xid until it has ended: how the feed tells
# chatlog's writers from any other transaction on the server. "chat", "log ".
WRITER_LOCK = (0x63686174, 0x6C6F6720)


def xid_of(position: int) -> int:
    return position >> INDEX_BITS


def first_position(xid: int) -> int:
    return xid << INDEX_BITS
