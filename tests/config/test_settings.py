"""Settings: defaults, environment, flags, and one clear line per invalid value."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from broker.cli import _parser
from broker.config.options import unknown_variables
from broker.config.settings import OPTIONS, Option, Settings, unknown_settings
from broker.errors import ConfigError


def test_defaults_match_the_contract() -> None:
    settings = Settings.load({"BROKER_LOG_FORMAT": "json"})
    assert settings.database_url is None
    assert (settings.host, settings.port) == ("127.0.0.1", 5001)
    assert settings.log_level == "info"
    assert settings.heartbeat_seconds == 30
    assert settings.retry_ms == 3000
    assert settings.replay_limit == 10_000
    assert settings.cors_origins == ()
    assert settings.data_dir == Path(".data")


def test_environment_is_parsed() -> None:
    settings = Settings.load(
        {
            "DATABASE_URL": "postgresql://x/y",
            "BROKER_PORT": "6000",
            "BROKER_MAX_CONNECTIONS": "7",
            "BROKER_HEARTBEAT_SECONDS": "0.5",
            "BROKER_CORS_ORIGINS": "http://a.example:3000, https://b.example",
            "BROKER_MIGRATE": "false",
            "BROKER_LOG_FORMAT": "console",
        }
    )
    assert settings.database_url == "postgresql://x/y"
    assert settings.port == 6000 and settings.max_connections == 7
    assert settings.heartbeat_seconds == 0.5
    assert settings.cors_origins == ("http://a.example:3000", "https://b.example")
    assert settings.migrate is False and settings.log_format == "console"


def test_pgdatabase_url_is_the_fallback_and_flags_win() -> None:
    assert Settings.load({"PGDATABASE_URL": "postgresql://p"}).database_url == "postgresql://p"
    both = Settings.load({"DATABASE_URL": "postgresql://d", "PGDATABASE_URL": "postgresql://p"})
    assert both.database_url == "postgresql://d"
    assert Settings.load({"BROKER_PORT": "1"}, {"port": "2"}).port == 2


def test_the_embedded_database_listens_on_loopback_unless_told() -> None:
    """The embedded database is for trying pgsse out, with auth off: not on the network."""
    assert Settings.load({}).host == "127.0.0.1"
    assert Settings.load({"DATABASE_URL": "postgresql://h/db"}).host == "0.0.0.0"
    assert Settings.load({"BROKER_HOST": "0.0.0.0"}).host == "0.0.0.0"
    assert Settings.load({}, {"host": "::"}).host == "::"


def test_a_bad_database_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load({"DATABASE_URL": "postgresql://u:hunter2@h/db?nope=1"})
    message = str(caught.value)
    assert "DATABASE_URL" in message and "nope" in message and "hunter2" not in message


def test_every_option_has_a_default_to_show() -> None:
    shown = {option.env: option.default_text() for option in OPTIONS}
    assert shown["BROKER_PORT"] == "5001" and shown["BROKER_HEARTBEAT_SECONDS"] == "30"
    assert shown["BROKER_MIGRATE"] == "true" and shown["BROKER_AUTH_SECRET"] == "unset"
    assert all(shown.values())


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("BROKER_PORT", "http", "not a number"),
        ("BROKER_PORT", "70000", "port number"),
        ("BROKER_MAX_CONNECTIONS", "0", "at least 1"),
        ("BROKER_HEARTBEAT_SECONDS", "-1", "positive"),
        ("BROKER_HEARTBEAT_SECONDS", "nan", "positive"),
        ("BROKER_QUEUE_SIZE", "1.5", "not a number"),
        ("BROKER_CORS_ORIGINS", "app.example", "origin"),
        ("BROKER_LOG_FORMAT", "xml", "json"),
        ("BROKER_MIGRATE", "maybe", "true or false"),
        ("BROKER_LOG_LEVEL", "verbose", "debug, info"),
        ("DATABASE_URL", "mysql://h/db", "postgresql://"),
    ],
)
def test_invalid_value_names_the_setting(env: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load({env: value})
    message = str(caught.value)
    assert env in message and fragment in message and "\n" not in message


def test_every_settings_field_is_one_option_with_its_own_env() -> None:
    fields = dataclasses.fields(Settings)
    assert [option.field for option in OPTIONS] == [field.name for field in fields]
    assert [option.value for option in OPTIONS] == [field.default for field in fields]
    assert len({option.env for option in OPTIONS}) == len(OPTIONS)


def _serve_flags() -> dict[str, argparse.Action]:
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {action.dest: action for action in serve._actions if action.dest != "help"}


def test_flags_and_env_derive_from_the_one_declaration() -> None:
    """Each `serve` flag is a field's name, shows its env and default, and parses like the
    env var: a field added to `Settings` needs nothing else to reach the command line."""
    flags = _serve_flags()
    assert set(flags) == {option.field for option in OPTIONS}
    for option in OPTIONS:
        flag = flags[option.field]
        assert flag.option_strings == ["--" + option.field.replace("_", "-")]
        assert flag.metavar == option.env
        help_text = (flag.help or "").replace("%%", "%")
        assert f"env {option.env}; default: {option.default_text()}" in help_text


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("BROKER_PORT", "6001"),
        ("BROKER_HEARTBEAT_SECONDS", "2.5"),
        ("BROKER_TRUSTED_PROXIES", "10.0.0.0/8"),
        ("BROKER_MIGRATE", "off"),
        ("BROKER_ADMIN_TOKEN", "t" * 16),
    ],
)
def test_a_flag_and_its_env_give_the_same_setting(env: str, value: str) -> None:
    option = next(option for option in OPTIONS if option.env == env)
    from_env = Settings.load({env: value})
    from_flag = Settings.load({}, {option.field: value})
    assert getattr(from_env, option.field) == getattr(from_flag, option.field) != option.value


def test_only_the_secrets_are_declared_secret() -> None:
    """Secret fields are kept out of repr and error messages (test_auth checks both)."""
    secret = {option.env for option in OPTIONS if option.secret}
    assert secret == {"BROKER_AUTH_SECRET", "BROKER_ADMIN_TOKEN"}
    hidden = {field.name for field in dataclasses.fields(Settings) if not field.repr}
    assert hidden == {"auth_secret", "admin_token"}


def test_the_readme_table_lists_every_setting_and_no_other() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n\n| variable", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`((?:BROKER_|DATABASE_|PGDATABASE_)[A-Z_]+)`", table))
    declared = {option.env for option in OPTIONS}
    declared |= {option.fallback_env for option in OPTIONS if option.fallback_env}
    assert listed == declared


def test_unknown_broker_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        "BROKER_MAX_CONECTIONS": "5",
        "BROKER_HARTBEAT_SECONDS": "1",
        "BROKER_ZZZ": "x",
        "BROKER_PORT": "5001",
        "PATH": "/bin",
    }
    assert unknown_settings(environ) == [
        ("BROKER_HARTBEAT_SECONDS", "BROKER_HEARTBEAT_SECONDS"),
        ("BROKER_MAX_CONECTIONS", "BROKER_MAX_CONNECTIONS"),
        ("BROKER_ZZZ", None),
    ]


def test_every_declared_setting_is_a_known_variable() -> None:
    """Known names come from the declarations: a setting added to `Settings` is known."""
    assert unknown_settings({option.env: "1" for option in OPTIONS}) == []
    extra = Option("x", "BROKER_NEW_THING", str, "a setting declared later", None)
    assert unknown_variables((*OPTIONS, extra), {"BROKER_NEW_THING": "1"}) == []
