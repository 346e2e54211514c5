"""When PostgreSQL goes away, and when it comes back.

What a user relies on while the store is down or hung: every read and append
answers 503 `store_unavailable` (the contract's error shape) in under 2 s,
/readyz says 503 and /healthz 200; when the store is back, everything answers
again by itself, with no restart. A live SSE reader either keeps receiving
new events within a few seconds of their commit or its stream ends (so it
resumes with Last-Event-ID): never an open connection that silently stopped
delivering. A pool that is all taken gives a bounded wait, then 503.

A request that was answered with an error wrote nothing, except a 503 whose
`details.outcome` is "unknown", which a retry with the same event ids settles.

Each test uses a private PostgreSQL cluster (tests/pgcluster.py) that it may
stop, crash and restart, and real `chatlog serve` processes on it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import orjson

from tests.faultproxy import FaultProxy
from tests.helpers import (REQUEST_TIMEOUT, STALL_BOUND, Outages, append, error_of, events_locked, first_seen,
                           new_conversation, outcome_unknown, stored_log, user_event)
from tests.servers import FollowingReader

pytest_plugins = ("tests.servers", "tests.pgcluster")

UNAVAILABLE_WITHIN = 2.0  # s: the promise for reads, appends and /readyz while the store is down
RECOVERED_WITHIN = 10.0  # s after PostgreSQL accepts connections again
POOL_WAIT_BOUND = 2.0  # s: the longest a request may wait for a pooled connection before its 503
STATEMENT_BOUND = 10.0  # s: the longest a statement PostgreSQL does not answer may hold a request
# STALL_BOUND (helpers): a committed event reaches a live reader within it, or its stream ends;
# REQUEST_TIMEOUT (helpers): the client gives up (recorded as a hang)


# -- helpers ----------------------------------------------------------------------------


def unavailable_problem(response: httpx.Response | str) -> str | None:
    """Why this is not a 503 `store_unavailable` in the contract's shape (None: it is)."""
    if isinstance(response, str):
        return response
    error = error_of(response)
    if response.status_code != 503 or error is None or error["code"] != "store_unavailable":
        return f"{response.status_code} {response.text[:160]}"
    return None


async def timed(client: httpx.AsyncClient, method: str, path: str, **kwargs) -> tuple[httpx.Response | str, float]:
    """(response, or the client's error as text), seconds."""
    started = time.monotonic()
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        return f"no answer within {client.timeout.read}s", time.monotonic() - started
    except httpx.TransportError as exc:
        return f"transport error {exc!r}", time.monotonic() - started
    return response, time.monotonic() - started


async def stored_by_id(database_url: str, conversation_id: str) -> dict[str, list[int]]:
    """event id -> the seqs it is stored at, read from PostgreSQL itself."""
    found: dict[str, list[int]] = {}
    for event in await stored_log(database_url):
        if event["conversation_id"] == conversation_id:
            found.setdefault(event["id"], []).append(event["seq"])
    return found


def the_requests(cid: str) -> list[tuple[str, str, str, dict | None]]:
    """(name, method, path, body) of the requests a user makes; POST events gets a new event id each time."""
    return [
        ("GET conversation", "GET", f"/v1/conversations/{cid}", None),
        ("GET events", "GET", f"/v1/conversations/{cid}/events", None),
        ("POST events", "POST", f"/v1/conversations/{cid}/events", {"events": [user_event(f"o-{uuid.uuid4().hex}")]}),
        ("GET feed", "GET", "/v1/events?after_position=0&limit=10", None),
        ("GET messages", "GET", f"/v1/conversations/{cid}/messages?format=openai", None),
        ("GET readyz", "GET", "/readyz", None),
    ]


async def answer_all(client: httpx.AsyncClient, cid: str) -> list[tuple[str, httpx.Response | str, float, dict | None]]:
    """Every request of the_requests at once: (name, answer, seconds, body)."""
    requests = the_requests(cid)
    answers = await asyncio.gather(*(timed(client, method, path, json=body) for _, method, path, body in requests))
    return [(name, answer, seconds, body) for (name, _, _, body), (answer, seconds) in zip(requests, answers)]


