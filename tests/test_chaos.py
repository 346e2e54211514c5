"""Exactly once under faults.

What a user relies on, whatever breaks: an acknowledged event is stored
exactly once; nothing is stored twice; a request answered with an error wrote
nothing, except a 503 with `details.outcome: "unknown"`, which a retry with
the same event ids settles; an SSE reader that resumes with Last-Event-ID
sees every event of its conversation exactly once and in order; a feed reader
that passes its last position skips nothing and repeats nothing.

First, one fault at a time at the worst moment (a COMMIT whose reply is lost,
a COMMIT that never arrives, the store gone right then); then a chaos run:
writers (with and without event ids, some with expected_seq racing each
other), SSE readers in both formats that drop and resume at random, a feed
reader, while the harness SIGKILLs `chatlog serve` processes, stops and
crashes PostgreSQL and loses ~15 % of COMMIT replies (servers reach
PostgreSQL through tests/faultproxy.py). Afterwards the whole log is read
from PostgreSQL itself and every answer is checked against it.

CHATLOG_CHAOS_SECONDS sets the length of the load (default 20);
CHATLOG_CHAOS_SEED its randomness (printed, so a run can be repeated).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson
import pytest

from tests.faultproxy import FaultProxy
from tests.helpers import (REQUEST_TIMEOUT, STALL_BOUND, Outages, error_of, events_locked, first_seen,
                           new_conversation, outcome_unknown, stored_log, user_event)
from tests.servers import ChatlogServer, FollowingReader, open_sse

pytest_plugins = ("tests.servers", "tests.pgcluster")

DURATION = float(os.environ.get("CHATLOG_CHAOS_SECONDS", "20"))
SEED = int(os.environ.get("CHATLOG_CHAOS_SEED", str(random.randrange(1 << 30))))
COMMIT_FAULTS = {"reply_lost": 0.10, "commit_lost": 0.05}  # per COMMIT, during the load
PG_STOP_SECONDS = 3.0
SETTLE_WITHIN = 20.0  # s after the load: every writer has its answer
CATCH_UP_WITHIN = 20.0  # s after that: every reader has every event


@pytest.fixture
async def make_proxied(running_cluster, start_server_on):
    """make_proxied(name) -> (server, proxy, database url): one `chatlog serve` (one writer task)
    reaching a fresh database through a fault proxy of its own."""
    proxies: list[FaultProxy] = []

    async def make(name: str) -> tuple[ChatlogServer, FaultProxy, str]:
        url = await running_cluster.create_database()
        proxy = FaultProxy(running_cluster.port, seed=SEED).start_in_thread()
        proxies.append(proxy)
        server = await start_server_on(proxy.url(url.rsplit("/", 1)[1]), name, CHATLOG_WRITERS="1")
        return server, proxy, url

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close_thread()


@pytest.fixture
async def proxied(make_proxied):
    return await make_proxied("proxied")


def marker_of(event: dict) -> str:
    """What identifies an event this suite wrote, even one written without an id."""
    data = event["data"]
    return data.get("content") or data.get("text") or event["id"]


def as_stored(event: dict) -> tuple:
    return event["conversation_id"], event["seq"], event["position"], event["id"], event["type"], event["data"]


async def post(client: httpx.AsyncClient, cid: str, body: dict) -> httpx.Response | None:
    try:
        return await client.post(f"/v1/conversations/{cid}/events", json=body)
    except httpx.TransportError:
        return None


# -- one fault at a time ---------------------------------------------------------------


@pytest.mark.parametrize("with_ids", [True, False], ids=["with ids", "without ids"])
@pytest.mark.parametrize("kind", ["reply_lost", "commit_lost"])
async def test_a_commit_whose_reply_is_lost_is_answered_with_the_truth(proxied, kind, with_ids):
    """The store can still be asked: the server learns what became of its COMMIT and says so."""
    server, proxy, url = proxied
    async with server.client() as client:
        cid = await new_conversation(client)
        marker = f"{kind}-{uuid.uuid4().hex}"
        proxy.arm(kind)
        started = time.monotonic()
        r = await post(client, cid, {"events": [user_event(marker, with_ids)]})
        seconds = time.monotonic() - started
    stored = [e for e in await stored_log(url) if marker_of(e) == marker]
    assert proxy.counts[kind] == 1, "the fault did not happen"
    answer = "no answer" if r is None else f"{r.status_code} {r.text[:200]}"
    print(f"\n{kind}, {'with' if with_ids else 'without'} ids: answered {answer} after {seconds:.2f}s; "
          f"stored {len(stored)} times")
    assert r is not None and r.status_code != 500, f"answered {answer}"
    if r.status_code in (200, 201):
        assert [as_stored(e) for e in r.json()["events"]] == [as_stored(e) for e in stored], (
            f"acknowledged, but stored {len(stored)} times")
    else:
        assert not outcome_unknown(r), "outcome unknown although the store could be asked"
        assert r.status_code == 503 and error_of(r)["code"] == "store_unavailable", answer
        assert stored == [], f"answered {r.status_code}, which promises nothing written, but stored {len(stored)} times"
        assert kind == "commit_lost", "the transaction committed: the answer must say so"


async def test_a_lost_reply_to_a_group_commit_answers_each_append_once(proxied):
    """Group commit: the appends that shared a transaction whose COMMIT reply was lost each get
    the truth, and none is written twice (by re-running it alone, say)."""
    server, proxy, url = proxied
    async with server.client() as client:
        cids = [await new_conversation(client) for _ in range(12)]
        markers = [f"group-{i}-{uuid.uuid4().hex}" for i in range(12)]
        # a table lock (as a migration would take) makes the first append wait inside its
        # transaction, so the others queue up behind it and commit together once it is released
        async with events_locked(url, "SHARE"):
            proxy.arm("reply_lost", count=2)  # the first append's COMMIT and the group's after it
            first = asyncio.create_task(post(client, cids[0], {"events": [user_event(markers[0], True)]}))
            await asyncio.sleep(0.3)
            rest = [asyncio.create_task(post(client, cid, {"events": [user_event(marker, i % 2 == 0)]}))
                    for i, (cid, marker) in enumerate(zip(cids[1:], markers[1:]), 1)]
            await asyncio.sleep(0.3)
        answers = await asyncio.gather(first, *rest)
    stored = Counter(marker_of(e) for e in await stored_log(url))
    problems = []
    for marker, r in zip(markers, answers):
        if r is None:
            problems.append(f"{marker}: no answer")
        elif r.status_code in (200, 201):
            if stored[marker] != 1:
                problems.append(f"{marker}: acknowledged ({r.status_code}) but stored {stored[marker]} times")
        elif r.status_code == 503 and not outcome_unknown(r):
            if stored[marker]:
                problems.append(f"{marker}: answered 503 (nothing written) but stored {stored[marker]} times")
        else:
            problems.append(f"{marker}: answered {r.status_code} {r.text[:120]} although the store could be asked")
    print(f"\ngroup commit with lost replies: {proxy.counts['reply_lost']} replies lost, answers "
          f"{Counter(None if r is None else r.status_code for r in answers)}, "
          f"{sum(n > 1 for n in stored.values())} markers stored twice")
    assert proxy.counts["reply_lost"] >= 1
    assert not problems, "\n".join(problems)


async def test_a_store_gone_during_commit_answers_outcome_unknown_and_a_retry_settles_it(make_proxied):
    """The store goes away right at the COMMIT and stays away: the server cannot learn the
    outcome, says so (503, outcome unknown), and a retry with the same ids settles it.
    Three cases at once (each on its own server and proxy): the answer takes the server's bound."""

    async def case(kind: str, with_ids: bool) -> list[str]:
        server, proxy, url = await make_proxied(f"gone-{kind}-{with_ids}")
        label = f"{kind}, {'with' if with_ids else 'without'} ids"
        async with server.client() as client:
            cid = await new_conversation(client)
            marker = f"gone-{kind}-{uuid.uuid4().hex}"
            body = {"events": [user_event(marker, with_ids)]}
            proxy.arm(kind, then_refuse=True)  # every connection cut, new ones refused
            try:
                started = time.monotonic()
                r = await post(client, cid, body)
                seconds = time.monotonic() - started
            finally:
                proxy.refuse(False)
            answer = "no answer" if r is None else f"{r.status_code} {r.text[:200]}"
            print(f"\nstore gone at COMMIT ({label}): {answer} after {seconds:.2f}s")
            if proxy.counts[kind] != 1:
                return [f"{label}: the fault did not happen"]
            problems = [] if r is not None and outcome_unknown(r) else [
                f"{label}: answered {answer}, not 503 with details.outcome unknown"]
            retry = None
            if with_ids:
                deadline = time.monotonic() + 15  # the retry may meet a server still reconnecting: 503, then again
                while time.monotonic() < deadline:
                    retry = await post(client, cid, body)
                    if retry is not None and retry.status_code in (200, 201):
                        break
                    await asyncio.sleep(0.25)
                expected_status = 200 if kind == "reply_lost" else 201
                if retry is None or retry.status_code != expected_status:
                    problems.append(f"{label}: the retry answered "
                                    f"{None if retry is None else (retry.status_code, retry.text[:200])}, "
                                    f"not {expected_status}")
                    retry = None
        stored = [e for e in await stored_log(url) if marker_of(e) == marker]
        expected = 1 if kind == "reply_lost" or with_ids else 0
        if len(stored) != expected:
            problems.append(f"{label}: stored {len(stored)} times, expected {expected}")
        elif retry is not None and [as_stored(e) for e in retry.json()["events"]] != [as_stored(e) for e in stored]:
            problems.append(f"{label}: the retry's answer is not what is stored")
        return problems

    found = await asyncio.gather(case("reply_lost", True), case("commit_lost", True), case("reply_lost", False))
    problems = [p for problems in found for p in problems]
    assert not problems, "\n".join(problems)


