"""`chatlog bench [--quick] [--json FILE] [--only a,b]`: every section in one run,
one table of ratios (stdout, markdown), progress on stderr. Exit 1 when a run
breaks (an error, a lost event), never because a goal is missed."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.core import Bench

# The fixed order of a run. Throughput first, on a machine nothing else of the
# run has warmed or filled; the ceiling last, as it pushes the server hardest.
SECTIONS = ["ingest", "store_level", "processes", "runner", "fanout", "latency", "resume", "messages",
            "projections", "growth", "audit", "ceiling"]


def _commit() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return (head + (" + uncommitted changes" if dirty else "")) if head else "unknown (not a git checkout)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        return f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        return "unknown"


async def _machine(admin_url: str, source: str, argv: list[str]) -> dict:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        pg = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    return {
        "cores": os.cpu_count(), "cpu": _cpu_model(), "memory": _memory(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "postgresql": f"{pg} ({source}), synchronous_commit={sync}",
        "python": platform.python_version(), "commit": _commit(),
        "command": "chatlog bench" + ("" if not argv else " " + shlex.join(argv)),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _figure(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x >= 0.1 else f"{x:.3g}×"


def markdown(report: dict) -> str:
    m = report["machine"]
    out = [f"## chatlog bench{' --quick' if report['quick'] else ''}", "",
           f"- machine: {m['cores']} cores, {m['cpu']}, {m['memory']} memory; load average at start "
           f"{m['load_average_at_start']}",
           f"- PostgreSQL {m['postgresql']}; Python {m['python']}; commit {m['commit']}",
           f"- command: `{m['command']}`, started {m['started']}, took {report['seconds']:.0f} s", "",
           "| section | variant | figure | unit | ratio | against what | goal | met |",
           "|---|---|---:|---|---:|---|---|---|"]
    notes = []
    for k, r in enumerate(report["rows"], 1):
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        name = r["name"] + (f" [{k}]" if r["note"] else "")
        out.append(f"| {r['section']} | {name} | {_figure(r['value'])} | {r['unit']} | {_ratio(r['ratio'])} | "
                   f"{r['ratio_of'] or ''} | {r['goal'] or ''} | {met} |")
        if r["note"]:
            notes.append(f"{k}. {r['note']}")
    broken = [s for s in report["sections"] if s["error"]]
    if notes:
        out += ["", "Notes:", ""] + notes
    if broken:
        out += ["", "**Broken sections:**", ""] + [f"- {s['name']}: {s['error']}" for s in broken]
    return "\n".join(out) + "\n"


async def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from store.scratch import ScratchServer, drop_databases

    started = time.monotonic()
    server = ScratchServer(prefix="chatlog_bench")
    admin_url = await server.start()
    bench = Bench(quick=args.quick, admin_url=admin_url)
    sections = []
    try:
        machine = await _machine(admin_url, server.source, argv)
        for name in args.only or SECTIONS:
            bench._section, bench._started = name, time.monotonic()
            bench.progress("starting")
            t0 = time.monotonic()
            error = None
            try:
                module = importlib.import_module(f"bench.{name}")
                await module.run(bench)
            except Exception as exc:  # a broken section breaks the run, the others still run
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"
            seconds = time.monotonic() - t0
            bench.progress(f"done in {seconds:.1f} s" + (f", BROKEN: {error}" if error else ""))
            sections.append({"name": name, "seconds": round(seconds, 1), "error": error})
            for row in bench.rows:
                if row.section == name and not (isinstance(row.value, (int, float)) and math.isfinite(row.value)):
                    error = error or f"row {row.name!r} has no finite figure ({row.value})"
                    sections[-1]["error"] = error
    finally:
        bench._section = "cli"
        try:
            if bench._databases:
                await drop_databases(admin_url, bench._databases)
        finally:
            await server.close()
    report = {"quick": args.quick, "machine": machine, "seconds": time.monotonic() - started,
              "sections": sections, **bench.report()}
    sys.stdout.write(markdown(report))
    sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if any(s["error"] for s in sections) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="chatlog bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every section with small sizes (< 2 minutes)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--only", metavar="A,B", help="run only these sections: " + ", ".join(SECTIONS),
                        type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    args = parser.parse_args(argv)
    import logging

    for noisy in ("chatlog.migrate", "httpx"):  # a line per migration, per request: not progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    unknown = [s for s in args.only or [] if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    try:
        import uvloop

        return uvloop.run(_run(args, argv))
    except ImportError:
        return asyncio.run(_run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