def table(rows: list[tuple[str, httpx.Response | str, float, dict | None]]) -> str:
    out = []
    for name, answer, seconds, _ in rows:
        shown = answer if isinstance(answer, str) else f"{answer.status_code} {answer.text[:100]}"
        out.append(f"  {name:18} {seconds:6.2f}s  {shown}")
    return "\n".join(out)


async def unavailable_round(client: httpx.AsyncClient, cid: str, label: str) -> tuple[list[str], list]:
    """One round while the store is away: every request must be a 503 store_unavailable within the bound."""
    rows = await answer_all(client, cid)
    print(f"\n{label}:\n{table(rows)}")
    problems = []
    for name, answer, seconds, _ in rows:
        if (why := unavailable_problem(answer)) is not None:
            problems.append(f"{label}: {name} answered {why} after {seconds:.2f}s, not 503 store_unavailable")
        elif seconds > UNAVAILABLE_WITHIN:
            problems.append(f"{label}: {name} took {seconds:.2f}s (the bound is {UNAVAILABLE_WITHIN}s)")
    return problems, rows


async def wait_for_recovery(client: httpx.AsyncClient, cid: str, within: float) -> tuple[float | None, list]:
    """Seconds until two rounds in a row answer 2xx everywhere (None: not within `within`); the last round."""
    started = time.monotonic()
    good_rounds, rows = 0, []
    while time.monotonic() - started < within:
        rows = await answer_all(client, cid)
        ok = all(not isinstance(a, str) and 200 <= a.status_code < 300 for _, a, _, _ in rows)
        good_rounds = good_rounds + 1 if ok else 0
        if good_rounds == 2:
            return time.monotonic() - started, rows
        await asyncio.sleep(0.2)
    return None, rows


async def writes_settle(client: httpx.AsyncClient, database_url: str, cid: str, posts: list) -> list[str]:
    """Appends answered during an outage: an error wrote nothing, except outcome unknown,
    which a retry with the same ids settles (2xx, stored once)."""
    problems = []
    stored = await stored_by_id(database_url, cid)
    for name, answer, _, body in posts:
        event_id = body["events"][0]["id"]
        if isinstance(answer, str) or outcome_unknown(answer):
            retry, _ = await timed(client, "POST", f"/v1/conversations/{cid}/events", json=body)
            if isinstance(retry, str) or retry.status_code not in (200, 201):
                problems.append(f"{name} {event_id}: the retry of an unknown outcome answered "
                                f"{retry if isinstance(retry, str) else retry.status_code}")
            stored = await stored_by_id(database_url, cid)
            if len(stored.get(event_id, [])) != 1:
                problems.append(f"{name} {event_id}: stored {len(stored.get(event_id, []))} times after the retry")
        elif 200 <= answer.status_code < 300:
            if len(stored.get(event_id, [])) != 1:
                problems.append(f"{name} {event_id}: acknowledged but stored {len(stored.get(event_id, []))} times")
        elif stored.get(event_id):
            problems.append(f"{name} {event_id}: answered {answer.status_code} (nothing written, says the contract) "
                            f"but stored at seq {stored[event_id]}")
    return problems


async def outage_rounds(client: httpx.AsyncClient, cid: str, label: str, posts: list) -> list[str]:
    """Two rounds of every request while the store is out (appends go to `posts`), then /healthz."""
    problems = []
    for attempt in (1, 2):
        found, rows = await unavailable_round(client, cid, f"{label}, round {attempt}")
        problems += found
        posts += [row for row in rows if row[0] == "POST events"]
    health, seconds = await timed(client, "GET", "/healthz")
    if isinstance(health, str) or health.status_code != 200 or seconds > UNAVAILABLE_WITHIN:
        problems.append(f"{label}: /healthz answered {health} after {seconds:.2f}s, not 200")
    return problems


async def recovery(client: httpx.AsyncClient, cid: str, label: str) -> list[str]:
    recovered, rows = await wait_for_recovery(client, cid, RECOVERED_WITHIN)
    print(f"\n{label}, everything answered again after "
          f"{'never' if recovered is None else f'{recovered:.2f}s'}:\n{table(rows)}")
    if recovered is None:
        return [f"{label}: not recovered within {RECOVERED_WITHIN}s:\n{table(rows)}"]
    return []


