"""`chatlog verify`, `chatlog digest` and `chatlog export`: the audit commands.

verify    every conversation's chain recomputed (or one: --conversation), a
          line per break or erasure on stdout, progress on stderr, a summary;
          exit 1 on any break. --digest FILE also proves that each
          conversation the digest lists still ends, at the digest's seq, in
          the digest's head hash (so a rewrite that recomputed every hash is
          caught). --file FILE checks an export with no database at all.
digest    every conversation's (principal, id, seq, head_hash) at one moment,
          one root hash over them and the time, as JSON on stdout.
export    one conversation's stored events with their hashes, one JSON per line.

A line on stdout is one of
  BROKEN <principal> <conversation id> first_bad_seq=<n> reason=<altered|removed|inserted|reordered>
  BROKEN <principal> <conversation id> reason=rechained through_seq=<n>   (only a digest can say this)
  ERASED <principal> <conversation id> erased_at=<time> last_seq=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
import uuid
from typing import Any

import orjson

from domain import chain
from store import audit

RECHAINED = "rechained"  # the chain checks, but not against the digest: every hash after a change was recomputed


class _Report:
    """What a verify run found, and its progress on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.checked = self.events = self.broken = self.erased = 0
        self.started = self.last_progress = time.monotonic()
        self.quiet = quiet

    def broken_at(self, principal: str, cid: Any, seq: int | None, reason: str) -> None:
        self.broken += 1
        where = f"first_bad_seq={seq} reason={reason}" if reason != RECHAINED else f"reason={reason} through_seq={seq}"
        print(f"BROKEN {principal} {cid} {where}", flush=True)

    def erased_one(self, principal: str, cid: Any, tombstone: dict) -> None:
        self.erased += 1
        print(f"ERASED {principal} {cid} erased_at={tombstone['erased_at']} last_seq={tombstone['last_seq']}",
              flush=True)

    def verified(self, events: int) -> None:
        self.checked += 1
        self.events += events
        now = time.monotonic()
        if not self.quiet and now - self.last_progress > 2:
            self.last_progress = now
            sys.stderr.write(f"chatlog verify: {self.checked} conversations, {self.events} events checked "
                             f"({self.events / (now - self.started):.0f} events/s)\n")

    def summary(self, what: str) -> int:
        seconds = time.monotonic() - self.started
        sys.stderr.write(f"chatlog verify: {what}: {self.checked} conversations, {self.events} events checked in "
                         f"{seconds:.1f} s; {self.broken} broken, {self.erased} erased\n")
        print("OK" if not self.broken else f"FAILED: {self.broken} broken", flush=True)
        return 1 if self.broken else 0


def _load_digest(path: str) -> dict:
    with open(path, "rb") as f:
        digest = orjson.loads(f.read())
    entries, taken_at = digest.get("conversations"), digest.get("taken_at")
    if not isinstance(entries, list) or not isinstance(taken_at, str):
        raise SystemExit(f"chatlog verify: {path} is not a chatlog digest")
    if chain.digest_root(entries, taken_at, digest.get("version", 1)) != digest.get("root"):
        print(f"BROKEN digest {path}: its root does not match its entries (the file was changed)", flush=True)
        raise SystemExit(1)
    return digest


def _judge(report: _Report, principal: str, cid: Any, verdict: chain.Verdict, entry: dict | None) -> None:
    """Report one conversation's verdict, against its digest entry if it has one."""
    report.verified(verdict.verified_through_seq)
    if not verdict.ok and (entry is None or verdict.first_bad_seq <= entry["seq"]
                           or verdict.checkpoint_hash == entry["head_hash"]):
        report.broken_at(principal, cid, verdict.first_bad_seq, verdict.reason)
    elif entry is not None and verdict.checkpoint_hash is None:
        # the chain ends before the digest's seq (its tail went, the head moved back)
        report.broken_at(principal, cid, verdict.verified_through_seq + 1, chain.REMOVED)
    elif entry is not None and verdict.checkpoint_hash != entry["head_hash"]:
        report.broken_at(principal, cid, entry["seq"], RECHAINED)
    elif not verdict.ok:
        report.broken_at(principal, cid, verdict.first_bad_seq, verdict.reason)


async def _verify_db(url: str, conversation: uuid.UUID | None, principal: str | None, digest_path: str | None,
                     quiet: bool) -> int:
    digest = _load_digest(digest_path) if digest_path else None
    expected = {(e["principal"], e["id"]): e for e in digest["conversations"]} if digest else {}
    report = _Report(quiet)
    conn = await audit.connect(url)
    try:
        if conversation is not None:
            principals = [principal] if principal else await audit.principals_of(conn, conversation)
            if not principals:
                print(f"NOT FOUND {conversation}", flush=True)
                return 1
            keys = [(p, conversation) for p in principals]
            expected = {k: v for k, v in expected.items() if k[1] == str(conversation) and k[0] in principals}
        else:
            keys = None

        async def one(p: str, cid: uuid.UUID) -> None:
            entry = expected.pop((p, str(cid)), None)
            checked = await audit.check(conn, p, cid, checkpoint=entry["seq"] if entry else None)
            if checked is None:
                tombstone = await audit.tombstone(conn, p, cid)
                if tombstone is not None:
                    report.erased_one(p, cid, tombstone)
                elif entry is not None:
                    report.broken_at(p, cid, 1, chain.REMOVED)  # gone, and no erasure says why
                return
            _judge(report, p, cid, checked[0], entry)

        if keys is not None:
            for p, cid in keys:
                await one(p, cid)
        else:
            async for row in audit.conversations(conn):
                await one(row["principal"], row["id"])
            async for row in audit.tombstones(conn):
                expected.pop((row["principal"], str(row["conversation_id"])), None)
                report.erased_one(row["principal"], row["conversation_id"], row)
        # what the digest lists and the database no longer has, without a tombstone to say why
        for (p, cid) in sorted(expected):
            report.broken_at(p, cid, 1, chain.REMOVED)
    finally:
        await conn.close()
    what = f"against the digest of {digest['taken_at']}" if digest else "chains"
    return report.summary(what)