# -- the chaos run ------------------------------------------------------------------------


@dataclass
class Batch:
    """One append as a writer meant it, and every answer it got (retries reuse its ids)."""

    writer: str
    cid: str
    events: list[dict]
    expected_seq: int | None = None
    answers: list[str] = field(default_factory=list)  # "201", "409 seq_conflict", "503 unknown", "none", ...
    acknowledged: list[dict] | None = None  # the stored events of the 2xx answer
    acked_at: float | None = None

    @property
    def markers(self) -> list[str]:
        return [marker_of({"id": e.get("id"), **e}) for e in self.events]

    @property
    def uncertain(self) -> bool:
        """Some answer left the outcome open: no answer, or 503 outcome unknown."""
        return any(a in ("none", "503 unknown") for a in self.answers)


class Chaos:
    """The shared state of one run: servers, clients, what was written and answered."""

    def __init__(self, cluster, proxy: FaultProxy, servers: list[ChatlogServer], rng: random.Random) -> None:
        self.cluster, self.proxy, self.servers, self.rng = cluster, proxy, servers, rng
        self.batches: list[Batch] = []
        self.faults: Counter = Counter()
        self.outages = Outages()
        self.feed_answers: Counter = Counter()
        self.loading = True
        self.settle_by = float("inf")
        self._clients: dict[str, httpx.AsyncClient] = {}

    def client(self, server: ChatlogServer) -> httpx.AsyncClient:
        if server.url not in self._clients:
            self._clients[server.url] = server.client(timeout=REQUEST_TIMEOUT)
        return self._clients[server.url]

    def server(self, turn: int) -> ChatlogServer:
        live = [s for s in self.servers if s.alive] or self.servers
        return live[turn % len(live)]

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients.values()))

    async def send(self, batch: Batch, turn: int) -> httpx.Response | None:
        """One attempt of `batch` on a live server; its answer is recorded."""
        body = {"events": batch.events}
        if batch.expected_seq is not None:
            body["expected_seq"] = batch.expected_seq
        try:
            r = await self.client(self.server(turn)).post(f"/v1/conversations/{batch.cid}/events", json=body)
        except httpx.TransportError:
            batch.answers.append("none")
            return None
        error = error_of(r)
        if r.status_code in (200, 201):
            batch.answers.append(str(r.status_code))
            batch.acknowledged, batch.acked_at = r.json()["events"], time.monotonic()
        elif outcome_unknown(r):
            batch.answers.append("503 unknown")
        else:
            batch.answers.append(f"{r.status_code} {error['code'] if error else r.text[:60]}")
        return r

    async def settle(self, batch: Batch, turn: int) -> bool:
        """Send `batch` until it is acknowledged (retrying with the same ids), refused for good, or too late."""
        self.batches.append(batch)
        while time.monotonic() < self.settle_by:
            r = await self.send(batch, turn)
            if r is not None and r.status_code in (200, 201):
                return True
            if r is not None and r.status_code == 409 and error_of(r)["code"] == "seq_conflict":
                batch.expected_seq = error_of(r)["details"]["current_seq"]  # nothing was written: go again
            elif r is not None and r.status_code not in (503,) and r.status_code < 500:
                return False  # refused for good: recorded, checked afterwards
            else:
                turn += 1  # no answer or 503: try another server
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        return False


