"""The hash chain against a superuser: rows broken behind the application's back
(the append-only guard switched off, as only a table owner or superuser can),
and every way of checking names the first broken seq and how it broke: the
verify endpoint, `chatlog verify` (one conversation, all, against a digest
taken before) and `chatlog verify --file` on an export, with no database.

This module has a database of its own: switching the guard off locks the
events table, which no other test should wait for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from domain import chain
from store import NewEvent, Store
from tests.helpers import assert_error, bearer

ROOT = Path(__file__).resolve().parent.parent
N = 6  # events per conversation: seq 1 (created) and five messages


@pytest.fixture(scope="module")
async def audit_db(pg_server):
    return await pg_server.create_database()


@pytest.fixture(scope="module")
async def audit_store(audit_db):
    store = await Store.open(audit_db, pool_size=4, writers=2)
    yield store
    await store.close()


@pytest.fixture
def audit_client(make_client, audit_store, principal):
    from api.app import create_app
    from api.settings import Settings
    from tests.helpers import asgi_client

    app = create_app(Settings(database_url=None, api_keys=f"k-{principal}={principal}"), store=audit_store)
    return asgi_client(app, bearer(f"k-{principal}"))


def chatlog(url: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`chatlog <args>` in a process of its own, on `url`."""
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("TEST_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          timeout=120, input=stdin)


def broken_lines(out: bytes) -> list[str]:
    return [line for line in out.decode().splitlines() if line.startswith("BROKEN")]


async def make_conversation(store: Store, principal: str) -> uuid.UUID:
    cid = uuid.uuid4()
    await store.create_conversation(principal, cid, {"metadata": {"case": "audit"}})
    for i in range(N - 1):  # one append each: created_at differs from event to event
        await store.append(principal, cid, [NewEvent("message.user", {"content": f"m{i}"}, f"e{i}")])
    return cid


async def tamper(url: str, *statements: tuple) -> None:
    """Run statements as a superuser with the append-only guard off, in one
    transaction that switches it on again (the guard is ENABLE ALWAYS)."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
            for sql, *args in statements:
                await conn.execute(sql, *args)
            await conn.execute("ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only")
    finally:
        await conn.close()


def _at(seq_condition: str) -> str:
    """The WHERE of one conversation's rows ($1 principal, $2 conversation id)."""
    return f"WHERE principal = $1 AND conversation_id = $2 AND {seq_condition}"


async def rechain_from(url: str, principal: str, cid: uuid.UUID, seq: int) -> None:
    """Recompute every hash from `seq` on, and the head: what a careful superuser does after an edit."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT seq, id, type, data::text AS data,
                      to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at, hash
                 FROM events WHERE principal = $1 AND conversation_id = $2 ORDER BY seq""", principal, cid)
    finally:
        await conn.close()
    prev, updates = (rows[seq - 2]["hash"] if seq > 1 else chain.ZERO), []
    for r in rows[seq - 1:]:
        prev = chain.event_hash(prev, {"conversation_id": str(cid), "seq": r["seq"], "id": r["id"], "type": r["type"],
                                       "data": json.loads(r["data"]), "created_at": r["created_at"]})
        updates.append(("UPDATE events SET hash = $4 " + _at("seq = $3"), principal, cid, r["seq"], prev))
    await tamper(url, *updates, ("UPDATE conversations SET head_hash = $3 WHERE principal = $1 AND id = $2",
                                 principal, cid, prev))