def _file_rows(path: str):
    """The events of an export file, checked to be one conversation's stored events."""
    cid = None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise SystemExit(f"chatlog verify: {path} line {number} is not JSON") from None
            if not isinstance(row, dict) or type(row.get("seq")) is not int \
                    or not isinstance(row.get("conversation_id"), str):
                raise SystemExit(f"chatlog verify: {path} line {number} is not a stored event")
            if cid is None:
                cid = row["conversation_id"]
            elif row["conversation_id"] != cid:
                raise SystemExit(f"chatlog verify: {path} line {number} is another conversation's event")
            yield row


def _verify_file(path: str, digest_path: str | None, principal: str | None) -> int:
    digest = _load_digest(digest_path) if digest_path else None
    report = _Report(quiet=True)
    rows = _file_rows(path)
    first = next(rows, None)
    if first is None:
        raise SystemExit(f"chatlog verify: {path} holds no event")
    cid = first["conversation_id"]
    entry = None
    if digest is not None:
        entries = [e for e in digest["conversations"] if e["id"] == cid and principal in (None, e["principal"])]
        if len(entries) > 1:
            raise SystemExit(f"chatlog verify: the digest lists {cid} for several principals; name one (--principal)")
        entry = entries[0] if entries else None
        if entry is None:
            sys.stderr.write(f"chatlog verify: the digest does not list {cid}; checking the chain alone\n")
    verdict = chain.verify(cid, itertools.chain([first], rows), checkpoint=entry["seq"] if entry else None)
    _judge(report, entry["principal"] if entry else principal or "-", cid, verdict, entry)
    return report.summary(f"file {path}")


async def _digest(url: str) -> int:
    conn = await audit.connect(url)
    try:
        started = time.monotonic()
        digest = await audit.digest(conn)
    finally:
        await conn.close()
    sys.stdout.buffer.write(orjson.dumps(digest, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stderr.write(f"chatlog digest: {len(digest['conversations'])} conversations, root {digest['root']} "
                     f"({time.monotonic() - started:.1f} s)\n")
    return 0


async def _export(url: str, conversation: uuid.UUID, principal: str | None) -> int:
    conn = await audit.connect(url)
    try:
        principals = [principal] if principal else await audit.principals_of(conn, conversation)
        if len(principals) != 1:
            sys.stderr.write(f"chatlog export: {conversation} " + (
                "was not found\n" if not principals else
                f"belongs to several principals ({', '.join(principals)}); name one with --principal\n"))
            return 1
        out, count = sys.stdout.buffer, 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            async for event in audit.events(conn, principals[0], conversation):
                out.write(orjson.dumps(event) + b"\n")
                count += 1
        out.flush()
        if count == 0:
            tombstone = await audit.tombstone(conn, principals[0], conversation)
            sys.stderr.write(f"chatlog export: {conversation} " + (
                f"was erased at {tombstone['erased_at']}\n" if tombstone else "was not found\n"))
            return 1
        sys.stderr.write(f"chatlog export: {count} events of {conversation} ({principals[0]})\n")
        return 0
    finally:
        await conn.close()


def _url(command: str) -> str:
    from api.settings import Settings

    url = Settings().database_url
    if not url:
        raise SystemExit(f"chatlog {command}: set DATABASE_URL to the database to read")
    return url


def verify(args: argparse.Namespace) -> None:
    if args.file:
        sys.exit(_verify_file(args.file, args.digest, args.principal))
    sys.exit(asyncio.run(_verify_db(_url("verify"), args.conversation, args.principal, args.digest, args.quiet)))


def digest(_: argparse.Namespace) -> None:
    sys.exit(asyncio.run(_digest(_url("digest"))))


def export(args: argparse.Namespace) -> None:
    sys.exit(asyncio.run(_export(_url("export"), args.conversation, args.principal)))


def add_commands(commands: Any) -> None:
    """Add verify, digest and export to `chatlog`'s subcommands."""
    check = commands.add_parser(
        "verify", help="recompute every conversation's hash chain (or one, or an export file); exit 1 on any break",
        description="Recompute hash chains from the events. A line per broken or erased conversation on stdout, "
                    "progress and a summary on stderr; exit status 1 when anything is broken.")
    check.add_argument("--conversation", type=uuid.UUID, help="only this conversation (its id)")
    check.add_argument("--principal", help="the principal owning --conversation (ids are per principal)")
    check.add_argument("--digest", metavar="FILE",
                       help="a `chatlog digest` kept elsewhere: also prove nothing up to each of its heads changed")
    check.add_argument("--file", metavar="FILE", help="check a `chatlog export` file instead, with no database")
    check.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    check.set_defaults(func=verify)
    dig = commands.add_parser("digest", help="print every conversation's head and one root hash over them (JSON)")
    dig.set_defaults(func=digest)
    out = commands.add_parser("export", help="print one conversation's events with their hashes, one JSON per line")
    out.add_argument("--conversation", type=uuid.UUID, required=True, help="the conversation's id")
    out.add_argument("--principal", help="its principal (needed when several have a conversation with this id)")
    out.set_defaults(func=export)
