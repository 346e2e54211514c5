"""The README's curl walk-through runs as written: its "The API with curl" block and its turns block, with
bash, against a real `chatlog serve --fake-upstream` with the keys the README sets (secret-a=alice,
secret-b=bob), on a database of its own. The only change is the address: the README's
http://127.0.0.1:8000 becomes the test server's.

`curl` is a shell function around the real one that records each call (its arguments, HTTP status, body,
exit code): every command must exit 0, and the answers the README's comments describe must be those. A
conversation stream that follows (the README's reader stops it with Ctrl-C) is ended after a few
seconds; whatever it received by then is checked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers import eventually, parse_sse
from tests.servers import CHATLOG, free_port

README = Path(__file__).resolve().parent.parent / "README.md"
KEYS = "secret-a=alice,secret-b=bob"
FOLLOW_SECONDS = 3

# records every call; a following stream ends after FOLLOW_SECONDS (curl's 28, "timed out", is then its end)
CURL_RECORDER = r"""
set -eo pipefail
curl() {
  local n out max=60
  n=$(date +%s%N)-$RANDOM
  out="$CALLS/$n"
  if [[ " $* " == *"/stream"* && " $* " != *"follow=false"* && " $* " != *"/turns/"* ]]; then
    max=__FOLLOW__
  fi
  printf '%s\n' "$@" > "$out.args"
  local rc=0
  command curl "$@" --max-time "$max" -o "$out.body" -w '%{http_code}' > "$out.status" || rc=$?
  echo "$rc" > "$out.rc"
  cat "$out.body"
  if [[ $rc == 28 && $max == __FOLLOW__ ]]; then return 0; fi
  return $rc
}
""".replace("__FOLLOW__", str(FOLLOW_SECONDS))


def sh_block_after(text: str, marker: str) -> str:
    """The first ```sh block after `marker`."""
    start = text.index(marker)
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert match, f"no sh block after {marker!r}"
    return match.group(1)


def walkthrough() -> str:
    text = README.read_text()
    return sh_block_after(text, "## The API with curl") + "\n" + sh_block_after(text, "Turns the server runs itself")


class Call:
    def __init__(self, base: Path):
        self.args = base.with_suffix(".args").read_text().splitlines() if base.suffix else \
            Path(f"{base}.args").read_text().splitlines()
        self.status = int(Path(f"{base}.status").read_text() or 0)
        self.rc = int(Path(f"{base}.rc").read_text())
        self.body = Path(f"{base}.body").read_bytes().decode() if Path(f"{base}.body").exists() else ""

    @property
    def method(self) -> str:
        return self.args[self.args.index("-X") + 1] if "-X" in self.args else "GET"

    @property
    def url(self) -> str:
        return next(a for a in self.args if a.startswith("http"))

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"{self.method} {self.url} -> {self.status} (rc {self.rc}) {self.body[:300]!r}"


@pytest.fixture
async def server(request, pg_server, tmp_path):
    """`chatlog serve --fake-upstream` with the README's keys (or, parametrized with "", in open mode)."""
    keys = getattr(request, "param", KEYS)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL")}
    env.update(DATABASE_URL=await pg_server.create_database(), CHATLOG_API_KEYS=keys, CHATLOG_PORT=str(port))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(CHATLOG), "serve", "--fake-upstream"], env=env, cwd=tmp_path,
                            start_new_session=True, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    async def ready():
        assert proc.poll() is None, f"chatlog serve exited:\n{log.read_text()}"
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url + "/readyz", timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        await eventually(ready, "chatlog serve --fake-upstream to be ready", timeout=60, interval=0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_walkthrough(url: str, calls: Path) -> subprocess.CompletedProcess:
    script = walkthrough()
    assert "http://127.0.0.1:8000" in script
    script = CURL_RECORDER + script.replace("http://127.0.0.1:8000", url)
    return subprocess.run(["bash", "-c", script], env={**os.environ, "CALLS": str(calls)},
                          capture_output=True, text=True, timeout=300)


def recorded(calls: Path) -> list[Call]:
    names = sorted({p.name.split(".")[0] for p in calls.iterdir()}, key=lambda n: [int(x) for x in n.split("-")])
    return [Call(calls / name) for name in names]


def one(calls: list[Call], method: str, path: str, *, body_has: str = "", header: str = "") -> Call:
    found = [c for c in calls if c.method == method and c.url.split("?")[0].endswith(path)
             and body_has in " ".join(c.args) and header in " ".join(c.args)]
    assert found, f"no {method} {path} {body_has} among {calls}"
    return found[0]


def test_the_walkthrough_blocks_are_found():
    script = walkthrough()
    assert "B=http://127.0.0.1:8000" in script and "H='Authorization: Bearer secret-a'" in script
    assert "/turns" in script
    assert "2026-" not in script, "no baked-in date (an at_time in the past of a new conversation is 422)"


async def test_the_readme_curl_walkthrough_runs_as_written(server, tmp_path):
    calls_dir = tmp_path / "calls"
    calls_dir.mkdir()
    done = run_walkthrough(server, calls_dir)
    calls = recorded(calls_dir)
    assert done.returncode == 0, f"exit {done.returncode}\nstderr:\n{done.stderr[-3000:]}\ncalls:\n{calls}"
    assert len(calls) >= 30, calls
    for call in calls:
        assert call.rc in (0, 28), call  # 28: a following stream, ended by the recorder
        assert call.status < 500, call

    # the API with curl
    conversations = [c for c in calls if c.method == "POST" and c.url.endswith("/v1/conversations")]
    created = conversations[0]
    assert created.status == 201 and created.json()["seq"] == 1
    cid = created.json()["id"]
    appended = one(calls, "POST", f"/{cid}/events", body_has='"id": "e1"')
    assert appended.status == 201
    assert appended.json()["last_seq"] == 11 and appended.json()["events"][0]["seq"] == 2
    behind = one(calls, "POST", f"/{cid}/events", body_has='"content": "hi"')
    assert behind.status == 409
    assert behind.json()["error"]["code"] == "seq_conflict"
    assert behind.json()["error"]["details"]["current_seq"] == 11
    refused = one(calls, "POST", f"/{cid}/events", body_has='"late"')
    assert refused.status == 422
    assert refused.json()["error"]["details"] == {"index": 0, "rule": "needs_open_turn", "type": "text.delta"}
    page = one(calls, "GET", f"/{cid}/events")
    assert page.status == 200 and [e["seq"] for e in page.json()["events"]] == list(range(1, 12))
    at_time = [c for c in calls if "at_time=" in c.url]
    assert len(at_time) == 1 and at_time[0].status == 200, at_time
    assert at_time[0].json()["seq"] == 11
    fork = one(calls, "POST", f"/{cid}/fork")
    assert fork.status == 201 and fork.json()["metadata"] == {"branch": "b"}
    streams = [c for c in calls if "/stream" in c.url and "stream-token" not in c.url]
    assert streams and all(c.status == 200 for c in streams), streams
    for stream in streams:
        assert parse_sse(stream.body), stream
    token = one(calls, "POST", f"/{cid}/stream-token")
    assert token.status == 201 and token.json()["token"]
    assert one(calls, "GET", "/healthz").json() == {"status": "ok"}
    assert one(calls, "GET", "/readyz").status == 200
    other = one(calls, "GET", f"/v1/conversations/{cid}", header="secret-b")
    assert other.status == 404 and other.json()["error"]["code"] == "not_found"
    erased = [c for c in calls if c.method == "DELETE"]
    assert [(c.url.rsplit("/", 1)[-1], c.status, c.body) for c in erased] == [(cid, 204, "")]

    # turns the server runs itself
    turn_conversation = next(c for c in conversations if "You are terse" in " ".join(c.args))
    did = turn_conversation.json()["id"]
    started, again = [c for c in calls if c.method == "POST" and c.url.endswith(f"/{did}/turns")
                      and '"request_id": "r1"' in " ".join(c.args)]
    assert started.status == 202
    assert set(started.json()) >= {"turn_id", "stream_url", "status"} and started.json()["status"] == "running"
    assert again.status == 200 and again.json()["turn_id"] == started.json()["turn_id"]
    turn_id = started.json()["turn_id"]
    status = one(calls, "GET", f"/{did}/turns/{turn_id}")
    assert status.status == 200 and status.json()["status"] in ("running", "finished")
    requests = one(calls, "GET", f"/{did}/turns/{turn_id}/requests")
    assert requests.status == 200
    replay = one(calls, "GET", f"/{did}/turns/{turn_id}/stream")
    assert replay.status == 200 and "data: [DONE]" in replay.body
    tools = one(calls, "POST", f"/{did}/turns", body_has="[fake:tools]")
    assert tools.status in (202, 409), tools  # 409 turn_running if the first turn is still going


@pytest.mark.parametrize("server", [""], indirect=True)  # open mode, as the first command serves
async def test_the_two_commands_stream_a_turn_as_written(server):
    text = README.read_text()
    install_and_serve = sh_block_after(text, "## Two commands")
    assert install_and_serve.strip() == (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/chatlog serve --fake-upstream")
    second = sh_block_after(text, "Then, in another shell")
    done = subprocess.run(["bash", "-c", "set -eo pipefail\n" + second.replace("http://127.0.0.1:8000", server)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frames = parse_sse(done.stdout)
    assert frames[0].event == "message.user" or any(f.event == "turn.started" for f in frames), done.stdout[:2000]
    assert any(f.event == "turn.finished" for f in frames), done.stdout[-2000:]