def ev(marker: str, type_: str, data: dict) -> dict:
    return {"id": marker, "type": type_, "data": data}


async def turn_writer(chaos: Chaos, name: str, cid: str) -> None:
    """Messages and assistant turns, every event with an id; each batch retried until acknowledged."""
    rng, n = random.Random(chaos.rng.random()), 0
    while chaos.loading:
        n += 1
        turn = f"{name}-turn-{n}"
        batches = [[user_event(f"{name}-{n}-user")], [ev(f"{turn}-start", "turn.started", {"turn_id": turn})]]
        for k in range(rng.randint(1, 3)):
            batches.append([ev(f"{turn}-d{k}-{j}", "text.delta", {"turn_id": turn, "text": f"{turn}-d{k}-{j}"})
                            for j in range(rng.randint(1, 4))])
        batches.append([ev(f"{turn}-end", "turn.finished", {"turn_id": turn, "finish_reason": "stop"})])
        for events in batches:
            if not await chaos.settle(Batch(name, cid, events), n):
                return  # what follows would depend on it; the check reports it
            await asyncio.sleep(rng.uniform(0.0, 0.05))


async def anonymous_writer(chaos: Chaos, name: str, cid: str) -> None:
    """Messages without ids: one attempt each (a retry would be a new message); the marker is the content."""
    rng, n = random.Random(chaos.rng.random()), 0
    while chaos.loading:
        n += 1
        batch = Batch(name, cid, [user_event(f"{name}-{n}-{i}", with_id=False) for i in range(rng.randint(1, 2))])
        chaos.batches.append(batch)
        await chaos.send(batch, n)
        await asyncio.sleep(rng.uniform(0.02, 0.1))


