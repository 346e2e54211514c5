"""`chatlog bench --quick` as a user runs it: every section, against this run's
PostgreSQL, as a separate process. It fails only when a run breaks (an error,
a lost event), never on a timing: no figure is compared with anything here."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path

from bench.cli import SECTIONS


async def test_bench_quick_runs_every_section_and_reports_finite_figures(pg_server, tmp_path):
    report = tmp_path / "bench.json"
    chatlog = Path(sys.executable).parent / "chatlog"
    env = {**os.environ, "TEST_DATABASE_URL": pg_server.admin_url}
    env.pop("DATABASE_URL", None)
    proc = await asyncio.create_subprocess_exec(
        str(chatlog), "bench", "--quick", "--json", str(report), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:  # a hang guard, not a timing: --quick takes about 2 minutes on 2 busy cores
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=900)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]

    result = json.loads(report.read_text())
    assert [s["name"] for s in result["sections"]] == SECTIONS
    assert all(s["error"] is None for s in result["sections"]), result["sections"]
    for section in SECTIONS:
        rows = [r for r in result["rows"] if r["section"] == section]
        assert rows, f"section {section} reported nothing"
        for row in rows:
            assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), row
            assert row["ratio"] is None or math.isfinite(row["ratio"]), row
    assert "| section | variant | figure |" in text  # the markdown table went to stdout