# -- PostgreSQL stopped ------------------------------------------------------------------


async def test_with_postgresql_stopped_requests_are_503_within_2s_and_recover_by_themselves(running_cluster,
                                                                                          start_server_on):
    cluster = running_cluster
    url = await cluster.create_database()
    server = await start_server_on(url, "stopped")
    problems, posts = [], []
    async with server.client(timeout=REQUEST_TIMEOUT) as client:
        cid = await new_conversation(client)
        await append(client, cid, [user_event("before")])
        for mode in ("fast", "immediate"):  # a clean shutdown, then a crash
            await cluster.stop(mode)
            try:
                # the first round meets the pool's dead connections, the second new connection attempts
                problems += await outage_rounds(client, cid, f"stopped ({mode})", posts)
            finally:
                await cluster.start()
            problems += await recovery(client, cid, f"after the {mode} stop")
        problems += await writes_settle(client, url, cid, posts)
    assert not problems, "\n".join(problems)


# -- PostgreSQL hung -------------------------------------------------------------------------


async def test_with_postgresql_not_answering_requests_are_503_within_2s_and_recover(running_cluster,
                                                                                 start_server_on):
    """A hung server or a lost network (no refusal, no reset: nothing comes back at all)."""
    cluster = running_cluster
    url = await cluster.create_database()
    proxy = FaultProxy(cluster.port).start_in_thread()
    try:
        server = await start_server_on(proxy.url(url.rsplit("/", 1)[1]), "hung")
        problems, posts = [], []
        async with server.client(timeout=REQUEST_TIMEOUT) as client:
            cid = await new_conversation(client)
            await append(client, cid, [user_event("before")])
            proxy.pause()
            try:
                problems += await outage_rounds(client, cid, "not answering", posts)
            finally:
                proxy.resume()
            problems += await recovery(client, cid, "after the store answered again")
            problems += await writes_settle(client, url, cid, posts)
    finally:
        proxy.close_thread()
    assert not problems, "\n".join(problems)


# -- a live reader across restarts -----------------------------------------------------------


async def keep_appending(client: httpx.AsyncClient, cid: str, stop: asyncio.Event, acked: dict[int, float],
                         answers: list[str], give_up_after: float = 30.0) -> None:
    """Append one message at a time; retry each (same event id) until it is acknowledged."""
    n = 0
    while not stop.is_set():
        n += 1
        event_id, started = f"live-{n}", time.monotonic()
        while True:
            answer, _ = await timed(client, "POST", f"/v1/conversations/{cid}/events",
                                    json={"events": [user_event(event_id)]})
            answers.append(answer if isinstance(answer, str) else str(answer.status_code))
            if not isinstance(answer, str) and answer.status_code in (200, 201):
                acked[answer.json()["last_seq"]] = time.monotonic()
                break
            assert time.monotonic() - started < give_up_after, f"{event_id} not appended within {give_up_after}s"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.1)


@dataclass
class LiveRun:
    reader: FollowingReader
    acked: dict[int, float] = field(default_factory=dict)  # seq -> when its append was acknowledged
    answers: list[str] = field(default_factory=list)  # every append attempt's answer
    final: int | None = None  # the last acknowledged seq, once the writer stopped


@asynccontextmanager
async def reading_while_appending(servers: list, client: httpx.AsyncClient, cid: str):
    """A FollowingReader on `servers` follows the conversation while keep_appending writes
    to it through `client`, during the block. Then the writer stops and the reader has 15 s
    to reach the last acknowledged seq (`final`)."""
    reader = FollowingReader(servers, f"/v1/conversations/{cid}/stream", {"compact": "false"})
    run = LiveRun(reader)
    reading = asyncio.create_task(reader.run(lambda: run.final is not None and reader.last_event_id == str(run.final)))
    stop = asyncio.Event()
    writing = asyncio.create_task(keep_appending(client, cid, stop, run.acked, run.answers))
    try:
        yield run
        stop.set()
        await asyncio.wait_for(writing, 35)
        run.final = max(run.acked)
        try:
            await asyncio.wait_for(asyncio.shield(reading), 15)
        except TimeoutError:
            pass
    finally:
        stop.set()
        for task in (writing, reading):
            task.cancel()
        await asyncio.gather(writing, reading, return_exceptions=True)