async def racing_writer(chaos: Chaos, name: str, cid: str) -> None:
    """Messages with ids and expected_seq, racing another such writer on the same conversation."""
    rng, n, expected = random.Random(chaos.rng.random()), 0, 1
    while chaos.loading:
        n += 1
        batch = Batch(name, cid, [user_event(f"{name}-{n}-{i}") for i in range(rng.randint(1, 2))], expected)
        if not await chaos.settle(batch, n):
            return
        expected = batch.acknowledged[-1]["seq"]
        await asyncio.sleep(rng.uniform(0.0, 0.05))


async def feed_reader(chaos: Chaos, got: list[dict], done) -> None:
    """GET /v1/events?after_position= from wherever answers, always passing the last position received."""
    rng, after, turn = random.Random(chaos.rng.random()), 0, 0
    while not done(after):
        try:
            r = await chaos.client(chaos.server(turn)).get(
                "/v1/events", params={"after_position": after, "limit": rng.choice([7, 50, 1000])})
        except httpx.TransportError:
            r = None
        chaos.feed_answers["none" if r is None else str(r.status_code)] += 1
        if r is not None and r.status_code == 200:
            body = r.json()
            got.extend(body["events"])
            after = body["last_position"]
        else:
            turn += 1
        await asyncio.sleep(rng.uniform(0.02, 0.15))


async def restart(chaos: Chaos, server: ChatlogServer) -> None:
    """Start a killed server again. `chatlog serve` exits when its start-up migrations fail, as a
    supervisor would restart it: COMMIT faults pause meanwhile, so it starts at the first try."""
    faults, chaos.proxy.commit_faults = chaos.proxy.commit_faults, {}
    try:
        await server.start(timeout=20)
    finally:
        chaos.proxy.commit_faults = faults