# Each way of breaking a chain: (statements, or "rechain"), then what verify must name.
# $1 principal, $2 conversation id.
BREAKS = {
    "altered data": ([("UPDATE events SET data = '{\"content\": \"changed\"}' " + _at("seq = 3"),)],
                     (3, "altered")),
    "altered hash": ([("UPDATE events SET hash = repeat('a', 64) " + _at("seq = 4"),)], (4, "altered")),
    "removed row": ([("DELETE FROM events " + _at("seq = 3"),)], (3, "removed")),
    "removed last row": ([("DELETE FROM events " + _at(f"seq = {N}"),)], (N, "removed")),
    "removed row, the rest renumbered": ([
        ("DELETE FROM events " + _at("seq = 3"),),
        ("UPDATE events SET seq = -seq " + _at("seq > 3"),),
        ("UPDATE events SET seq = -seq - 1 " + _at("seq < 0"),),
        ("UPDATE conversations SET seq = seq - 1 WHERE principal = $1 AND id = $2",)], (3, "removed")),
    "inserted past the head": ([(
        "INSERT INTO events (principal, conversation_id, seq, position, id, type, data, created_at, hash) "
        "SELECT principal, conversation_id, seq + 1, position + 1, 'forged', type, data, created_at, repeat('b', 64) "
        "FROM events " + _at(f"seq = {N}"),)], (N + 1, "inserted")),
    "inserted in the middle": ([
        ("UPDATE events SET seq = -seq " + _at("seq >= 4"),),
        ("UPDATE events SET seq = -seq + 1 " + _at("seq < 0"),),
        ("INSERT INTO events (principal, conversation_id, seq, position, id, type, data, created_at, hash) "
         "SELECT principal, conversation_id, 4, position, 'forged', type, '{\"content\": \"forged\"}', created_at, "
         "repeat('c', 64) FROM events " + _at("seq = 3"),),
        ("UPDATE conversations SET seq = seq + 1 WHERE principal = $1 AND id = $2",)], (4, "inserted")),
    "two rows swapped": ([
        ("UPDATE events SET seq = -1 " + _at("seq = 2"),),
        ("UPDATE events SET seq = 2 " + _at("seq = 5"),),
        ("UPDATE events SET seq = 5 " + _at("seq = -1"),)], (2, "reordered")),
    "altered and every hash recomputed": ("rechain", None),
}

# A file has no head: what only the head can tell, a file tells otherwise (or, alone, not at all).
FILE_ALONE = {"removed last row": None, "inserted past the head": (N + 1, "altered"),
              "altered and every hash recomputed": None}
FILE_WITH_DIGEST = {"inserted past the head": (N + 1, "altered"),
                    "altered and every hash recomputed": ("rechained", N)}


@pytest.mark.parametrize("how", list(BREAKS))
async def test_every_check_names_the_first_broken_seq_and_how(audit_db, audit_store, audit_client, principal,
                                                              tmp_path, how):
    cid = await make_conversation(audit_store, principal)
    bystander = await make_conversation(audit_store, principal)  # stays intact throughout
    digest = chatlog(audit_db, "digest")
    assert digest.returncode == 0, digest.stderr
    (tmp_path / "digest.json").write_bytes(digest.stdout)
    before = await audit_client.get(f"/v1/conversations/{cid}/verify")
    assert before.json()["ok"] is True and before.json()["verified_through_seq"] == N

    statements, expected = BREAKS[how]
    if statements == "rechain":
        await tamper(audit_db, ("UPDATE events SET data = '{\"content\": \"rewritten\"}' " + _at("seq = 3"),
                                principal, cid))
        await rechain_from(audit_db, principal, cid, 3)
    else:
        await tamper(audit_db, *[(sql, principal, cid, *rest) for sql, *rest in statements])

    # the endpoint, and `chatlog verify --conversation`: the database alone
    answer = (await audit_client.get(f"/v1/conversations/{cid}/verify")).json()
    one = chatlog(audit_db, "verify", "--conversation", str(cid))
    if expected is None:  # a consistent rewrite: nothing in the database shows it
        assert answer["ok"] is True and answer["verified_through_seq"] == N
        assert one.returncode == 0 and broken_lines(one.stdout) == []
    else:
        assert answer == {"ok": False, "first_bad_seq": expected[0], "reason": expected[1]}
        assert one.returncode == 1
        assert broken_lines(one.stdout) == [
            f"BROKEN {principal} {cid} first_bad_seq={expected[0]} reason={expected[1]}"]
    intact = (await audit_client.get(f"/v1/conversations/{bystander}/verify")).json()
    assert intact["ok"] is True

    # against the digest taken before: the rewrite too, at the digest's head
    against = chatlog(audit_db, "verify", "--digest", str(tmp_path / "digest.json"), "--quiet")
    assert against.returncode == 1, against.stderr
    mine = [line for line in broken_lines(against.stdout) if str(cid) in line]
    named = (f"BROKEN {principal} {cid} reason=rechained through_seq={N}" if expected is None
             else f"BROKEN {principal} {cid} first_bad_seq={expected[0]} reason={expected[1]}")
    assert mine == [named]
    assert not [line for line in broken_lines(against.stdout) if str(bystander) in line]

    # an export, checked with no database: alone, and against the digest
    exported = chatlog(audit_db, "export", "--conversation", str(cid), "--principal", principal)
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "export.jsonl").write_bytes(exported.stdout)
    assert all("hash" in json.loads(line) for line in exported.stdout.splitlines())
    for digest_args, overrides in (([], FILE_ALONE), (["--digest", str(tmp_path / "digest.json")], FILE_WITH_DIGEST)):
        wanted = overrides.get(how, expected) if how in overrides else expected
        checked = chatlog("postgresql://nobody@127.0.0.1:1/none", "verify", "--file", str(tmp_path / "export.jsonl"),
                          *digest_args)
        if wanted is None:
            assert checked.returncode == 0, (digest_args, checked.stdout)
        elif wanted[0] == "rechained":
            assert broken_lines(checked.stdout) == [f"BROKEN {principal} {cid} reason=rechained through_seq={N}"]
        else:
            assert checked.returncode == 1, (digest_args, checked.stdout)
            line, = broken_lines(checked.stdout)
            assert line.endswith(f"{cid} first_bad_seq={wanted[0]} reason={wanted[1]}"), (digest_args, line)


