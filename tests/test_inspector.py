"""The time-travel inspector (/inspect) and the browser guide's example page, in a real browser.

Debian's headless Chromium, driven by Playwright (tests/browser.py), against a real `chatlog serve` whose
runner calls a fake upstream, through a TCP proxy that can cut the browser's connections. What is checked is
what a user relies on: the slider shows the messages exactly as `/messages?at_seq` answers them, the requests
panel shows what the model was sent and whether it matches its recorded hash, the page follows new events
live and keeps following once its stream token expired, and the guide's page receives named events and
resumes after the last seq it saw.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from playwright.async_api import Page, async_playwright

from runner.fake_upstream import FakeUpstream
from tests.browser import TcpProxy, launch
from tests.helpers import append, eventually, stored_events
from tests.servers import KEYS, ChatlogServer
from tests.test_runner_turns import TOOLS, calls_of, result, start, until_status

pytest_plugins = ("tests.servers",)

TOKEN_TTL = 2  # seconds: tokens expire while a test watches


@pytest.fixture(scope="module")
async def upstream():
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def server(database_url, server_log_dir, upstream):
    env = {"CHATLOG_UPSTREAM_BASE_URL": upstream.url, "CHATLOG_UPSTREAM_API_KEY": "sk-fake",
           "CHATLOG_MODEL": "fake", "CHATLOG_STREAM_TOKEN_TTL_SECONDS": str(TOKEN_TTL)}
    server = ChatlogServer("inspector", database_url, server_log_dir, env)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def proxy(server):
    proxy = await TcpProxy(server.port).start()
    yield proxy
    await proxy.close()


@pytest.fixture(scope="module")
async def browser():
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        yield browser
        await browser.close()


@pytest.fixture
async def api(server):
    async with server.client() as client:
        yield client


@pytest.fixture
async def page(browser):
    context = await browser.new_context(viewport={"width": 1500, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert not errors, f"the page threw: {errors}"


async def tool_conversation(api) -> tuple[str, str]:
    """A conversation whose turn called a tool, got its result, and answered: (conversation id, turn id)."""
    r = await api.post("/v1/conversations", json={"system": "You are terse.", "metadata": {"test": "inspector"}})
    cid = r.json()["id"]
    turn_id = (await start(api, cid, "Weather in Paris? [fake:tools weather]", tools=TOOLS))["turn_id"]
    await until_status(api, cid, turn_id, "waiting_for_tools")
    [call] = await calls_of(api, cid, turn_id)
    assert (await result(api, cid, call, {"temp_c": 18})).status_code == 201
    await until_status(api, cid, turn_id, "finished")
    await append(api, cid, [{"type": "conversation.titled", "data": {"title": "Weather in Paris"}}])
    return cid, turn_id


async def sign_in_and_open(page: Page, base: str, cid: str) -> None:
    await page.goto(f"{base}/inspect")  # redirected to /inspect/
    assert page.url == f"{base}/inspect/"
    await page.fill("#key", KEYS["alice"])
    await page.click("#sign-in-button")
    await page.click(f'#conversations button[data-id="{cid}"]')
    await page.wait_for_selector("#conversation:not([hidden])")


async def shown_at(page: Page, seq: int, fmt: str = "openai") -> dict:
    """The messages answer the page shows once it shows seq `seq` in `fmt`."""
    await page.wait_for_selector(f'#messages[data-seq="{seq}"][data-format="{fmt}"]')
    return json.loads(await page.text_content("#messages-json"))


async def slide_to(page: Page, seq: int) -> None:
    """Move the slider with the keyboard, as a user does: to the start, then right."""
    await page.focus("#slider")
    await page.keyboard.press("Home")
    for _ in range(seq - 1):
        await page.keyboard.press("ArrowRight")


async def messages_at(api, cid: str, seq: int, fmt: str = "openai") -> dict:
    r = await api.get(f"/v1/conversations/{cid}/messages", params={"format": fmt, "at_seq": seq})
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_slider_shows_the_messages_as_they_stood_at_each_seq(page, api, proxy, tmp_path_factory):
    cid, turn_id = await tool_conversation(api)
    events = await stored_events(api, cid)
    last = max(events)
    await sign_in_and_open(page, proxy.url, cid)
    assert await shown_at(page, last) == await messages_at(api, cid, last)
    assert await page.text_content("#conv-title") == "Weather in Paris"

    by_type = {}
    for seq, event in events.items():
        by_type.setdefault(event["type"], []).append(seq)
    # the start; the tool call complete but unanswered (left out); its result in; the answer half written;
    # the turn finished; the title
    seqs = [1, 2, by_type["tool_call.completed"][0], by_type["tool.result"][0], by_type["text.delta"][3],
            by_type["turn.finished"][-1], last - 1]
    for seq in seqs:
        await slide_to(page, seq)
        assert await page.text_content("#seq-label") == f"seq {seq} of {last}"
        expected = await messages_at(api, cid, seq)
        assert await shown_at(page, seq) == expected, f"at seq {seq}"
        # one card per message, and the events up to the slider are marked as such
        assert await page.locator("#messages .msg").count() == len(expected["messages"])
        assert int(await page.get_attribute("#events li.current", "data-seq")) == seq
        assert await page.locator("#events li.future").count() == last - seq
    # what those seqs show differs: the call is left out until its result is in, the answer grows
    partial = (await messages_at(api, cid, by_type["text.delta"][3]))["messages"][-1]["content"]
    assert partial and partial != (await messages_at(api, cid, last))["messages"][-1]["content"]
    assert not any(m["role"] == "tool" for m in (await messages_at(api, cid, by_type["tool_call.completed"][0]))["messages"])

    await page.click("#format-anthropic")
    for seq in (by_type["tool.result"][0], last):
        await slide_to(page, seq)
        expected = await messages_at(api, cid, seq, "anthropic")
        assert await shown_at(page, seq, "anthropic") == expected
        assert await page.locator("#messages .msg").count() == len(expected["messages"]) + 1  # + system

    # the verify badge says what GET …/verify says (or that there is no such endpoint)
    verify = await api.get(f"/v1/conversations/{cid}/verify")
    if verify.status_code == 200:
        status = "ok" if verify.json()["ok"] else "broken"
    else:
        status = {404: "unavailable"}.get(verify.status_code, "error")
    await page.wait_for_selector(f'#verify[data-status="{status}"]')
    if status == "ok":
        assert f"verified through seq {verify.json()['verified_through_seq']}" in await page.text_content("#verify")
    if status == "unavailable":
        assert await page.text_content("#verify") == "verify: not available"

    # merged deltas: one row stands for a run of text.delta; it is the current row anywhere inside the run
    await page.click("#compact")
    deltas = by_type["text.delta"]
    merged = f'#events li[data-type="text.delta"][data-first-seq="{deltas[0]}"][data-seq="{deltas[-1]}"]'
    await page.wait_for_selector(merged)
    # (the call's argument fragments are one run too)
    assert await page.locator("#events li").count() == last - (len(deltas) - 1) - (len(by_type["tool_call.delta"]) - 1)
    await slide_to(page, deltas[3])
    assert await shown_at(page, deltas[3], "anthropic") == await messages_at(api, cid, deltas[3], "anthropic")
    assert await page.locator(f"{merged}.current").count() == 1
    assert await page.locator("#turn option").count() == 1
    await page.click("#compact")
    await page.wait_for_selector(f'#events li[data-seq="{deltas[0]}"][data-first-seq="{deltas[0]}"]')

    # the screenshot the docs show: in the middle of the tool turn, what the model saw on the right
    await page.click("#format-openai")
    await slide_to(page, by_type["tool.result"][0])
    await page.wait_for_selector('#requests .request[data-step="2"]')
    shot = tmp_path_factory.mktemp("inspector") / "inspector.png"
    await page.screenshot(path=str(shot))
    print(f"inspector screenshot: {shot}")


async def test_what_the_model_saw_is_each_request_and_whether_it_matches(page, api, proxy):
    cid, turn_id = await tool_conversation(api)
    requests = (await api.get(f"/v1/conversations/{cid}/turns/{turn_id}/requests")).json()["requests"]
    assert [r["step"] for r in requests] == [1, 2] and all(r["matches"] for r in requests)
    await sign_in_and_open(page, proxy.url, cid)
    await page.wait_for_selector("#requests .request >> nth=1")
    assert await page.input_value("#turn") == turn_id
    shown = page.locator("#requests .request")
    for i, request in enumerate(requests):
        item = shown.nth(i)
        assert await item.get_attribute("data-matches") == "true"
        assert "matches the recorded SHA-256" in await item.locator(".matches").text_content()
        assert json.loads(await item.locator("pre.body").text_content()) == request["body"]
        # "at seq N" moves the slider there: the messages shown are the ones that request sent
        await item.get_by_role("button", name=f"at seq {request['at_seq']}").click()
        assert (await shown_at(page, request["at_seq"]))["messages"] == request["body"]["messages"]


async def test_new_events_appear_live_and_the_page_follows_across_token_expiry(page, api, proxy):
    r = await api.post("/v1/conversations", json={})
    cid = r.json()["id"]
    await append(api, cid, [{"type": "message.user", "data": {"content": "first"}}])
    urls = []
    page.on("request", lambda request: urls.append(request.url))
    await sign_in_and_open(page, proxy.url, cid)
    await shown_at(page, 2)
    await page.wait_for_selector('#live[data-state="live"]')

    await append(api, cid, [{"type": "message.user", "data": {"content": "second"}}])
    await page.wait_for_selector('#events li[data-seq="3"][data-type="message.user"]')
    # the slider was at the end, so it follows: the messages now include the new one
    assert [m["content"] for m in (await shown_at(page, 3))["messages"]] == ["first", "second"]
    assert await page.text_content("#seq-label") == "seq 3 of 3"

    # tokens live 2 s: the page renews its token before it expires and reconnects with the new one
    minted = int(await page.get_attribute("#live", "data-tokens"))
    async def renewed_twice():
        return int(await page.get_attribute("#live", "data-tokens")) >= minted + 2
    await eventually(renewed_twice, "the page to renew its stream token twice")
    # a stream that just ends (a server restart, a dropped network): the page resumes with a valid token
    await asyncio.sleep(TOKEN_TTL + 0.5)  # so that whatever token was in use before has expired by now
    proxy.cut_all()
    await append(api, cid, [{"type": "message.user", "data": {"content": "third"}},
                            {"type": "conversation.titled", "data": {"title": "three"}}])
    await page.wait_for_selector('#events li[data-seq="5"]')
    assert await page.text_content("#conv-title") == "three"
    seqs = [int(s) for s in await page.locator("#events li").evaluate_all("rows => rows.map(r => r.dataset.seq)")]
    assert seqs == [1, 2, 3, 4, 5]  # nothing missed, nothing twice
    assert [m["content"] for m in (await shown_at(page, 5))["messages"]] == ["first", "second", "third"]
    await page.wait_for_selector('#live[data-state="live"]')
    # the key went in headers only; the one credential in a URL is a stream token, on stream requests
    assert not [u for u in urls if KEYS["alice"] in u]
    streams = [u for u in urls if f"/{cid}/stream?" in u]
    assert len(streams) >= 3 and all("token=" in u for u in streams)
    assert not [u for u in urls if "token=" in u and u not in streams]


async def test_sign_in_keeps_the_key_in_the_tab_and_sign_out_forgets_it(page, api, proxy):
    await page.goto(f"{proxy.url}/inspect/")
    await page.fill("#key", "not-a-key")
    await page.click("#sign-in-button")
    await page.wait_for_selector("#sign-in-error:text('401')")
    assert await page.is_hidden("#app")

    cid = (await api.post("/v1/conversations", json={})).json()["id"]
    await page.fill("#key", KEYS["alice"])
    await page.click("#sign-in-button")
    await page.click(f'#conversations button[data-id="{cid}"]')
    await shown_at(page, 1)
    assert page.url.endswith(f"/inspect/#{cid}")
    assert await page.evaluate("Object.values(sessionStorage)") == [KEYS["alice"]]
    # a reload (the same tab) stays signed in and reopens the conversation in the address
    await page.reload()
    await shown_at(page, 1)
    assert cid in await page.text_content("#conv-meta")
    await page.click("#sign-out")
    assert await page.is_visible("#sign-in") and await page.is_hidden("#app")
    assert await page.evaluate("sessionStorage.length") == 0


async def test_the_list_pages_back_through_older_conversations(page, api, proxy):
    ours = [(await api.post("/v1/conversations", json={})).json()["id"] for _ in range(52)]
    await page.goto(f"{proxy.url}/inspect/")
    await page.fill("#key", KEYS["alice"])
    await page.click("#sign-in-button")
    # newest first, 50 a page: the two oldest of ours are on the next page
    await page.wait_for_selector(f'#conversations button[data-id="{ours[-1]}"]')
    assert await page.locator("#conversations li").count() == 50
    assert await page.locator(f'#conversations button[data-id="{ours[1]}"]').count() == 0
    await page.click("#older")
    await page.wait_for_selector(f'#conversations button[data-id="{ours[0]}"]')
    shown = await page.locator("#conversations button").evaluate_all("bs => bs.map(b => b.dataset.id)")
    assert shown[:52] == ours[::-1]
    assert len(shown) == len(set(shown))


async def test_the_guide_example_follows_named_events_and_resumes_with_a_new_token(page, api, proxy, server):
    r = await api.post("/v1/conversations", json={})
    cid = r.json()["id"]
    await append(api, cid, [{"type": "message.user", "data": {"content": "hello"}}])
    stream_answers = []  # the statuses of the page's stream requests, as the browser saw them
    page.on("response", lambda r: stream_answers.append(r.status) if f"/{cid}/stream?" in r.url else None)
    await page.goto(f"{proxy.url}/inspect/examples/follow.html")
    await page.fill("#key", KEYS["alice"])
    await page.fill("#conversation", cid)
    await page.click("button[type=submit]")
    # catch-up: named events (conversation.created, message.user) reach the page's listeners
    await page.wait_for_selector('#log li[data-seq="2"][data-type="message.user"]')
    await page.wait_for_selector("#status:text('following')")

    # live
    await append(api, cid, [{"type": "message.user", "data": {"content": "live"}}])
    await page.wait_for_selector('#log li[data-seq="3"]')
    assert await page.get_attribute("#status", "data-tokens") == "1"

    # the token expires; the open stream outlives it. Then the stream drops: the browser's own reconnect is
    # refused (401), and the page gets a new token and resumes after the last seq it saw.
    await asyncio.sleep(TOKEN_TTL + 1)
    proxy.cut_all()
    await append(api, cid, [{"type": "message.user", "data": {"content": f"while away {i}"}} for i in range(3)])
    await page.wait_for_selector('#log li[data-seq="6"]')
    await append(api, cid, [{"type": "message.user", "data": {"content": "after"}}])
    await page.wait_for_selector('#log li[data-seq="7"]')
    seqs = [int(s) for s in await page.locator("#log li").evaluate_all("rows => rows.map(r => r.dataset.seq)")]
    assert seqs == list(range(1, 8))  # nothing missed, nothing twice
    assert int(await page.get_attribute("#status", "data-tokens")) >= 2

    def refused_stream_request():
        return [r for r in stream_answers if r == 401]
    await eventually(refused_stream_request, "the browser's reconnect with the expired token to be refused (401)")


async def test_inspect_is_static_and_keys_stay_out_of_urls(api, server):
    """The page and its assets are served from the repository (no CDN), and its script puts nothing but a
    stream token in a URL."""
    page = await api.get("/inspect/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    script = (await api.get("/inspect/inspect.js")).text
    assert "sessionStorage" in script and "Authorization" in script
    assert "https://" not in script and "http://" not in script
    assert (await api.get("/inspect/examples/follow.html")).status_code == 200
    assert (await api.get("/inspect/nothing.js")).status_code == 404
    assert "/inspect" not in (await api.get("/openapi.json")).json()["paths"]