def late_deliveries(reader: FollowingReader, acked: dict[int, float], outages: Outages) -> list[tuple[int, float]]:
    """(seq, seconds the store was up between its acknowledgement and its first frame), for each acknowledged seq."""
    seen = first_seen(reader)
    return [(seq, outages.up_time(at, seen[seq]) if seq in seen else float("inf")) for seq, at in sorted(acked.items())]


async def test_a_live_reader_across_postgresql_restarts_gets_every_event_once_without_stalling(running_cluster,
                                                                                               start_server_on):
    cluster = running_cluster
    url = await cluster.create_database()
    server = await start_server_on(url, "live")
    async with server.client(timeout=REQUEST_TIMEOUT) as client:
        cid = await new_conversation(client)
        outages = Outages()
        async with reading_while_appending([server], client, cid) as run:
            await asyncio.sleep(1.5)
            async with outages.down():  # down for a few seconds
                await cluster.stop("fast")
                await asyncio.sleep(3)
                await cluster.start()
            await asyncio.sleep(3)
            async with outages.down():  # a quick second restart
                await cluster.restart("fast")
            await asyncio.sleep(3)
            async with outages.down():  # a crash and recovery
                await cluster.restart("immediate")
            await asyncio.sleep(3)
        stored = await client.get(f"/v1/conversations/{cid}/events", params={"limit": 1000})
        assert stored.status_code == 200, stored.text
        stored = stored.json()["events"]

    reader, acked, answers, final = run.reader, run.acked, run.answers, run.final
    ids = [frame.id for frame in reader.frames]
    late = late_deliveries(reader, acked, outages)
    worst = max(late, key=lambda x: x[1])
    print(f"\nlive reader: {len(acked)} events appended ({len(answers)} attempts, "
          f"{sum(a not in ('200', '201') for a in answers)} refused), {len(ids)} frames read, "
          f"{reader.connections} connections ({reader.ends} ended by the server, failures {dict(reader.failures)}), "
          f"slowest delivery {worst[1]:.2f}s of store-up time (seq {worst[0]})")
    assert [e["seq"] for e in stored] == list(range(1, final + 1))
    assert ids == [str(seq) for seq in range(1, final + 1)], (
        f"the reader did not get every event exactly once in order: last id {reader.last_event_id}, "
        f"final seq {final}, {len(ids)} frames, {len(ids) - len(set(ids))} repeated")
    assert [orjson.loads(f.data) for f in reader.frames] == stored
    stalled = [(seq, round(seconds, 2)) for seq, seconds in late if seconds > STALL_BOUND]
    assert not stalled, (f"events reached the live reader more than {STALL_BOUND}s (of store-up time) after they "
                         f"were acknowledged (seq, seconds): {stalled[:20]}")


# -- pool exhaustion ---------------------------------------------------------------------------