async def test_an_intact_log_verifies_and_its_export_checks_against_its_digest(audit_db, audit_store, audit_client,
                                                                             principal, tmp_path):
    cid = await make_conversation(audit_store, principal)
    head = (await audit_client.get(f"/v1/conversations/{cid}/verify")).json()
    events = (await audit_client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    assert head == {"ok": True, "verified_through_seq": N, "head_hash": events[-1]["hash"]}
    # the chain as the contract defines it, recomputed here from what the API shows
    prev = chain.ZERO
    for event in events:
        prev = chain.event_hash(prev, event)
        assert event["hash"] == prev

    digest = chatlog(audit_db, "digest")
    entries = json.loads(digest.stdout)
    assert {"principal": principal, "id": str(cid), "seq": N, "head_hash": prev} in entries["conversations"]
    assert entries["root"] == chain.digest_root(entries["conversations"], entries["taken_at"])
    (tmp_path / "digest.json").write_bytes(digest.stdout)
    exported = chatlog(audit_db, "export", "--conversation", str(cid))
    (tmp_path / "export.jsonl").write_bytes(exported.stdout)
    assert [json.loads(line) for line in exported.stdout.splitlines()] == events

    checked = chatlog("postgresql://nobody@127.0.0.1:1/none", "verify", "--file", str(tmp_path / "export.jsonl"),
                      "--digest", str(tmp_path / "digest.json"))
    assert checked.returncode == 0 and checked.stdout.decode().strip().endswith("OK"), checked.stdout
    # a digest whose entries were edited is caught before anything is believed
    entries["conversations"][0]["head_hash"] = chain.ZERO
    (tmp_path / "forged.json").write_bytes(json.dumps(entries).encode())
    forged = chatlog("postgresql://nobody@127.0.0.1:1/none", "verify", "--file", str(tmp_path / "export.jsonl"),
                     "--digest", str(tmp_path / "forged.json"))
    assert forged.returncode == 1 and b"root does not match" in forged.stdout


async def test_erased_conversations_are_reported_as_erased_not_broken(audit_db, audit_store, audit_client, principal,
                                                                     tmp_path):
    cid = await make_conversation(audit_store, principal)
    digest = chatlog(audit_db, "digest")
    (tmp_path / "digest.json").write_bytes(digest.stdout)
    assert (await audit_client.delete(f"/v1/conversations/{cid}")).status_code == 204

    assert_error(await audit_client.get(f"/v1/conversations/{cid}/verify"), 410, "conversation_erased")
    for args in (["--conversation", str(cid)], ["--digest", str(tmp_path / "digest.json")]):
        result = chatlog(audit_db, "verify", *args)
        mine = [line for line in result.stdout.decode().splitlines() if str(cid) in line]
        assert len(mine) == 1 and mine[0].startswith(f"ERASED {principal} {cid} erased_at="), (args, mine)
        assert f"last_seq={N}" in mine[0]
    one = chatlog(audit_db, "verify", "--conversation", str(cid))
    assert one.returncode == 0, one.stdout


async def test_verify_is_yours_only(audit_store, audit_client, make_client, principal):
    cid = await make_conversation(audit_store, principal)
    from api.app import create_app
    from api.settings import Settings
    from tests.helpers import asgi_client

    other = asgi_client(create_app(Settings(database_url=None, api_keys="k-other=other"), store=audit_store),
                        bearer("k-other"))
    assert_error(await other.get(f"/v1/conversations/{cid}/verify"), 404, "not_found")
    assert_error(await audit_client.get(f"/v1/conversations/{uuid.uuid4()}/verify"), 404, "not_found")
