"""All configuration, from the environment (prefix CHATLOG_) or a .env file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_ORIGIN = re.compile(r"^https?://[^/\s,]+$")


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/chatlog, else ~/.local/share/chatlog: the same place from
    any working directory (the XDG base directory rule: a relative
    XDG_DATA_HOME is ignored)."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "chatlog"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATLOG_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "CHATLOG_DATABASE_URL"),
        description="PostgreSQL URL. Unset: `chatlog serve` starts an embedded PostgreSQL in CHATLOG_DATA_DIR.")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the embedded PostgreSQL keeps its data (without DATABASE_URL). "
                    "Default: $XDG_DATA_HOME/chatlog, else ~/.local/share/chatlog.")
    api_keys: str = Field("", description="`key1=alice,key2=bob`: bearer key = principal. Empty: open mode.")
    host: str = Field("127.0.0.1", description="The address `chatlog serve` listens on.")
    port: int = Field(8000, description="The port `chatlog serve` listens on.")
    workers: int = Field(1, ge=1, description="Server processes (each with its own pool and writers).")
    pool_size: int = Field(10, description="PostgreSQL connections per process.")
    writers: int = Field(4, description="Group-commit writer tasks per process.")
    max_batch_events: int = Field(1000, description="Events one append may carry.")
    max_event_bytes: int = Field(256 * 1024, description="Size of one event's data, as JSON.")
    max_body_bytes: int = Field(8 * 1024 * 1024, description="Size of one request body.")
    acquire_timeout_seconds: float = Field(
        1.0, gt=0, description="Longest wait for a PostgreSQL connection (pool exhausted, server unreachable): then 503.")
    statement_timeout_seconds: float = Field(
        1.5, gt=0, description="Longest wait for one statement's answer (a read's includes its wait for a connection).")
    commit_outcome_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a write whose COMMIT reply was lost keeps asking whether it committed "
                                "before it answers 503 with details.outcome 'unknown'.")
    shutdown_grace_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM: longest wait for requests in flight before they are cut.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Least severe log level written (critical, error, warning, info, debug, trace).")
    access_log: bool = Field(
        True, description="One log line per request (request id, principal, route, status, latency, bytes; stream "
                          "tokens redacted). `off` saves the ~50 us of CPU a line costs, about 5 % of a one-event "
                          "append (measured).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines, chatlog's and uvicorn's: `text`, or `json` (one object a line: time, level, "
                            "logger, message, request_id; an access line adds principal, method, route, path, "
                            "status, latency_ms, bytes).")
    heartbeat_seconds: float = Field(15.0, description="SSE heartbeat (`: ping`) interval.")
    stream_token_ttl_seconds: int = Field(300, description="Lifetime of a stream token.")
    token_secret: str | None = Field(None, description="Key for stream tokens; unset: a random key kept in the database.")
    cors_origins: str = Field("", description="Comma-separated origins allowed to call the API from browsers.")
    # -- the turn runner (runner/) --
    upstream_base_url: str | None = Field(
        None, description="OpenAI-compatible Chat Completions base URL (ends in /v1). Unset: POST /turns is 503 no_upstream.")
    upstream_api_key: str | None = Field(None, description="Bearer key for the upstream.")
    model: str = Field("gpt-4o-mini", min_length=1, description="The model a turn uses when its request names none.")
    upstream_timeout_seconds: float = Field(
        120.0, gt=0, description="Longest wait for the upstream: to connect, and between two chunks.")
    runner_concurrency: int = Field(64, ge=1, description="Turns one process runs at once; more wait as `queued`.")
    runner_flush_ms: float = Field(
        25.0, gt=0, description="A turn's deltas are appended at most this long after they arrive (group commit).")
    runner_flush_events: int = Field(64, ge=1, description="... or as soon as this many are waiting.")
    runner_lease_ttl_seconds: float = Field(
        10.0, gt=0, description="A process that has not renewed its lease for this long counts as dead: its turns are "
                                "closed as `interrupted` within about 1.3x this.")

    @field_validator("api_keys")
    @classmethod
    def _keys_are_key_equals_principal(cls, value: str) -> str:
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        for pair in pairs:
            key, sep, principal = pair.partition("=")
            if not sep or not key.strip() or not principal.strip():
                raise ValueError(f"entry {pair!r} is not of the form key=principal (e.g. k1=alice,k2=bob)")
        keys = [p.partition("=")[0].strip() for p in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a key appears twice")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_scheme_and_host(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if not _ORIGIN.match(origin):
                raise ValueError(f"origin {origin!r} is not of the form https://host[:port] (no path, no slash)")
        return value

    def principals_by_key(self) -> dict[str, str]:
        """bearer key -> principal (empty: open mode)."""
        pairs = (p.strip().partition("=") for p in self.api_keys.split(",") if p.strip())
        return {key.strip(): principal.strip() for key, _, principal in pairs}

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