async def inflict(chaos: Chaos, until: float) -> None:
    """The harness's faults, one after another until the load ends: each kind once, in this
    order, then (in a longer run) at random."""
    kinds = ["sigkill", "pg_restart_fast", "cut_all", "pg_stop", "sigkill", "pg_restart_immediate"]
    gap = (until - time.monotonic()) / (len(kinds) + 1)
    for i in range(10_000):
        await asyncio.sleep(min(gap, 4.0) * chaos.rng.uniform(0.4, 0.7))
        if time.monotonic() > until - 1.0:
            return
        kind = kinds[i] if i < len(kinds) else chaos.rng.choice(kinds)
        if kind == "sigkill":
            server = chaos.rng.choice([s for s in chaos.servers if s.alive])
            server.kill9()
            await asyncio.sleep(chaos.rng.uniform(0.3, 1.0))
            await restart(chaos, server)
        elif kind == "cut_all":
            chaos.proxy.cut_all()
        else:
            async with chaos.outages.down():
                if kind == "pg_stop":
                    await chaos.cluster.stop("fast")
                    try:
                        await asyncio.sleep(PG_STOP_SECONDS)
                    finally:
                        await chaos.cluster.start()
                else:
                    await chaos.cluster.restart("fast" if kind == "pg_restart_fast" else "immediate")
        chaos.faults[kind] += 1


def fresh_ui_frames(frames) -> list[tuple[str, str]]:
    return [(f.id, f.data) for f in frames if f.data != "[DONE]"]


async def read_ui_at_once(chaos: Chaos, cid: str) -> list[tuple[str, str]]:
    """The whole format=ui stream of a conversation, read in one go (follow=false)."""
    async with open_sse(chaos.client(chaos.server(0)), f"/v1/conversations/{cid}/stream",
                        params={"format": "ui", "compact": "false", "follow": "false"}) as stream:
        assert stream.response.status_code == 200
        return fresh_ui_frames([f async for f in stream.frames()])


