"""Prometheus metrics: the instruments the store, the runner and the app
update, and the scrape that `GET /metrics` (api/metrics.py) answers with.

The instruments are module globals of the maintained `prometheus_client`
library, updated at the narrowest points (store/writer.py per transaction,
store/listener.py, store/feed.py, store/folds.py, runner/, the HTTP middleware
in api/logs.py). An update is a lock and an add (about a microsecond); the
writer counts a transaction's appends with one update per transaction, not
one per append.

Several processes (`chatlog serve --workers N`): each worker is its own
process with its own counters, and a scrape reaches one of them. So `chatlog
serve` with N > 1 sets PROMETHEUS_MULTIPROC_DIR to a fresh temporary
directory before the workers start: the library then keeps every value in a
per-process file there, and a scrape of any worker sums (or, for the gauges
of live things, sums over live processes) the files of all of them. This
must be set before `prometheus_client` is first imported in a process, which
the workers, started fresh, satisfy.

Gauges that describe the database rather than a process (turns queued,
running, waiting for tools) are not kept at all: a scrape samples them with
one cheap query (`sample_database`), the same answer whichever worker serves.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("chatlog.metrics")

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
disable_created_metrics()  # no `_created` series beside every counter and histogram: noise for a scraper

# -- the log (store/writer.py) ------------------------------------------------------

APPENDS = Counter(
    "chatlog_appends", "Writes to the log (appends; creations and forks, which write events too), by outcome: "
    "committed, refused (a rule or a conflict: nothing written), unavailable (nothing written, retry), unknown "
    "(COMMIT's reply lost and its outcome not found in time: 503 outcome unknown), error.", ["outcome"])
APPENDS_COMMITTED = APPENDS.labels("committed")
APPENDS_REFUSED = APPENDS.labels("refused")
EVENTS = Counter("chatlog_events_appended", "Events committed to the log.")
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
GROUP_APPENDS = Histogram(
    "chatlog_group_commit_appends", "Appends committed per transaction (group commit: under load, many appends "
    "share one transaction).", buckets=_SIZES)
GROUP_EVENTS = Histogram("chatlog_group_commit_events", "Events committed per transaction.", buckets=_SIZES)
COMMIT_SECONDS = Histogram(
    "chatlog_commit_seconds", "One group-commit transaction, BEGIN to COMMIT's reply.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
OUTCOME_CHECKS = Counter(
    "chatlog_commit_outcome_checks", "COMMITs whose reply was lost, looked up (pg_xact_status): committed, aborted "
    "(run again) or unknown.", ["result"])

# -- live streams (store/listener.py, the HTTP middleware) --------------------------------

SSE_STREAMS = Gauge("chatlog_sse_streams", "Server-sent event responses open now.", multiprocess_mode="livesum")
TAILS = Gauge("chatlog_listener_tails", "Conversations followed live (one tail each, shared by its streams).",
              multiprocess_mode="livesum")
LISTENER_RECONNECTS = Counter(
    "chatlog_listener_reconnects", "Times the LISTEN connection was lost and made again (followed conversations are "
    "re-checked, nothing is missed).")

# -- reads (store/feed.py, store/folds.py) ------------------------------------------------

FEED_LAG = Histogram(
    "chatlog_feed_watermark_lag_transactions", "At each feed read: how many transaction ids the feed's watermark is "
    "behind the newest (log writes still running hold it back; 0: nothing in flight).",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024))
FOLD_READS = Counter(
    "chatlog_fold_reads", "Projection state reads, by fold (history, ui) and source: cache (the state in process, "
    "as is), cache_advanced (the cached state folded forward), snapshot (a stored snapshot and the events after "
    "it), events (no snapshot: folded from the first event).", ["fold", "source"])

# -- the turn runner (runner/) ------------------------------------------------------------

TURNS_ENDED = Counter(
    "chatlog_runner_turns_ended", "Turns this server ran that ended, by outcome: finished, failed, interrupted, "
    "cancelled, erased, closed (closed in the log by someone else), fenced (taken over after a lost lease).",
    ["outcome"])
UPSTREAM_SECONDS = Histogram(
    "chatlog_upstream_first_chunk_seconds", "Upstream model calls: from sending the request to its first chunk.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 120))
UPSTREAM_ERRORS = Counter(
    "chatlog_upstream_errors", "Failed upstream attempts (retried ones included), by HTTP status ('none': no "
    "answer) and kind: status, timeout, transport, bad_chunk, truncated.", ["status", "kind"])

# -- HTTP (api/logs.py's middleware) ------------------------------------------------------

HTTP_REQUESTS = Counter("chatlog_http_requests", "HTTP requests answered, by method, route template and status.",
                        ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "chatlog_http_request_seconds", "HTTP requests, first byte received to last byte sent, by method and route "
    "template (server-sent event streams excluded: they last as long as the client stays).",
    ["method", "route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


class Timer:
    """time.perf_counter() at creation; `.elapsed()` since."""

    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# -- the scrape ------------------------------------------------------------------------

_SAMPLE = """
SELECT status, count(*)::bigint FROM turn_runs
 WHERE status IN ('queued', 'starting', 'running', 'waiting_for_tools')
 GROUP BY status
"""


async def sample_database(store) -> list[GaugeMetricFamily]:
    """The database-wide gauges, from one query over the partial indexes of
    the live and queued turn rows (none if it fails: the rest still scrapes)."""
    queued = GaugeMetricFamily("chatlog_turn_requests_queued",
                               "Turn requests queued (durably), waiting for a free runner slot or their "
                               "conversation's previous turn; all processes.")
    active = GaugeMetricFamily("chatlog_runner_turns",
                               "Turns begun and not ended, by status: running (starting included) or "
                               "waiting_for_tools; all processes.", labels=["status"])
    try:
        rows = await store.pool.fetch(_SAMPLE)
    except Exception as exc:  # noqa: BLE001 -- a scrape never fails for the database's sake
        log.warning("metrics: could not sample the turn queue: %r", exc)
        return []
    counts = {r[0]: r[1] for r in rows}
    queued.add_metric([], counts.get("queued", 0))
    active.add_metric(["running"], counts.get("running", 0) + counts.get("starting", 0))
    active.add_metric(["waiting_for_tools"], counts.get("waiting_for_tools", 0))
    return [queued, active]


class _Families:
    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


async def scrape(store) -> tuple[bytes, str]:
    """The text exposition (body, content type): every process's instruments
    (this one's, or all workers' in multiprocess mode), then the sampled ones."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        body = generate_latest(REGISTRY)
    sampled = CollectorRegistry(auto_describe=False)
    sampled.register(_Families(await sample_database(store) if store is not None else []))
    return body + generate_latest(sampled), CONTENT_TYPE_LATEST


def process_exited() -> None:
    """Multiprocess mode: this process's live gauges stop counting."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
