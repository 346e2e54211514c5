"""Shared fixtures: a real PostgreSQL database for this run, the store, API clients."""

from __future__ import annotations

import uuid

import httpx
import pytest

# assertions in the shared helpers report their operands, as in a test module
pytest.register_assert_rewrite("tests.helpers", "tests.uisdk")

from api.app import create_app  # noqa: E402
from api.settings import Settings  # noqa: E402
from runner.fake_upstream import FakeUpstream  # noqa: E402
from store import Store  # noqa: E402
from tests.helpers import Ledger, asgi_client, bearer  # noqa: E402
from tests.pg import TestServer  # noqa: E402


@pytest.fixture(scope="session")
async def pg_server():
    server = TestServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture(scope="session")
async def database_url(pg_server) -> str:
    """This run's own migrated database (dropped at the end of the session)."""
    return await pg_server.create_database()


@pytest.fixture(scope="session")
async def store(database_url):
    store = await Store.open(database_url, pool_size=10, writers=4)
    yield store
    await store.close()


@pytest.fixture
def principal() -> str:
    """A principal of this test's own, so tests never see each other's events."""
    return f"p-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_client(store):
    """make_client(api_keys="k1=alice", **settings) -> an httpx client on the app."""
    clients = []

    def make(api_keys: str = "", headers: dict | None = None, **overrides) -> httpx.AsyncClient:
        settings = Settings(database_url=None, api_keys=api_keys, **overrides)
        client = asgi_client(create_app(settings, store=store), headers)
        clients.append(client)
        return client

    yield make


@pytest.fixture
def keys(principal) -> dict[str, str]:
    """Two tenants with their own keys: {'alice': key, 'bob': key}."""
    return {"alice": f"ka-{principal}", "bob": f"kb-{principal}"}


@pytest.fixture
def api_keys(keys, principal) -> str:
    """The API_KEYS setting for the two tenants: principals alice-<principal> and bob-<principal>."""
    return f"{keys['alice']}=alice-{principal},{keys['bob']}=bob-{principal}"


@pytest.fixture
def client(make_client, keys, api_keys):
    """A client authenticated as this test's 'alice'."""
    return make_client(api_keys=api_keys, headers=bearer(keys["alice"]))


@pytest.fixture
def bob(make_client, keys, api_keys):
    """A client authenticated as another tenant, 'bob'."""
    return make_client(api_keys=api_keys, headers=bearer(keys["bob"]))


@pytest.fixture
def ledger(store, principal) -> Ledger:
    """What the store holds for this test's alice and bob, to show a request wrote nothing."""
    return Ledger(store, [f"alice-{principal}", f"bob-{principal}"])


@pytest.fixture
async def fake():
    """A scripted OpenAI-compatible upstream (runner/fake_upstream.py) in this loop, for the runner's tests."""
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()
