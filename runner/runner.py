"""The turn runner: chatlog calls the model itself and records every chunk.

One `Runner` per serving process. A turn runs as an asyncio task of the
process that began it, independent of any HTTP client:

    model.requested -> stream the upstream -> chunks -> events (runner.chunks)
    -> group-commit appends every `flush_ms` or `flush_events` -> step outcome
    -> tool calls: wait (waiting_for_tools) for their tool.result events, then
       the next step; else turn.finished / turn.failed.

Nothing reaches a reader before COMMIT (events only go through Store.append),
and a turn holds no database connection while it waits on the upstream or on
tool results: results are learnt from the log through the listener (NOTIFY),
the same path a reader's stream takes.

The log is the message between processes. A cancel (any process) appends
`turn.cancelled` itself and signals the owner (`chatlog_turns`), which stops
the upstream request; if the signal is lost, the owner's next append is
refused because the turn is closed, which stops it too. That refusal is also
the fence: a runner that lost its lease (its turn closed as interrupted by
another process) cannot write into the turn any more.

Leases, not a per-process lock. Each process renews a lease row (`runners`)
every ttl/3; its live turns name it as owner. Every process sweeps each
ttl/3: turns whose owner's lease has passed are closed as `turn.failed`
code `interrupted` (begun) or put back in the queue (claimed, not begun).
A process that cannot renew its own lease for a whole ttl stops its turns
without writing. Why leases: a liveness lock (a session advisory lock on a
held connection) frees instantly on kill -9, but is only as good as
PostgreSQL's view of that connection: behind a pooler, or on a half-open TCP
connection, it can stay held for the kernel's keepalive time (hours by
default), and it costs a connection per process. A lease bounds the time
explicitly (ttl + one sweep: `CHATLOG_RUNNER_LEASE_TTL_SECONDS`, default 10 s,
so about 13 s) with one small UPDATE per process per beat, whatever the
network did.

Queued requests (`if_running=enqueue`, continuations) live in `turn_runs`;
any process with a free slot claims the oldest that may start (its
conversation has no open turn and no older request), `FOR UPDATE SKIP
LOCKED`, when told a request was queued or a turn ended, and on every sweep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from contextlib import aclosing
from typing import Any

import asyncpg
import orjson

import domain
from store import metrics
from runner.chunks import (StepTranslator, add_usage, encode, model_requested, rebuild_body, request_body,
                           sha256_hex, turn_failed, turn_finished)
from runner.recorder import Recorder
from runner.upstream import Upstream, UpstreamError
from store import Store, erasure
from store.appends import NewEvent
from store.errors import InvalidEvent, NotFound, OutcomeUnknown, Unavailable
from store.rows import rfc3339
from store.turns import CHANNEL, Turns

log = logging.getLogger("chatlog.runner")

DEFAULT_MAX_STEPS = 8
PATIENCE_SECONDS = 15.0


class NoUpstream(Exception):
    message = ("no upstream model is configured: set CHATLOG_UPSTREAM_BASE_URL (and CHATLOG_UPSTREAM_API_KEY), "
               "or start `chatlog serve --fake-upstream`")


class TurnRunning(Exception):
    def __init__(self, turn_id: str) -> None:
        super().__init__(f"turn {turn_id!r} is running in this conversation; pass if_running 'interrupt' or "
                         "'enqueue' to start another")
        self.turn_id = turn_id


class TurnClosed(Exception):
    """The log refused an append because the turn is closed (cancelled, or
    closed as interrupted by another process): stop, write nothing more."""


# a turn this runner did not close itself: why (TURNS_ENDED's outcome)
_STOPPED = {"cancelled": "cancelled", "fenced": "fenced", "erased": "erased", "shutdown": "interrupted"}


class _Turn:
    def __init__(self, run: dict) -> None:
        self.principal: str = run["principal"]
        self.conversation_id: uuid.UUID = run["conversation_id"]
        self.turn_id: str = run["turn_id"]
        self.request: dict = run["request"]
        self.stop_reason: str | None = None  # "cancelled" | "shutdown" | "fenced" | "erased"
        self.waiting: asyncio.Task | None = None  # the upstream stream or the wait for results
        self.waited = False  # began while every slot was taken: its status says queued until one frees
        self.holding = False  # holds one of the runner's slots (not while it waits for tool results)
        self.outcome: str | None = None  # how this runner closed it (metrics): finished, failed, interrupted

    @property
    def key(self) -> tuple[str, uuid.UUID, str]:
        return self.principal, self.conversation_id, self.turn_id

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.waiting is not None:
            self.waiting.cancel()


def _continuation(request: dict) -> dict:
    return {k: v for k, v in request.items() if k not in ("message", "request_id", "if_running")}


class Runner:
    def __init__(self, store: Store, settings: Any) -> None:
        self.store = store
        self.settings = settings
        self.turns = Turns(store.pool)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.upstream = (Upstream(settings.upstream_base_url, settings.upstream_api_key,
                                  settings.upstream_timeout_seconds)
                         if settings.upstream_base_url else None)
        self.slots = asyncio.Semaphore(settings.runner_concurrency)
        self.free = settings.runner_concurrency
        self.running: dict[tuple, _Turn] = {}
        self.beginning: set[tuple] = set()  # claimed or inserted here, message and turn.started on their way
        self.starting = 0  # claims and starts under way
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self._beat: asyncio.Task | None = None
        self._unlisten = None
        self._unlisten_erased = None
        self._claiming: asyncio.Task | None = None
        self._renewed = time.monotonic()

    # -- lifetime -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self.turns.heartbeat(self.id, self.settings.runner_lease_ttl_seconds)
        except Unavailable as exc:
            log.warning("runner: first heartbeat failed (%s); retrying in the background", exc)
        if self.store.listener is not None:  # cancels and queued requests, from every process
            self._unlisten = await self.store.listener.listen(CHANNEL, self._on_signal, self.kick)
            # an erased conversation's turns stop at once (their appends would be refused anyway)
            self._unlisten_erased = await self.store.listener.listen(erasure.CHANNEL, self._on_erased, lambda: None)
        self._beat = asyncio.create_task(self._beat_loop(), name="chatlog-runner-beat")

    def begin_shutdown(self) -> None:
        """SIGTERM: take no more turns; close the running ones as interrupted
        (what they received so far is appended first)."""
        if self.closing:
            return
        self.closing = True
        for turn in list(self.running.values()):
            turn.stop("shutdown")

    async def close(self, grace: float = 10.0) -> None:
        self.begin_shutdown()
        for task in (self._beat, self._claiming):
            if task is not None:
                task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        if self._unlisten is not None:
            await self._unlisten()
        if self._unlisten_erased is not None:
            await self._unlisten_erased()
        try:
            await self.turns.retire(self.id)
        except Exception:  # noqa: BLE001 -- shutting down: the lease expires by itself
            pass
        if self.upstream is not None:
            await self.upstream.close()

    async def _beat_loop(self) -> None:
        ttl = self.settings.runner_lease_ttl_seconds
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                await self.turns.heartbeat(self.id, ttl)
                self._renewed = time.monotonic()
            except Exception as exc:  # noqa: BLE001
                log.warning("runner: lease renewal failed: %s", exc)
                if time.monotonic() - self._renewed > ttl:
                    # others may already have closed our turns: stop writing
                    for turn in list(self.running.values()):
                        turn.stop("fenced")
                continue
            try:
                await self._sweep()
            except Exception as exc:  # noqa: BLE001
                log.warning("runner: sweep failed: %s", exc)
            self.kick()

    async def _sweep(self) -> None:
        """Close the turns of dead processes; requeue what they had claimed but
        not begun. Our own runs that no task drives (their end could not be
        recorded while the store was away) are settled the same way."""
        # (not while a claim or start is under way here: its row exists before its key is tracked)
        ours = [] if self.starting else [r for r in await self.turns.live_of(self.id) if self._untracked(r)]
        for run in ours + await self.turns.orphans():
            key = (run["principal"], run["conversation_id"], run["turn_id"])
            if run["owner"] == self.id and not self._untracked(run):
                continue
            p, cid, turn_id = key
            try:
                _, end = await self.store.turn_span(p, cid, turn_id)
            except NotFound:
                await self.turns.requeue(p, cid, turn_id)
                continue
            if end is None:
                log.warning("runner: closing turn %s of conversation %s: its process (%s) is gone",
                            turn_id, cid, run["owner"])
                try:
                    await self.store.append(p, cid, [NewEvent("turn.failed", {"turn_id": turn_id, "error": {
                        "code": "interrupted",
                        "message": "the process running this turn stopped before the turn ended"}},
                        id=f"turn:{turn_id}:interrupted")])
                except InvalidEvent:
                    pass  # closed meanwhile
            await self.turns.end(p, cid, turn_id)
        await self.turns.forget_dead(self.settings.runner_lease_ttl_seconds)

    def _untracked(self, run: dict) -> bool:
        key = (run["principal"], run["conversation_id"], run["turn_id"])
        return key not in self.running and key not in self.beginning

    def _on_signal(self, payload: str) -> None:
        if payload == "queued":
            self.kick()
            return
        try:
            message = orjson.loads(payload)
            p, cid, turn_id = message["cancel"]
            turn = self.running.get((p, uuid.UUID(cid), turn_id))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            return
        if turn is not None:
            turn.stop("cancelled")

    def _on_erased(self, payload: str) -> None:
        """A conversation was erased (store/erasure.py): its turns here stop
        writing; its queued requests went with it (the erase deleted them)."""
        conversation, principal = payload.split(":", 1)
        cid = uuid.UUID(conversation)
        for turn in list(self.running.values()):
            if turn.principal == principal and turn.conversation_id == cid:
                turn.stop("erased")

    # -- the queue ----------------------------------------------------------------------

    def kick(self) -> None:
        """Claim queued requests while there are free slots (once at a time)."""
        if self.closing or self.upstream is None or self.free <= 0:
            return
        if self._claiming is None or self._claiming.done():
            self._claiming = asyncio.create_task(self._claim(), name="chatlog-runner-claim")

    async def _claim(self) -> None:
        self.starting += 1
        try:
            await self._claim_while_free()
        finally:
            self.starting -= 1

    async def _claim_while_free(self) -> None:
        while not self.closing and self.free > 0:
            try:
                run = await self.turns.claim(self.id)
            except Exception as exc:  # noqa: BLE001 -- the next kick or sweep tries again
                log.warning("runner: claiming a queued turn failed: %s", exc)
                return
            if run is None:
                return
            turn = _Turn(run)
            try:
                await self._begin(turn)
            except InvalidEvent as exc:  # a turn was opened meanwhile: wait for it to end
                log.info("runner: queued turn %s waits: %s", turn.turn_id, exc.message)
                await self.turns.requeue(*turn.key)
                return
            except NotFound:  # its conversation was erased, and the request with it
                continue
            except Unavailable as exc:
                log.warning("runner: beginning queued turn %s failed: %s", turn.turn_id, exc)
                if isinstance(exc, OutcomeUnknown):
                    self._spawn(turn)  # it may have begun: run it (a first append refused ends it)
                else:
                    await self.turns.requeue(*turn.key)
                return
            if await self._dropped_while_beginning(turn):
                continue
            self._spawn(turn)

    async def _dropped_while_beginning(self, turn: _Turn) -> bool:
        """A cancel that came between the claim and the committed begin marked
        the request dropped (see cancel): the turn ends cancelled, unrun."""
        run = await self.turns.get(*turn.key)
        if run is None or run["status"] != "dropped":
            return False
        try:
            await self.store.append(turn.principal, turn.conversation_id,
                                    [NewEvent("turn.cancelled", {"turn_id": turn.turn_id},
                                              id=f"turn:{turn.turn_id}:cancelled")])
        except InvalidEvent:
            pass  # the cancel's own look found it begun and closed it
        await self.turns.notify("queued")  # the next queued request may start, here or elsewhere
        return True

    # -- starting, cancelling -------------------------------------------------------------

    async def start(self, principal: str, conversation_id: uuid.UUID, request: dict) -> tuple[str, str, bool]:
        """Start (or enqueue) a turn: (turn_id, status, created).

        `request` is POST /turns' body as plain JSON (api/routes/turns.py
        StartTurn, validated): `message` ({"role": "user", "content", "name"?}),
        `request_id`, `model`, `tools`, `tool_choice`, `max_steps`, `params`,
        `if_running` ("reject" | "interrupt" | "enqueue"); all optional.
        `status` is "running", or "queued" (enqueued, or waiting for a free
        slot); `created` is False when `request_id` named an existing turn.
        The message and turn.started are committed before it returns, unless
        the request was enqueued. Raises NotFound, NoUpstream, TurnRunning
        (another turn is open and `if_running` is "reject"), InvalidEvent."""
        self.starting += 1
        try:
            return await self._start(principal, conversation_id, request)
        except asyncpg.ForeignKeyViolationError:  # its row was refused: the conversation was erased meanwhile
            raise await self.store.missing(principal, conversation_id) from None
        finally:
            self.starting -= 1

    async def _start(self, principal: str, conversation_id: uuid.UUID, request: dict) -> tuple[str, str, bool]:
        conversation = await self.store.get_conversation(principal, conversation_id)  # 404 first, for anyone
        if self.upstream is None:
            raise NoUpstream(NoUpstream.message)
        if self.closing:
            raise Unavailable("this process is shutting down; send the request again")
        request_id = request.get("request_id")
        if request_id is not None:
            existing = await self.turns.by_request_id(principal, conversation_id, request_id)
            if existing is not None:
                return existing["turn_id"], await self._status_of(existing), False
        busy = conversation["open_turn_id"] or await self.turns.first_waiting(principal, conversation_id)
        mode = request.get("if_running") or "reject"
        turn_id = str(uuid.uuid4())
        if busy and mode == "reject":
            raise TurnRunning(busy)
        if busy and mode == "enqueue":
            run, created = await self.turns.add(principal, conversation_id, turn_id, request_id, request, "queued", None)
            if created:
                await self.turns.notify("queued")  # it may start at once, if the turn ended meanwhile
            return run["turn_id"], await self._status_of(run), created
        if busy and mode == "interrupt" and conversation["open_turn_id"]:
            await self.cancel(principal, conversation_id, conversation["open_turn_id"], reason="interrupted")
        run, created = await self.turns.add(principal, conversation_id, turn_id, request_id, request,
                                            "running" if self.free > 0 else "starting", self.id)
        if not created:
            return run["turn_id"], await self._status_of(run), False
        turn = _Turn(run)
        try:
            await self._begin(turn)
        except (InvalidEvent, NotFound) as exc:  # NotFound: erased meanwhile (410), nothing begun
            await self.turns.remove(principal, conversation_id, turn_id)
            if exc.details.get("rule") in ("one_open_turn", "no_message_during_turn"):
                current = await self.store.get_conversation(principal, conversation_id)
                raise TurnRunning(current["open_turn_id"] or "unknown") from None
            raise
        except BaseException as exc:
            if isinstance(exc, Unavailable) and not isinstance(exc, OutcomeUnknown):  # wrote nothing
                await self.turns.remove(principal, conversation_id, turn_id)
            else:
                # the begin may have committed (its outcome is unknown, or this request was
                # cancelled while the writer went on): run it; if it did not, its first
                # append is refused (no open turn) and it ends there
                self._spawn(turn)
            raise
        waits = self.free <= 0
        self._spawn(turn)
        return turn_id, "queued" if waits else "running", True

    async def _begin(self, turn: _Turn) -> None:
        """The message (if any) and turn.started, with ids made from the turn id,
        so writing them again (a re-claimed request) is an idempotent retry."""
        self.beginning.add(turn.key)
        try:
            await self._write_begin(turn)
        finally:
            self.beginning.discard(turn.key)

    async def _write_begin(self, turn: _Turn) -> None:
        request = turn.request
        events = []
        message = request.get("message")
        if message:
            data = {"content": message["content"]}
            if message.get("name") is not None:
                data["name"] = message["name"]
            events.append(NewEvent("message.user", data, id=f"turn:{turn.turn_id}:message"))
        started = {"turn_id": turn.turn_id, "model": request.get("model") or self.settings.model}
        if request.get("request_id") is not None:
            started["request_id"] = request["request_id"]
        events.append(NewEvent("turn.started", started, id=f"turn:{turn.turn_id}:started"))
        await self.store.append(turn.principal, turn.conversation_id, events)

    def _spawn(self, turn: _Turn) -> None:
        turn.waited = self.free <= 0
        self.free -= 1
        self.running[turn.key] = turn
        task = asyncio.create_task(self._drive(turn), name=f"chatlog-turn-{turn.turn_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel(self, principal: str, conversation_id: uuid.UUID, turn_id: str,
                     reason: str | None = None) -> None:
        """Cancel a turn, idempotently, wherever it runs: a queued request is
        dropped; a begun turn gets `turn.cancelled` (if still open) and its
        runner, here or in another process, stops. NotFound for an unknown turn."""
        run = await self.turns.get(principal, conversation_id, turn_id)
        if run is not None and run["status"] == "queued":
            if await self.turns.set_status(principal, conversation_id, turn_id, "dropped", only_from=("queued",)):
                return
        try:
            _, end = await self.store.turn_span(principal, conversation_id, turn_id)
        except NotFound:
            if run is None:
                raise
            # claimed by a process that has not begun it yet: mark it dropped, then
            # look again. Its claimer reads the mark after its begin is committed
            # (_claim_while_free), so either it sees the mark and cancels the turn
            # itself, or the turn has begun by the time we look again and we cancel
            # it here: never a turn that runs after its cancel was answered.
            await self.turns.set_status(principal, conversation_id, turn_id, "dropped",
                                        only_from=("queued", "starting", "running"))
            try:
                _, end = await self.store.turn_span(principal, conversation_id, turn_id)
            except NotFound:
                return
        if end is None:
            data = {"turn_id": turn_id}
            if reason:
                data["reason"] = reason
            try:
                await self.store.append(principal, conversation_id,
                                        [NewEvent("turn.cancelled", data, id=f"turn:{turn_id}:cancelled")])
            except InvalidEvent:
                pass  # it ended meanwhile
        turn = self.running.get((principal, conversation_id, turn_id))
        if turn is not None:
            turn.stop("cancelled")
        elif run is not None:
            await self.turns.notify(orjson.dumps({"cancel": [principal, str(conversation_id), turn_id]}).decode())

    # -- one turn -----------------------------------------------------------------------

    async def _append(self, turn: _Turn, events: list[tuple[str, dict]]):
        """Append `events` to the turn's conversation (patiently); TurnClosed
        when the log refuses because the turn is closed, or its conversation
        was erased."""
        batch = [NewEvent(t, d) for t, d in events]
        try:
            appended = await self._patiently(self.store.append, turn.principal, turn.conversation_id, batch)
            kind, data = events[-1]
            if kind in ("turn.finished", "turn.failed"):
                turn.outcome = ("finished" if kind == "turn.finished" else "interrupted"
                                if (data.get("error") or {}).get("code") == "interrupted" else "failed")
            return appended
        except NotFound as exc:
            raise TurnClosed(exc.message) from None
        except InvalidEvent as exc:
            if exc.details.get("rule") in ("needs_open_turn", "needs_started_call"):
                raise TurnClosed(exc.message) from None
            raise

    async def _patiently(self, call, *args):
        """`call(*args)`, again while the store is unavailable (a 503 wrote
        nothing: store/errors.py), for up to PATIENCE_SECONDS: a burst that
        exhausts the pool delays a turn, it does not fail it. A write whose
        outcome is unknown is not repeated."""
        deadline = time.monotonic() + PATIENCE_SECONDS
        delay = 0.05
        while True:
            try:
                return await call(*args)
            except OutcomeUnknown:
                raise
            except Unavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("runner: %s: %s; trying again", getattr(call, "__name__", call), exc.message)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    def _recorder(self, turn: _Turn) -> Recorder:
        return Recorder(lambda events: self._append(turn, events), self.settings.runner_flush_ms / 1000,
                        self.settings.runner_flush_events)

    async def _drive(self, turn: _Turn) -> None:
        try:
            await self._take_slot(turn)
            if turn.stop_reason is None and turn.waited:
                await self._patiently(self.turns.set_status, *turn.key, "running", None, ("starting",))
            await self._run(turn)
        except TurnClosed:
            pass
        except NotFound:  # its conversation was erased (a read of it answered so): nothing to close
            pass
        except Exception as exc:  # noqa: BLE001 -- a turn never stays open because of a bug
            log.exception("runner: turn %s failed", turn.turn_id)
            if turn.stop_reason not in ("cancelled", "fenced", "erased"):
                try:
                    await self._append(turn, [turn_failed(turn.turn_id, {"code": "internal_error", "message": str(exc)})])
                except Exception:  # noqa: BLE001
                    pass
        finally:
            self._give_slot(turn)
            self.free += 1
            self.running.pop(turn.key, None)
            metrics.TURNS_ENDED.labels(turn.outcome or _STOPPED.get(turn.stop_reason, "closed")).inc()
            if turn.stop_reason != "fenced":
                try:
                    await self._patiently(self.turns.end, *turn.key)
                except Exception as exc:  # noqa: BLE001 -- the sweep ends it when this process is gone
                    log.warning("runner: could not record the end of turn %s: %s", turn.turn_id, exc)
            self.kick()

    async def _take_slot(self, turn: _Turn) -> None:
        await self.slots.acquire()
        turn.holding = True

    def _give_slot(self, turn: _Turn) -> None:
        if turn.holding:
            turn.holding = False
            self.slots.release()

    async def _interrupted(self, turn: _Turn) -> None:
        await self._append(turn, [turn_failed(turn.turn_id, {
            "code": "interrupted", "message": "the server running this turn shut down before the turn ended"})])

    async def _run(self, turn: _Turn) -> None:
        request = turn.request
        model = request.get("model") or self.settings.model
        max_steps = request.get("max_steps") or DEFAULT_MAX_STEPS
        usage = None
        step = 0
        while True:
            if turn.stop_reason is not None:
                if turn.stop_reason == "shutdown":
                    await self._interrupted(turn)
                return
            step += 1
            projection = await self._patiently(self.store.messages, turn.principal, turn.conversation_id, "openai")
            at_seq, messages = projection["seq"], projection["messages"]
            try:
                body = request_body(model, messages, request.get("tools"), request.get("tool_choice"),
                                    request.get("params"))
            except ValueError as exc:
                await self._append(turn, [turn_failed(turn.turn_id, {"code": "invalid_request", "message": str(exc)})])
                return
            raw = encode(body)
            await self._append(turn, [model_requested(turn.turn_id, step, at_seq, body)])
            taken = {c["id"] for m in messages for c in m.get("tool_calls") or ()}
            translator = StepTranslator(turn.turn_id, step, taken)
            recorder = self._recorder(turn)
            turn.waiting = asyncio.create_task(self._stream(raw, translator, recorder))
            if turn.stop_reason is not None:
                turn.waiting.cancel()
            await asyncio.wait({turn.waiting})
            task, turn.waiting = turn.waiting, None
            if task.cancelled() or turn.stop_reason is not None:
                if turn.stop_reason == "shutdown":
                    recorder.add(translator.abandon())
                    await recorder.close()
                    await self._interrupted(turn)
                else:  # cancelled (turn.cancelled is in the log) or fenced: write nothing more
                    recorder.discard()
                return
            error = task.exception()
            if isinstance(error, UpstreamError):
                recorder.add(translator.abandon())
                await recorder.close()
                await self._append(turn, [("turn.failed", {"turn_id": turn.turn_id, "error": error.error()})])
                return
            if error is not None:
                recorder.discard()
                raise error
            outcome = task.result()
            last_seq = await recorder.close()
            usage = add_usage(usage, outcome.usage)
            if outcome.error is not None:
                await self._append(turn, [turn_failed(turn.turn_id, outcome.error)])
                return
            if not outcome.tool_calls or step >= max_steps:
                await self._append(turn, [turn_finished(turn.turn_id, outcome, usage)])
                return
            await self._patiently(self.turns.set_status, *turn.key, "waiting_for_tools", None, ("running",))
            calls = [c.tool_call_id for c in outcome.tool_calls]
            turn.waiting = asyncio.create_task(self._results(turn, calls, last_seq))
            if turn.stop_reason is not None:
                turn.waiting.cancel()
            # a turn waiting for tools (a person's approval may take days) calls no model: its slot
            # goes to another turn meanwhile, and it takes one back before its next step
            self._give_slot(turn)
            self.free += 1
            self.kick()
            await asyncio.wait({turn.waiting})
            self.free -= 1
            await self._take_slot(turn)
            task, turn.waiting = turn.waiting, None
            if task.cancelled() or turn.stop_reason is not None or task.result() is None:
                if turn.stop_reason in (None, "shutdown"):  # None: the listener closed (shutting down)
                    await self._interrupted(turn)
                return
            results = task.result()
            pending = [c for c in calls if results[c] == "pending"]
            if pending:
                await self._patiently(self.turns.continue_after, turn.principal, turn.conversation_id, turn.turn_id,
                                      step, pending, _continuation(request))
            await self._patiently(self.turns.set_status, *turn.key, "running", None, ("waiting_for_tools",))

    async def _stream(self, raw: bytes, translator: StepTranslator, recorder: Recorder):
        # aclosing: whatever ends the loop (a refused append included) closes the upstream request now
        async with aclosing(self.upstream.stream(raw)) as chunks:
            async for chunk in chunks:
                recorder.add(translator.feed(chunk))
                await recorder.room()  # the store is behind: read no more until it catches up
        closing, outcome = translator.finish()
        recorder.add(closing)
        return outcome

    async def _results(self, turn: _Turn, calls: list[str], after: int) -> dict[str, str] | None:
        """Wait until every call has a tool.result (its latest status, by call id);
        TurnClosed when the turn is closed meanwhile; None when the listener
        ends (shutdown)."""
        need = set(calls)
        got: dict[str, str] = {}
        follow = self.store.follow(turn.principal, turn.conversation_id, after, self.settings.heartbeat_seconds)
        async with aclosing(follow) as live:
            async for events in live:
                for event in events:
                    data = event["data"]
                    if event["type"] == "tool.result" and data["tool_call_id"] in need:
                        got[data["tool_call_id"]] = data["status"]
                    elif event["type"] in domain.TURN_ENDS and data.get("turn_id") == turn.turn_id:
                        raise TurnClosed(f"turn {turn.turn_id} was closed by {event['type']}")
                if need <= got.keys():
                    return got
        return None

    # -- reads ----------------------------------------------------------------------------

    async def _status_of(self, run: dict) -> str:
        return (await self.status(run["principal"], run["conversation_id"], run["turn_id"], run))["status"]

    async def status(self, principal: str, conversation_id: uuid.UUID, turn_id: str,
                     run: dict | None = None) -> dict:
        """GET /turns/{turn_id}. NotFound for a turn neither begun nor requested."""
        run = run or await self.turns.get(principal, conversation_id, turn_id)
        answer = {"turn_id": turn_id, "status": "queued", "steps": 0, "usage": None,
                  "started_at": None, "ended_at": None}
        try:
            start, end = await self.store.turn_span(principal, conversation_id, turn_id)
        except NotFound:
            if run is None:
                raise
            if run["status"] == "dropped":
                answer["status"] = "cancelled"
            return answer
        events = await self.turns.turn_events(principal, conversation_id, start, end)
        answer["started_at"] = rfc3339(events[0]["created_at"])
        answer["steps"] = sum(1 for e in events if e["type"] == "model.requested")
        closing = events[-1] if end is not None else None
        if closing is not None:
            answer["status"] = {"turn.finished": "finished", "turn.cancelled": "cancelled",
                                "turn.failed": "failed"}[closing["type"]]
            answer["ended_at"] = rfc3339(closing["created_at"])
            answer["usage"] = closing["data"].get("usage")
        elif run is None or run["status"] == "running":
            answer["status"] = "running"
        elif run["status"] == "waiting_for_tools":
            answer["status"] = "waiting_for_tools"
        elif run["status"] == "starting":
            answer["status"] = "queued"  # begun, waiting for a free slot
        else:
            answer["status"] = "running"
        return answer

    async def requests(self, principal: str, conversation_id: uuid.UUID, turn_id: str) -> list[dict]:
        """GET /turns/{turn_id}/requests: every upstream request body rebuilt from the log."""
        start, end = await self.store.turn_span(principal, conversation_id, turn_id)
        out = []
        for event in await self.turns.turn_events(principal, conversation_id, start, end):
            if event["type"] != "model.requested":
                continue
            data = event["data"]
            projection = await self.store.messages(principal, conversation_id, "openai", at_seq=data["at_seq"])
            body = rebuild_body(data, projection["messages"])
            out.append({"step": data["step"], "at_seq": data["at_seq"], "body": body,
                        "request_sha256": data["request_sha256"],
                        "matches": sha256_hex(encode(body)) == data["request_sha256"]})
        return out
