"""The real Vercel AI SDK as a test oracle for `format=ui` streams.

`check_sse(bodies)` hands SSE bodies to tests/js/check-ui-stream.mjs, one node
process kept for the whole run (node and the SDK take most of a second to
start; a body then takes about a millisecond), and returns, per
installed SDK version, one result per body: `{"problems", "errors", "chunks",
"messages"}` (see the script's header). node_modules is installed from the
committed package-lock.json on first use; a missing npm is an error, never a skip.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import select
import shutil
import subprocess
import tempfile
from hashlib import sha1
from pathlib import Path

JS = Path(__file__).parent / "js"
SCRIPT = JS / "check-ui-stream.mjs"
_LOCK = JS / "package-lock.json"
# npm ci writes this last; it is older than the lock file when the lock changed since.
_INSTALLED = JS / "node_modules" / ".package-lock.json"


def ensure_installed() -> None:
    if _INSTALLED.exists() and _INSTALLED.stat().st_mtime >= _LOCK.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("tests/test_ui_stream.py needs Node.js 20+ with npm (to install the `ai` package "
                           "from tests/js/package-lock.json); none was found on PATH")
    # One installer at a time when test processes run in parallel.
    # (The lock file lives outside node_modules, which npm ci deletes.)
    lock_path = Path(tempfile.gettempdir()) / f"chatlog-npm-{sha1(str(JS).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _INSTALLED.exists() and _INSTALLED.stat().st_mtime >= _LOCK.stat().st_mtime:
            return
        done = subprocess.run([npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund", "--loglevel=error"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"npm ci in {JS} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def check_sse(bodies: list[str]) -> dict[str, list[dict]]:
    """`{sdk version: [result per body]}` for SSE `bodies` (text, as sent)."""
    global _worker
    if _worker is None or _worker.poll() is not None:
        _worker = _start()
    _worker.stdin.write(json.dumps({"bodies": bodies}) + "\n")
    _worker.stdin.flush()
    if not select.select([_worker.stdout], [], [], _TIMEOUT)[0]:
        _worker.kill()
        raise RuntimeError(f"{SCRIPT.name} gave no answer in {_TIMEOUT} s")
    line = _worker.stdout.readline()
    if not line:
        _worker.stderr.seek(0)
        raise RuntimeError(f"{SCRIPT.name} exited ({_worker.wait()}):\n{_worker.stderr.read()}")
    # JavaScript numbers are doubles: read them all as floats, so 6.0000987900762848e16
    # printed as 60000987900762850 compares equal to the float it is.
    return json.loads(line, parse_int=float)["sdks"]


# One node process for the whole test run, answering a line per request.
_worker: subprocess.Popen | None = None
_TIMEOUT = 120


def _start() -> subprocess.Popen:
    ensure_installed()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("tests/test_ui_stream.py needs Node.js 20+ (`node`) on PATH")
    # stderr to a file: a pipe nobody reads could fill up and stall node.
    worker = subprocess.Popen([node, str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=tempfile.TemporaryFile(mode="w+"), text=True, encoding="utf-8", cwd=JS)
    atexit.register(_stop, worker)
    return worker


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.stdin.close()  # the script ends when its input does
        try:
            worker.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.kill()
