"""GET /metrics on real `chatlog serve` processes: it scrapes without a key,
parses with prometheus_client's own parser, names every documented metric with
its HELP, and its counters move with what a user does (appends, a stream, a
feed read, a turn against the fake upstream, a failed turn); with two workers
every scrape, whichever worker answers, counts the requests of both."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.helpers import eventually
from tests.servers import ChatlogServer

pytest_plugins = ("tests.servers",)

APPEND_ROUTE = "/v1/conversations/{conversation_id}/events"

# name (as the parser names the family), type: the README's "Operating" list
DOCUMENTED = {
    "chatlog_appends": "counter",
    "chatlog_events_appended": "counter",
    "chatlog_group_commit_appends": "histogram",
    "chatlog_group_commit_events": "histogram",
    "chatlog_commit_seconds": "histogram",
    "chatlog_commit_outcome_checks": "counter",
    "chatlog_sse_streams": "gauge",
    "chatlog_listener_tails": "gauge",
    "chatlog_listener_reconnects": "counter",
    "chatlog_feed_watermark_lag_transactions": "histogram",
    "chatlog_fold_reads": "counter",
    "chatlog_runner_turns_ended": "counter",
    "chatlog_runner_turns": "gauge",
    "chatlog_turn_requests_queued": "gauge",
    "chatlog_upstream_first_chunk_seconds": "histogram",
    "chatlog_upstream_errors": "counter",
    "chatlog_http_requests": "counter",
    "chatlog_http_request_seconds": "histogram",
}


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def scrape(server: ChatlogServer) -> Scrape:
    # no key: /metrics is served outside /v1, like /healthz
    async with server.client(principal=None) as anonymous:
        r = await anonymous.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return Scrape(r.text)


async def new_conversation(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/conversations", json={})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def user(content: str) -> dict:
    return {"type": "message.user", "data": {"content": content}}


async def until_turn(client: httpx.AsyncClient, cid: str, turn_id: str, status: str) -> None:
    async def ended():
        r = await client.get(f"/v1/conversations/{cid}/turns/{turn_id}")
        return r.json()["status"] == status or None
    await eventually(ended, f"turn {turn_id} to be {status}", timeout=30)


async def test_metrics_scrape_parse_and_move_with_what_users_do(start_server, fake):
    server = await start_server("metrics", CHATLOG_UPSTREAM_BASE_URL=fake.url, CHATLOG_UPSTREAM_API_KEY="sk-fake",
                                CHATLOG_MODEL="fake")
    before = await scrape(server)
    for name, kind in DOCUMENTED.items():
        assert name in before.families, f"{name} is not exposed"
        assert before.families[name].type == kind, (name, before.families[name].type)
        assert before.families[name].documentation, f"{name} has no HELP"
    assert before.value("chatlog_turn_requests_queued") >= 0

    async with server.client() as alice:
        cid = await new_conversation(alice)
        for i in range(5):  # the hot path (api/hot_path.py): served outside FastAPI's router, counted all the same
            r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": [user(f"m{i}")]})
            assert r.status_code == 201, r.text
        r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": [user("a"), user("b"), user("c")]})
        assert r.status_code == 201, r.text
        # refused by the log: the conversation has moved past seq 2
        r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": [user("late")], "expected_seq": 2})
        assert r.status_code == 409, r.text
        assert (await alice.get("/v1/events")).status_code == 200  # a feed read
        assert (await alice.get(f"/v1/conversations/{cid}/messages")).status_code == 200  # a fold read

        after = await scrape(server)
        assert after.value("chatlog_appends_total", outcome="committed") - \
            before.value("chatlog_appends_total", outcome="committed") == 7  # the creation and 6 appends
        assert after.value("chatlog_appends_total", outcome="refused") - \
            before.value("chatlog_appends_total", outcome="refused") == 1
        assert after.value("chatlog_events_appended_total") - before.value("chatlog_events_appended_total") == 1 + 5 + 3
        assert after.value("chatlog_group_commit_appends_count") - before.value("chatlog_group_commit_appends_count") >= 1
        assert after.value("chatlog_group_commit_events_sum") - before.value("chatlog_group_commit_events_sum") == 9
        assert after.value("chatlog_commit_seconds_count") > before.value("chatlog_commit_seconds_count")
        assert after.value("chatlog_http_requests_total", method="POST", route=APPEND_ROUTE, status="201") - \
            before.value("chatlog_http_requests_total", method="POST", route=APPEND_ROUTE, status="201") == 6
        assert after.value("chatlog_http_requests_total", method="POST", route=APPEND_ROUTE, status="409") - \
            before.value("chatlog_http_requests_total", method="POST", route=APPEND_ROUTE, status="409") == 1
        assert after.value("chatlog_http_request_seconds_count", method="POST", route=APPEND_ROUTE) - \
            before.value("chatlog_http_request_seconds_count", method="POST", route=APPEND_ROUTE) == 7
        assert after.value("chatlog_http_requests_total", route="/v1/events", status="200") > \
            before.value("chatlog_http_requests_total", route="/v1/events", status="200")
        assert after.value("chatlog_feed_watermark_lag_transactions_count") > \
            before.value("chatlog_feed_watermark_lag_transactions_count")
        assert after.value("chatlog_fold_reads_total", fold="history") > before.value("chatlog_fold_reads_total",
                                                                                      fold="history")
        # the path never becomes a label: one series per route template
        assert not [s for s in after.samples if cid in str(s.labels)]

        # an open stream, and the tail that follows its conversation
        async with alice.stream("GET", f"/v1/conversations/{cid}/stream") as stream:
            assert stream.status_code == 200
            during = await scrape(server)
            assert during.value("chatlog_sse_streams") == 1
            assert during.value("chatlog_listener_tails") == 1

        async def closed():
            return (await scrape(server)).value("chatlog_sse_streams") == 0 or None
        await eventually(closed, "the closed stream to leave the gauge", timeout=15)

        # a turn against the fake upstream, then one the upstream refuses
        r = await alice.post(f"/v1/conversations/{cid}/turns",
                             json={"message": {"role": "user", "content": "hello [fake:say Hi there.]"}})
        assert r.status_code in (200, 202), r.text
        await until_turn(alice, cid, r.json()["turn_id"], "finished")
        r = await alice.post(f"/v1/conversations/{cid}/turns",
                             json={"message": {"role": "user", "content": "[fake:error 400]"}})
        assert r.status_code in (200, 202), r.text
        await until_turn(alice, cid, r.json()["turn_id"], "failed")

    async def turns_counted():
        now = await scrape(server)
        ended = {o: now.value("chatlog_runner_turns_ended_total", outcome=o) -
                 before.value("chatlog_runner_turns_ended_total", outcome=o) for o in ("finished", "failed")}
        return now if ended == {"finished": 1, "failed": 1} else None
    now = await eventually(turns_counted, "both turns to be counted as ended", timeout=15)
    assert now.value("chatlog_upstream_first_chunk_seconds_count") - \
        before.value("chatlog_upstream_first_chunk_seconds_count") == 1
    assert now.value("chatlog_upstream_errors_total", status="400", kind="status") - \
        before.value("chatlog_upstream_errors_total", status="400", kind="status") == 1
    # sampled from the database at the scrape: nothing runs or waits now
    assert now.value("chatlog_runner_turns", status="running") == 0
    assert now.value("chatlog_runner_turns", status="waiting_for_tools") == 0
    assert now.value("chatlog_turn_requests_queued") == 0


def _metrics_dir_of(server: ChatlogServer) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR `chatlog serve` made, read from a worker's environment."""
    for child in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError("no worker has PROMETHEUS_MULTIPROC_DIR")