async def test_a_pool_all_taken_gives_a_bounded_wait_then_503(running_cluster, start_server_on):
    """A two-connection pool, and a migration-like lock that blocks every query on `events`
    (a table lock held by another session): the requests that got a connection wait on the
    lock, the others queue for the pool. Every request gets an answer, 2xx or 503
    store_unavailable, within STATEMENT_BOUND: never a hang. Reads that could not get a
    connection answer within POOL_WAIT_BOUND (only the pool's size of them may wait longer)."""
    cluster = running_cluster
    url = await cluster.create_database()
    pool_size = 2
    server = await start_server_on(url, "pool", CHATLOG_POOL_SIZE=str(pool_size), CHATLOG_WRITERS="1")
    problems = []
    async with server.client() as client:
        cid = await new_conversation(client)
        await append(client, cid, [user_event("before")])
        async with events_locked(url, "ACCESS EXCLUSIVE"):
            requests = [request for _ in range(4) for request in the_requests(cid)]
            started = time.monotonic()
            answers = await asyncio.gather(
                *(timed(client, method, path, json=body) for _, method, path, body in requests),
                timed(client, "GET", "/healthz"))
            held = time.monotonic() - started
        health = answers.pop()
        rows = [(name, answer, seconds, body) for (name, _, _, body), (answer, seconds) in zip(requests, answers)]
        print(f"\nwith the pool taken (lock held {held:.1f}s):\n{table(rows)}\n  /healthz {health[1]:.2f}s")
        if isinstance(health[0], str) or health[0].status_code != 200 or health[1] > 1.0:
            problems.append(f"/healthz answered {health[0]} after {health[1]:.2f}s while the pool was taken")
        refused = 0
        for name, answer, seconds, _ in rows:
            ok = not isinstance(answer, str) and 200 <= answer.status_code < 300
            if not ok and (why := unavailable_problem(answer)) is not None:
                problems.append(f"{name}: {why} after {seconds:.2f}s, neither 2xx nor 503 store_unavailable")
            elif seconds > STATEMENT_BOUND:
                problems.append(f"{name}: answered after {seconds:.2f}s, over the bound of {STATEMENT_BOUND}s")
            refused += not ok
        # appends are left out: the group writer may run any number of them in one transaction (one connection)
        waited = sorted(seconds for name, _, seconds, _ in rows if seconds > POOL_WAIT_BOUND and name != "POST events")
        if len(waited) > pool_size:
            problems.append(f"{len(waited)} reads took over {POOL_WAIT_BOUND}s ({', '.join(f'{s:.1f}s' for s in waited)}): "
                            f"more than the {pool_size} that can hold a connection; the others waited for the pool")
        if not refused:
            problems.append("no request was refused: the test did not exhaust the pool")
        recovered, rows_after = await wait_for_recovery(client, cid, RECOVERED_WITHIN)
        if recovered is None:
            problems.append(f"not recovered {RECOVERED_WITHIN}s after the lock was released:\n{table(rows_after)}")
        problems += await writes_settle(client, url, cid, [row for row in rows if row[0] == "POST events"])
    assert not problems, "\n".join(problems)


async def test_a_reader_whose_server_lost_its_store_is_moved_on_not_left_silent(running_cluster, start_server_on):
    """Server A's connections to PostgreSQL hang (its own network path), B's work. A stream on A
    cannot be served: it must end (or A refuse it) so the reader resumes on B with Last-Event-ID
    and keeps getting the events written through B, instead of heartbeats on a stream that
    will never carry another event."""
    cluster = running_cluster
    url = await cluster.create_database()
    proxy = FaultProxy(cluster.port).start_in_thread()
    try:
        a = await start_server_on(proxy.url(url.rsplit("/", 1)[1]), "A-hangs")
        b = await start_server_on(url, "B")
        async with b.client(timeout=REQUEST_TIMEOUT) as client:
            cid = await new_conversation(client)
            try:
                async with reading_while_appending([a, b], client, cid) as run:
                    await asyncio.sleep(2)
                    proxy.pause()
                    paused_at = time.monotonic()
                    await asyncio.sleep(8)
                    proxy.resume()
            finally:
                proxy.resume()
    finally:
        proxy.close_thread()

    reader, acked, final = run.reader, run.acked, run.final
    ids = [frame.id for frame in reader.frames]
    late = late_deliveries(reader, acked, Outages())
    worst = max(late, key=lambda x: x[1])
    moved = [r.at - paused_at for r in reader.received if r.at > paused_at and r.connection > 1][:1]
    print(f"\nreader on a server whose store hangs: {len(acked)} events appended through B, {len(ids)} frames read, "
          f"{reader.connections} connections ({reader.ends} ended by the server, failures {dict(reader.failures)}), "
          f"first frame after the hang on a new connection after {moved[0] if moved else float('nan'):.2f}s, "
          f"slowest delivery {worst[1]:.2f}s (seq {worst[0]})")
    assert ids == [str(seq) for seq in range(1, final + 1)], (
        f"the reader did not get every event exactly once in order: last id {reader.last_event_id}, "
        f"final seq {final}, {len(ids)} frames, {len(ids) - len(set(ids))} repeated")
    stalled = [(seq, round(seconds, 2)) for seq, seconds in late if seconds > STALL_BOUND]
    assert not stalled, (f"events reached the reader more than {STALL_BOUND}s after they were acknowledged "
                         f"(seq, seconds): {stalled[:20]}")
