"""The HTTP client for the upstream Chat Completions endpoint.

Plain httpx, not the `openai` SDK: the runner must send exactly the bytes it
hashed into `model.requested` (the SDK re-serialises the body), and the SDK
was measured to cost ~0.3 ms of CPU per chunk, 4.3x raw httpx (200 concurrent
200-chunk streams against the fake upstream in its own process: 297-344 ms
of client CPU per 1,000 chunks with the SDK, 71-75 ms with httpx).

`Upstream.stream(body)` yields the parsed `data:` chunks of one streamed call.
Connection errors, 429 and 5xx before the first chunk are retried with
bounded exponential backoff that honours `Retry-After` (seconds or an HTTP
date; `retry-after-ms` too); anything later, and any other status, is an
`UpstreamError` carrying the status and the upstream's own message.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from typing import AsyncIterator

import httpx
import orjson

from store import metrics

log = logging.getLogger("chatlog.runner")

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class UpstreamError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def error(self) -> dict:
        """As `turn.failed` records it."""
        data = {"code": "upstream_error", "message": self.message}
        if self.status is not None:
            data["status"] = self.status
        return data


def _message_of(status: int, body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else error
        if text:
            return f"the upstream answered {status}: {text}"
    except (orjson.JSONDecodeError, AttributeError):
        pass
    snippet = body[:200].decode("utf-8", "replace").strip()
    return f"the upstream answered {status}" + (f": {snippet}" if snippet else "")


def retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


class Upstream:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, attempts: int = 4,
                 max_backoff: float = 20.0, max_connections: int = 1000) -> None:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.attempts = attempts
        self.max_backoff = max_backoff
        # `timeout` bounds every wait: connecting, and each read (the gap between chunks)
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=100))

    async def close(self) -> None:
        await self.client.aclose()

    async def stream(self, body: bytes) -> AsyncIterator[dict]:
        """The chunks of one streamed call of `body` (the exact bytes sent).
        Ends after `data: [DONE]`; a stream that ends without it and without a
        finish reason is an UpstreamError (the connection broke)."""
        attempt = 0
        while True:
            attempt += 1
            received = False
            sent = time.perf_counter()
            try:
                async with self.client.stream("POST", self.url, content=body) as response:
                    if response.status_code != 200:
                        text = await response.aread()
                        error = UpstreamError(_message_of(response.status_code, text), response.status_code)
                        metrics.UPSTREAM_ERRORS.labels(str(response.status_code), "status").inc()
                        if response.status_code in RETRY_STATUSES and attempt < self.attempts:
                            await self._backoff(attempt, retry_after(response.headers), error)
                            continue
                        raise error
                    finished = False
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            return
                        try:
                            chunk = orjson.loads(payload)
                        except orjson.JSONDecodeError:
                            metrics.UPSTREAM_ERRORS.labels("200", "bad_chunk").inc()
                            raise UpstreamError(f"the upstream sent a chunk that is not JSON: {payload[:80]!r}",
                                                200) from None
                        if not received:
                            received = True
                            metrics.UPSTREAM_SECONDS.observe(time.perf_counter() - sent)
                        if not finished and any(isinstance(c, dict) and c.get("finish_reason")
                                                for c in chunk.get("choices") or ()):
                            finished = True
                        yield chunk
                    if not finished:
                        metrics.UPSTREAM_ERRORS.labels("200", "truncated").inc()
                        raise UpstreamError("the upstream stream ended before it finished (no finish reason, "
                                            "no [DONE])", 200)
                    return
            except httpx.TimeoutException as exc:
                error = UpstreamError(f"the upstream did not answer within the timeout ({type(exc).__name__})")
                metrics.UPSTREAM_ERRORS.labels("200" if received else "none", "timeout").inc()
            except httpx.TransportError as exc:
                error = UpstreamError(f"the upstream connection failed: {type(exc).__name__}: {exc}",
                                      200 if received else None)
                metrics.UPSTREAM_ERRORS.labels("200" if received else "none", "transport").inc()
            if received or attempt >= self.attempts:
                raise error
            await self._backoff(attempt, None, error)

    async def _backoff(self, attempt: int, after: float | None, error: UpstreamError) -> None:
        delay = min(self.max_backoff, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        if after is not None:
            delay = min(self.max_backoff, max(after, 0.0))
        log.info("upstream call failed (%s); retry %d in %.2fs", error.message, attempt, delay)
        await asyncio.sleep(delay)
