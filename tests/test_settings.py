"""Settings: a malformed one stops the server at start-up with a message naming it; the access log can be off."""

from __future__ import annotations

import os
import subprocess

import pytest
from pydantic import ValidationError

from api.settings import Settings
from tests.servers import CHATLOG

pytest_plugins = ("tests.servers",)


@pytest.mark.parametrize("overrides, where", [
    ({"api_keys": "no-equals-sign"}, "api_keys"),
    ({"api_keys": "k=alice,k=bob"}, "api_keys"),
    ({"api_keys": "=alice"}, "api_keys"),
    ({"cors_origins": "https://app.example/path"}, "cors_origins"),
    ({"cors_origins": "app.example"}, "cors_origins"),
    ({"log_level": "loud"}, "log_level"),
])
def test_malformed_settings_are_refused(overrides, where):
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=None, **overrides)
    assert refused.value.errors()[0]["loc"] == (where,)


def test_well_formed_settings_are_parsed_once():
    settings = Settings(database_url=None, api_keys=" k1=alice , k2=bob ,", cors_origins="https://a.example, http://b:8080")
    assert settings.principals_by_key() == {"k1": "alice", "k2": "bob"}
    assert settings.cors_origin_list() == ["https://a.example", "http://b:8080"]


def test_chatlog_serve_with_a_malformed_setting_exits_with_a_clear_message(tmp_path):
    env = {**os.environ, "CHATLOG_API_KEYS": "oops", "DATABASE_URL": "postgresql://127.0.0.1:1/none"}
    done = subprocess.run([str(CHATLOG), "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "CHATLOG_API_KEYS" in done.stderr and "key=principal" in done.stderr
    assert "Traceback" not in done.stderr


async def test_the_access_log_can_be_turned_off(start_server):
    on = await start_server("access-log-on")
    off = await start_server("access-log-off", CHATLOG_ACCESS_LOG="off")
    for server in (on, off):
        async with server.client() as client:
            assert (await client.post("/v1/conversations", json={})).status_code == 201
    assert '"POST /v1/conversations HTTP/1.1" 201' in on.log_text()
    assert "POST /v1/conversations" not in off.log_text()
