"""`chatlog serve`, `chatlog migrate`, `chatlog fake-upstream` and `chatlog bench`.

Every option's help, default and environment variable comes from
api/settings.py's fields: one source for the CLI, the environment and .env.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import ValidationError

from api import embedded
from api.audit_cli import add_commands as add_audit_commands
from api.settings import Settings
from store.migrate import migrate_url

log = logging.getLogger("chatlog")


def _version() -> str:
    try:
        return version("chatlog")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def env_var(name: str) -> str:
    """The environment variable behind a setting."""
    return "DATABASE_URL" if name == "database_url" else f"CHATLOG_{name.upper()}"


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == "":
        return "empty"
    return str(value)


def setting_help(name: str) -> str:
    """A setting's description, its environment variable and its default."""
    description = (Settings.model_fields[name].description or "").rstrip(".")
    return f"{description} (env {env_var(name)}; default: {_default(name)})".replace("%", "%%")


def settings_epilog() -> str:
    """Every setting, for `chatlog serve --help`."""
    lines = ["settings (environment variables, or a .env file in the working directory):"]
    for name in Settings.model_fields:
        lines.append(f"  {env_var(name)}  (default: {_default(name)})")
        description = Settings.model_fields[name].description or ""
        lines += textwrap.wrap(description, width=88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _settings() -> Settings:
    """The settings, or a clear message and exit 2 when one is malformed."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  CHATLOG_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        sys.stderr.write("chatlog: the configuration is not valid:\n" + "\n".join(lines) + "\n")
        sys.exit(2)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    if args.fake_upstream:
        # a scripted OpenAI-compatible upstream in this process (runner/fake_upstream.py): a chat that
        # streams without an API key. Set before the app reads its settings (workers inherit it).
        from runner.fake_upstream import FakeUpstream

        upstream = FakeUpstream().start_in_thread()
        os.environ["CHATLOG_UPSTREAM_BASE_URL"] = upstream
        os.environ.setdefault("CHATLOG_UPSTREAM_API_KEY", "sk-fake")
        os.environ.setdefault("CHATLOG_MODEL", "fake")
        log.info("--fake-upstream: turns are answered by the fake upstream at %s (scripted replies, "
                 "see `[fake:...]` directives in runner/fake_upstream.py)", upstream)
    settings = _settings()
    url = settings.database_url or embedded.start(Path(settings.data_dir))
    applied = asyncio.run(migrate_url(url))
    log.info("migrations applied now: %s", ", ".join(applied) or "none (schema up to date)")
    # Workers are separate processes: they read the URL from the environment.
    os.environ["DATABASE_URL"] = url
    # After a graceful stop uvicorn raises the signal again with the handler
    # that was there before: make SIGTERM end like Ctrl-C (exit 0, atexit
    # runs, so the embedded PostgreSQL stops too) instead of killing us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workers = args.workers or settings.workers
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics with N workers: each counts in its own files here, a scrape of any sums them all
        # (store/metrics.py). Set before the workers start and import prometheus_client; gone at exit.
        import atexit
        import shutil
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chatlog-metrics-")
        atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)
    from api.logs import log_config

    # uvicorn's lines in chatlog's format; the access line is chatlog's own (api/logs.py RequestLog)
    uvicorn.run("api.app:create_app", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, workers=workers,
                log_level=settings.log_level, access_log=False,
                log_config=log_config(settings.log_format, settings.log_level),
                timeout_graceful_shutdown=settings.shutdown_grace_seconds)


def migrate(_: argparse.Namespace) -> None:
    settings = _settings()
    if not settings.database_url:
        sys.exit("chatlog migrate: set DATABASE_URL to the database to migrate")
    applied = asyncio.run(migrate_url(settings.database_url))
    print("applied: " + (", ".join(applied) if applied else "nothing, the schema is up to date"))


def fake_upstream(args: argparse.Namespace) -> None:
    from runner.fake_upstream import serve as serve_fake

    serve_fake(args.host, args.port)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (they hold lists); option help wrapped."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="chatlog", formatter_class=_Formatter,
        description="chatlog: an event-sourced log for LLM chat on PostgreSQL, served over HTTP.",
        epilog="`chatlog COMMAND --help` tells more; the API reference is docs/api.md.")
    top.add_argument("--version", action="version", version=f"chatlog {_version()}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "serve", help="apply migrations and serve the API", formatter_class=_Formatter,
        description="Apply the migrations, then serve the HTTP API. Without DATABASE_URL an embedded "
                    "PostgreSQL starts\n(its data in CHATLOG_DATA_DIR) and stops with the server. Options "
                    "win over the environment.",
        epilog=settings_epilog())
    run.add_argument("--host", metavar="HOST", help=setting_help("host"))
    run.add_argument("--port", type=int, metavar="PORT", help=setting_help("port"))
    run.add_argument("--workers", type=int, metavar="N", help=setting_help("workers"))
    run.add_argument("--fake-upstream", action="store_true",
                     help="answer turns with a scripted fake model in this process (no API key needed; sets "
                          "CHATLOG_UPSTREAM_BASE_URL to it; default: off)")
    run.set_defaults(func=serve)
    fake = commands.add_parser(
        "fake-upstream", help="a scripted OpenAI-compatible streaming model, for trying the runner without a key",
        description="A scripted OpenAI-compatible Chat Completions server (runner/fake_upstream.py). Point a "
                    "server at it\nwith CHATLOG_UPSTREAM_BASE_URL=http://HOST:PORT/v1.")
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    fake.add_argument("--port", type=int, default=8089, help="port to listen on (default: %(default)s)")
    fake.set_defaults(func=fake_upstream)
    mig = commands.add_parser("migrate", help="apply migrations to DATABASE_URL and exit",
                              description="Apply the migrations (migrations/*.sql, each once) to the database "
                                          f"at DATABASE_URL and exit.\n{setting_help('database_url')}")
    mig.set_defaults(func=migrate)
    add_audit_commands(commands)  # verify, digest, export (api/audit_cli.py)
    commands.add_parser("bench", help="measure chatlog side by side with its baselines (`chatlog bench --help`)",
                        add_help=False)
    return top


def main(argv: list[str] | None = None) -> None:
    from api.logs import configure_from_environment

    configure_from_environment()  # CHATLOG_LOG_FORMAT (text or json), CHATLOG_LOG_LEVEL: api/logs.py
    top = parser()
    args, rest = top.parse_known_args(argv)
    if args.command == "bench":  # its own options live in bench/cli.py (an extra: pip install 'chatlog[bench]')
        from bench.cli import main as bench_main

        sys.exit(bench_main(rest))
    args = top.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
