"""`chatlog serve`, `chatlog migrate` and `chatlog fake-upstream`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from pydantic import ValidationError

from api.audit_cli import add_commands as add_audit_commands
from api.settings import Settings
from store.migrate import migrate_url

log = logging.getLogger("chatlog")


def _start_embedded(settings: Settings) -> str:
    """Start (or reuse) the embedded PostgreSQL under data_dir; return its URL."""
    import pgserver  # imported here: only needed without DATABASE_URL

    pgdata = (settings.data_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    log.warning("DATABASE_URL is not set: starting an embedded PostgreSQL, data in %s", pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()


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
        log.warning("--fake-upstream: turns are answered by the fake upstream at %s (scripted replies, "
                    "see `[fake:...]` directives in runner/fake_upstream.py)", upstream)
    settings = _settings()
    url = settings.database_url or _start_embedded(settings)
    applied = asyncio.run(migrate_url(url))
    log.info("migrations applied now: %s", ", ".join(applied) or "none (schema up to date)")
    # Workers are separate processes: they read the URL from the environment.
    os.environ["DATABASE_URL"] = url
    # After a graceful stop uvicorn raises the signal again with the handler
    # that was there before: make SIGTERM end like Ctrl-C (exit 0, atexit
    # runs, so the embedded PostgreSQL stops too) instead of killing us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    uvicorn.run("api.app:create_app", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, workers=args.workers or settings.workers,
                log_level=settings.log_level, access_log=settings.access_log,
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs whole initdb transcripts at INFO
    parser = argparse.ArgumentParser(prog="chatlog", description="Event-sourced LLM chat log on PostgreSQL.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="apply migrations and serve the API")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--workers", type=int)
    run.add_argument("--fake-upstream", action="store_true",
                     help="answer turns with a scripted fake model in this process (no API key needed)")
    run.set_defaults(func=serve)
    fake = commands.add_parser("fake-upstream", help="a scripted OpenAI-compatible streaming upstream, for trying "
                                                     "and testing the runner without an API key")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8089)
    fake.set_defaults(func=fake_upstream)
    mig = commands.add_parser("migrate", help="apply migrations to DATABASE_URL")
    mig.set_defaults(func=migrate)
    add_audit_commands(commands)  # verify, digest, export (api/audit_cli.py)
    commands.add_parser("bench", help="measure chatlog side by side with its baselines (bench/README.md)",
                           add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # its own options live in bench/cli.py (an extra: pip install 'chatlog[bench]')
        from bench.cli import main as bench_main

        sys.exit(bench_main(rest))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
