"""Shutdown that ends streams instead of waiting for them.

uvicorn stops on SIGTERM/SIGINT by closing its listening socket and waiting
until every response has finished, and an SSE response never finishes by
itself: the process would wait for its clients forever. So when the signal
arrives, `on_signal` also runs (chained in front of uvicorn's handler): the
store ends every live stream at once (its clients resume with Last-Event-ID
on another process), while requests in flight, appends included, finish
normally; then the lifespan closes the store, which lets the group commits
still queued commit before it stops (store/writer.py GroupWriter.close).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Callable

log = logging.getLogger("chatlog")


def chain_exit_signals(on_signal: Callable[[], None]) -> Callable[[], None]:
    """Run `on_signal` in the event loop on SIGTERM/SIGINT, then the handler
    that was there (uvicorn's). Returns a function that restores it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach the main thread only: not a server process
    loop = asyncio.get_running_loop()
    previous = {}

    def handler(signum, frame):
        loop.call_soon_threadsafe(on_signal)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before)

    return restore
