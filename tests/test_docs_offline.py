"""/docs and /redoc work offline: every URL their pages load is the app's own and answers 200, and
Swagger UI's "Try it out" on the append operation starts from a body the API accepts, with the key
given under "Authorize" (the bearer scheme)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from tests.helpers import asgi_client


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
