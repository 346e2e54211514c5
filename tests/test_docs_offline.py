"""/docs and /redoc work offline: every URL their pages load is the app's own and answers 200, and
Swagger UI's "Try it out" on the append operation starts from a body the API accepts, with the key
given under "Authorize" (the bearer scheme)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from playwright.async_api import async_playwright

from tests.browser import launch
from tests.servers import KEYS, ChatlogServer

pytest_plugins = ("tests.servers",)


class _Urls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self._in_script = tag == "script"
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def loaded_urls(html: str) -> list[str]:
    """Every URL a page loads: src/href attributes, and the URLs its inline scripts name."""
    parser = _Urls()
    parser.feed(html)
    in_scripts = re.findall(r"""(?:url|oauth2RedirectUrl)\s*:\s*['"]([^'"]+)['"]""", " ".join(parser.scripts))
    return parser.urls + in_scripts


@pytest.fixture
def app_client(make_client, api_keys):
    return make_client(api_keys=api_keys)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_documentation_pages_load_only_the_apps_own_urls(app_client, page):
    answer = await app_client.get(page)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    urls = loaded_urls(answer.text)
    assert "/openapi.json" in urls
    assert any(url.endswith(".js") for url in urls)
    assert not re.search(r"https?://|//cdn|fonts\.googleapis", answer.text), "nothing from another host"
    for url in urls:
        assert url.startswith("/"), url
        loaded = await app_client.get(url)
        assert loaded.status_code == 200, url
        assert loaded.content, url


async def test_the_swagger_assets_are_javascript_and_css(app_client):
    js = await app_client.get("/docs/assets/swagger-ui-bundle.js")
    css = await app_client.get("/docs/assets/swagger-ui.css")
    assert "javascript" in js.headers["content-type"] and "SwaggerUIBundle" in js.text
    assert css.headers["content-type"].startswith("text/css")


async def test_try_it_out_appends_the_example_event_with_the_bearer_key(app_client, keys):
    spec = (await app_client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API key (CHATLOG_API_KEYS)"}
    append = spec["paths"]["/v1/conversations/{conversation_id}/events"]["post"]
    assert {"bearer": []} in append["security"]
    example = append["requestBody"]["content"]["application/json"]["example"]
    # what Swagger UI sends: the example, the key from "Authorize" as a bearer token
    headers = {"Authorization": f"Bearer {keys['alice']}", "Content-Type": "application/json"}
    cid = (await app_client.post("/v1/conversations", headers=headers)).json()["id"]
    answer = await app_client.post(f"/v1/conversations/{cid}/events", json=example, headers=headers)
    assert answer.status_code == 201, answer.text
    assert [e["type"] for e in answer.json()["events"]] == [e["type"] for e in example["events"]]


async def test_the_pages_follow_a_root_path(make_client, api_keys):
    """Behind a proxy that mounts the app under a prefix, the pages ask for the prefixed URLs."""
    client = make_client(api_keys=api_keys)
    client._transport.root_path = "/chatlog"  # httpx.ASGITransport's root_path
    html = (await client.get("/docs")).text
    assert all(url.startswith("/chatlog/") for url in loaded_urls(html)), loaded_urls(html)


# -- in a real browser ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def docs_server(database_url, server_log_dir):
    server = ChatlogServer("docs", database_url, server_log_dir)
    await server.start()
    yield server
    await server.stop()


async def test_swagger_try_it_out_appends_an_event_in_a_browser_that_reaches_no_other_host(docs_server):
    """Headless Chromium with every request to another host refused: the page renders, Authorize takes a key,
    and "Try it out" on the append, with the example body as Swagger UI fills it in, appends (201)."""
    own = f"127.0.0.1:{docs_server.port}"
    elsewhere: list[str] = []

    async def only_own(route):
        if urlsplit(route.request.url).netloc == own:
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort()

    async with docs_server.client() as api:
        cid = (await api.post("/v1/conversations", json={})).json()["id"]
        async with async_playwright() as playwright:
            browser = await launch(playwright)
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))
                await page.route("**/*", only_own)
                await page.goto(f"{docs_server.url}/docs")
                # Authorize: the bearer scheme, with alice's key
                await page.locator("button.authorize").first.click()
                await page.locator(".auth-container", has_text="bearer").locator("input").fill(KEYS["alice"])
                await page.locator(".auth-container", has_text="bearer").locator("button.authorize").click()
                await page.locator("button.btn-done").first.click()
                # the append operation: open it, Try it out, the conversation id, Execute
                append_op = page.locator(".opblock-post").filter(
                    has=page.locator('[data-path="/v1/conversations/{conversation_id}/events"]'))
                await append_op.locator(".opblock-summary").first.click()
                await append_op.locator("button.try-out__btn").click()
                await append_op.locator('input[placeholder="conversation_id"]').fill(cid)
                body = await append_op.locator("textarea.body-param__text").input_value()
                assert json.loads(body) == {"events": [{"type": "message.user", "data": {"content": "Hello!"}}]}
                await append_op.locator("button.execute").click()
                status = append_op.locator(".live-responses-table tr.response .response-col_status")
                await status.first.wait_for(timeout=20_000)
                assert (await status.first.inner_text()).strip() == "201"
                assert not errors, errors
            finally:
                await browser.close()
        events = (await api.get(f"/v1/conversations/{cid}/events")).json()["events"]
    assert [(e["seq"], e["type"], e["data"]) for e in events][1:] == [(2, "message.user", {"content": "Hello!"})]
    assert elsewhere == [], f"the page asked other hosts: {elsewhere}"
