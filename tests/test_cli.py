"""`chatlog --help`, `--version` and every command's help: what each option does, its default and the
environment variable behind it, from api/settings.py (one source)."""

from __future__ import annotations

import argparse
import subprocess
from importlib.metadata import version

from api.cli import env_var, parser
from api.settings import Settings
from tests.servers import CHATLOG

COMMANDS = ("serve", "migrate", "fake-upstream", "bench")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHATLOG), *args], capture_output=True, text=True, timeout=60)


def _subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_is_the_installed_package_version():
    answer = run("--version")
    assert answer.returncode == 0
    assert answer.stdout.strip() == f"chatlog {version('chatlog')}"


def test_help_lists_every_command_with_what_it_does():
    answer = run("--help")
    assert answer.returncode == 0
    for command in COMMANDS:
        assert command in answer.stdout
    top = parser()
    helps = {a.dest: a.help for a in next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
             ._choices_actions}
    assert set(COMMANDS) <= set(helps) and all(helps.values()), helps


def test_every_option_of_every_command_has_help():
    for name, sub in _subparsers(parser()).items():
        if name == "bench":
            continue  # its options are bench/cli.py's own parser, checked below through the real command
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"chatlog {name} {action.option_strings}"
    for command in _subparsers(parser()):
        answer = run(command, "--help")
        assert answer.returncode == 0, (command, answer.stderr)
        assert answer.stdout.startswith(f"usage: chatlog {command}"), answer.stdout


def test_serve_help_gives_each_options_default_and_environment_variable():
    text = " ".join(run("serve", "--help").stdout.split())  # unwrapped
    for option, name in (("--host", "host"), ("--port", "port"), ("--workers", "workers")):
        default = Settings.model_fields[name].default
        assert f"(env {env_var(name)}; default: {default})" in text, option
    assert "--fake-upstream" in text


def test_serve_help_lists_every_setting_with_its_description_and_default():
    text = " ".join(run("serve", "--help").stdout.split())
    for name, field in Settings.model_fields.items():
        assert env_var(name) in text, name
        assert field.description, f"setting {name} has no description (chatlog serve --help shows it)"
        assert " ".join(field.description.split()) in text, name
    assert "DATABASE_URL (default: unset)" in text
    assert "CHATLOG_PORT (default: 8000)" in text
    assert "CHATLOG_ACCESS_LOG (default: on)" in text