async def test_exactly_once_under_chaos(running_cluster, start_server_on):
    cluster, rng = running_cluster, random.Random(SEED)
    url = await cluster.create_database()
    proxy = FaultProxy(cluster.port, seed=SEED).start_in_thread()
    chaos = None
    tasks: list[asyncio.Task] = []
    try:
        database = url.rsplit("/", 1)[1]
        servers = list(await asyncio.gather(*(start_server_on(proxy.url(database), name) for name in ("A", "B"))))
        chaos = Chaos(cluster, proxy, servers, rng)
        setup = chaos.client(servers[0])
        turns = [await new_conversation(setup) for _ in range(3)]
        anonymous = [await new_conversation(setup) for _ in range(2)]
        raced = await new_conversation(setup)
        writers = ([turn_writer(chaos, f"turns{i}", cid) for i, cid in enumerate(turns)]
                   + [anonymous_writer(chaos, f"anon{i}", cid) for i, cid in enumerate(anonymous)]
                   + [racing_writer(chaos, f"race{i}", raced) for i in range(2)])

        # readers: both formats on the turn conversations, events on the others
        targets: dict[int, str] = {}  # reader index -> the last frame id it must reach
        readers: list[tuple[FollowingReader, str, str]] = []
        for i, (cid, fmt) in enumerate([(c, f) for c in turns for f in ("events", "ui")]
                                       + [(c, "events") for c in (*anonymous, raced)]):
            reader = FollowingReader(servers, f"/v1/conversations/{cid}/stream",
                                     {"format": fmt, "compact": "false"}, drop_probability=0.02,
                                     rng=random.Random(rng.random()), first=i)
            readers.append((reader, cid, fmt))
        feed: list[dict] = []
        final_position: list[int] = []

        def reached(index: int, reader: FollowingReader):
            return lambda: index in targets and reader.last_event_id == targets[index]

        reading = [asyncio.create_task(reader.run(reached(i, reader))) for i, (reader, _, _) in enumerate(readers)]
        feeding = asyncio.create_task(feed_reader(chaos, feed, lambda after: bool(final_position)
                                                  and after >= final_position[0]))
        tasks = [*reading, feeding]

        # the load, and the faults
        proxy.commit_faults = dict(COMMIT_FAULTS)
        started = time.monotonic()
        load_until = started + DURATION
        writing = [asyncio.create_task(w) for w in writers]
        tasks += writing
        await inflict(chaos, load_until)
        await asyncio.sleep(max(0.0, load_until - time.monotonic()))
        chaos.loading = False
        proxy.commit_faults = {}
        chaos.settle_by = time.monotonic() + SETTLE_WITHIN
        if not await cluster.running():
            await cluster.start()
        for server in servers:
            if not server.alive:
                await restart(chaos, server)
        await asyncio.wait(writing, timeout=SETTLE_WITHIN + REQUEST_TIMEOUT)
        load_seconds = time.monotonic() - started

        # what is stored, and what each reader must reach
        log = await stored_log(url)
        final_position.append(max(e["position"] for e in log))
        by_conversation: dict[str, list[dict]] = {}
        for event in log:
            by_conversation.setdefault(event["conversation_id"], []).append(event)
        for events in by_conversation.values():
            events.sort(key=lambda e: e["seq"])
        fresh_ui: dict[str, list[tuple[str, str]]] = {}
        for index, (reader, cid, fmt) in enumerate(readers):
            if fmt == "ui":
                fresh_ui[cid] = await read_ui_at_once(chaos, cid)
                targets[index] = fresh_ui[cid][-1][0] if fresh_ui[cid] else None  # None: nothing to reach
            else:
                targets[index] = str(by_conversation[cid][-1]["seq"])
        _, pending = await asyncio.wait([*reading, feeding], timeout=CATCH_UP_WITHIN)
        stuck = [f"{readers[reading.index(t)][2]} reader of {readers[reading.index(t)][1]}: at "
                 f"{readers[reading.index(t)][0].last_event_id}, must reach {targets[reading.index(t)]}"
                 for t in pending if t in reading] + (["feed reader"] if feeding in pending else [])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if chaos is not None:
            await chaos.close()
        proxy.close_thread()

    # -- the checks ------------------------------------------------------------------------
    problems: list[str] = [f"did not catch up within {CATCH_UP_WITHIN}s: {s}" for s in stuck]
    stored_by_marker: dict[str, list[dict]] = {}
    for event in log:
        if event["type"] != "conversation.created":
            stored_by_marker.setdefault(marker_of(event), []).append(event)
    duplicated = {m: len(es) for m, es in stored_by_marker.items() if len(es) > 1}
    problems += [f"{m}: stored {n} times" for m, n in list(duplicated.items())[:20]]

    sent = {m for b in chaos.batches for m in b.markers}
    problems += [f"{m}: stored but never sent" for m in stored_by_marker if m not in sent][:20]

    lost = unsettled = error_but_written = 0
    answers = Counter(a.split(" ")[0] if a != "503 unknown" else a for b in chaos.batches for a in b.answers)
    for batch in chaos.batches:
        stored = [stored_by_marker.get(m, []) for m in batch.markers]
        if batch.acknowledged is not None:
            for sent_event, copies in zip(batch.acknowledged, stored):
                if len(copies) != 1 or as_stored(copies[0]) != as_stored(sent_event):
                    lost += not copies
                    problems.append(f"{batch.writer} {marker_of(sent_event)}: acknowledged as seq {sent_event['seq']}"
                                    f" but stored {[(c['seq'], c['position']) for c in copies]}")
            if batch.answers[-1] == "200" and not batch.uncertain:
                error_but_written += 1
                problems.append(f"{batch.writer} {batch.markers}: answers {batch.answers}: a retry found it written, "
                                "though every earlier answer said nothing was")
        elif batch.uncertain:
            if any(len(copies) > 1 for copies in stored):
                problems.append(f"{batch.writer} {batch.markers}: outcome unknown, stored more than once")
            if any(e.get("id") for e in batch.events):
                unsettled += 1
                problems.append(f"{batch.writer} {batch.markers}: answers {batch.answers}: never settled by retrying")
        elif any(stored):
            error_but_written += 1
            problems.append(f"{batch.writer} {batch.markers}: answers {batch.answers} (nothing written, they say) "
                            f"but stored at {[c['seq'] for copies in stored for c in copies]}")
        if any(a.startswith("5") and not a.startswith("503") for a in batch.answers):
            problems.append(f"{batch.writer} {batch.markers}: answers {batch.answers}: a 5xx other than 503")

    # readers: every event of the conversation exactly once, in order, soon after it was acknowledged
    reader_lost = reader_repeated = 0
    slowest = (0.0, None)
    acked_at = {(e["conversation_id"], e["seq"]): b.acked_at for b in chaos.batches if b.acknowledged
                for e in b.acknowledged}
    for reader, cid, fmt in readers:
        if fmt == "events":
            got = [(f.id, orjson.loads(f.data)) for f in reader.frames]
            want = [(str(e["seq"]), e) for e in by_conversation[cid]]
            got_ids, want_ids = [g[0] for g in got], [w[0] for w in want]
            same = got_ids == want_ids and all(as_stored(g[1]) == as_stored(w[1]) for g, w in zip(got, want))
        else:
            got_ids, want_ids = [f[0] for f in fresh_ui_frames(reader.frames)], [f[0] for f in fresh_ui[cid]]
            same = fresh_ui_frames(reader.frames) == fresh_ui[cid]
        missing, repeated = set(want_ids) - set(got_ids), len(got_ids) - len(set(got_ids))
        reader_lost += len(missing)
        reader_repeated += repeated
        if not same:
            problems.append(f"{fmt} reader of {cid}: {len(got_ids)} frames, {len(want_ids)} expected, "
                            f"{len(missing)} missing, {repeated} repeated")
        for seq, seen_at in first_seen(reader).items():
            if (at := acked_at.get((cid, seq))) is not None:
                delay = chaos.outages.up_time(at, seen_at)
                if delay > slowest[0]:
                    slowest = (delay, f"{fmt} reader of {cid} seq {seq}")
        server_errors = {k: n for k, n in reader.failures.items() if k.startswith("5") and k != "503"}
        if server_errors:
            problems.append(f"{fmt} reader of {cid}: stream requests answered {server_errors} (see the server logs)")
    if slowest[0] > STALL_BOUND:
        problems.append(f"slowest delivery {slowest[0]:.1f}s of store-up time after its acknowledgement "
                        f"({slowest[1]}), over {STALL_BOUND}s: a stream stalled")
    feed_errors = {k: n for k, n in chaos.feed_answers.items() if k.startswith("5") and k != "503"}
    if feed_errors:
        problems.append(f"feed reader: answered {feed_errors}")

    # the feed: the principal's whole log by position, nothing skipped, nothing twice
    feed_positions = [e["position"] for e in feed]
    log_positions = [e["position"] for e in log]
    feed_repeated = len(feed_positions) - len(set(feed_positions))
    feed_skipped = len(set(log_positions) - set(feed_positions))
    if feed_positions != log_positions:
        problems.append(f"feed reader: {len(feed_positions)} events read, {len(log_positions)} stored: "
                        f"{feed_skipped} skipped, {feed_repeated} repeated, in order: {feed_positions == sorted(feed_positions)}")

    acknowledged = sum(len(b.acknowledged) for b in chaos.batches if b.acknowledged)
    unknown = sum("503 unknown" in b.answers for b in chaos.batches)
    print(f"\nchaos (seed {SEED}, {DURATION:.0f}s of load, {load_seconds:.1f}s until settled): "
          f"{acknowledged} events acknowledged in {sum(b.acknowledged is not None for b in chaos.batches)} of "
          f"{len(chaos.batches)} batches; {len(log)} stored\n"
          f"  answers: {dict(answers)}; batches with an unknown outcome (503 unknown): {unknown}, unsettled {unsettled}\n"
          f"  faults: harness {dict(chaos.faults)}; proxy {proxy.counts}\n"
          f"  readers: {len(readers)} SSE + 1 feed, {sum(r.connections for r, _, _ in readers)} connections, "
          f"{sum(r.hang_ups for r, _, _ in readers)} hang-ups, {sum(r.ends for r, _, _ in readers)} ended by a server, "
          f"failures {dict(sum((r.failures for r, _, _ in readers), Counter()))}, slowest delivery {slowest[0]:.2f}s; "
          f"feed answers {dict(chaos.feed_answers)}\n"
          f"  lost {lost}, duplicated {len(duplicated)}, error-but-written {error_but_written}, "
          f"reader lost {reader_lost}, reader repeated {reader_repeated}, feed skipped {feed_skipped}, "
          f"feed repeated {feed_repeated}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