def _appends_per_worker(directory: Path) -> dict[str, float]:
    """chatlog_appends_total{outcome=committed} in each worker's own file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    for path in directory.glob("counter_*.db"):
        counts[path.stem.removeprefix("counter_")] = sum(
            s.value for m in MultiProcessCollector.merge([str(path)]) for s in m.samples
            if s.name == "chatlog_appends_total" and s.labels.get("outcome") == "committed")
    return counts


async def test_two_workers_every_scrape_counts_both(start_server):
    server = await start_server("two-workers", CHATLOG_WORKERS="2")
    directory = _metrics_dir_of(server)
    assert directory.is_dir() and not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    async with server.client() as alice:
        cid = await new_conversation(alice)
    writes = 1

    async def both_workers_wrote():
        nonlocal writes
        # a new connection each: the workers take turns accepting them
        async with server.client() as alice:
            r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": [user("x")]})
            assert r.status_code == 201, r.text
        writes += 1
        per_worker = _appends_per_worker(directory)
        return per_worker if len([v for v in per_worker.values() if v > 0]) == 2 else None
    await eventually(both_workers_wrote, "both workers to serve an append", timeout=30)
    assert sum(_appends_per_worker(directory).values()) == writes

    # whichever worker answers a scrape, it counts every worker's appends
    for _ in range(8):
        now = await scrape(server)
        assert now.value("chatlog_appends_total", outcome="committed") == writes
        assert now.value("chatlog_http_requests_total", method="POST", route=APPEND_ROUTE, status="201") == writes - 1
    # an open stream on one worker is counted once, whoever is asked
    async with server.client() as alice, alice.stream("GET", f"/v1/conversations/{cid}/stream") as stream:
        assert stream.status_code == 200
        for _ in range(4):
            assert (await scrape(server)).value("chatlog_sse_streams") == 1
    await server.stop()
    # the temporary directory goes with the server
    await eventually(lambda: not directory.exists() or None, "the metrics directory to be removed", timeout=10)
