"""Settings: environment, TOML file, bad values named in one line, secrets never shown."""

import pytest

from bot.config import load_config
from bot.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("DIALOGBOT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_dialogpt_medium_on_sqlite_and_console():
    config = load_config()
    assert config.model == "microsoft/DialoGPT-medium"
    assert config.database_url == "sqlite+aiosqlite:///data/dialogbot.db"
    assert config.enabled_platforms() == ["console"]
    assert config.decoding.do_sample and config.decoding.max_new_tokens == 64


def test_environment_and_toml_file(monkeypatch, tmp_path):
    toml = tmp_path / "bot.toml"
    toml.write_text('model = "/models/dialogpt"\ntop_k = 40\ntemperature = 0.6\n')
    monkeypatch.setenv("DIALOGBOT_TOP_K", "20")
    monkeypatch.setenv("DIALOGBOT_ADMIN_IDS", "telegram:1, discord:22")
    config = load_config(toml)
    assert config.model == "/models/dialogpt" and config.temperature == 0.6
    assert config.top_k == 20  # the environment wins over the file
    assert config.admin_ids == ["telegram:1", "discord:22"]


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("DIALOGBOT_MAX_NEW_TOKENS=33\n")
    assert load_config().max_new_tokens == 33


@pytest.mark.parametrize("name,value", [
    ("DIALOGBOT_TOP_P", "1.5"), ("DIALOGBOT_TEMPERATURE", "hot"),
    ("DIALOGBOT_MAX_NEW_TOKENS", "0"), ("DIALOGBOT_ADMIN_IDS", "myspace:1"),
    ("DIALOGBOT_LOG_LEVEL", "LOUD"), ("DIALOGBOT_DISCORD_SHARDS", "many"),
])
def test_bad_value_is_one_line_naming_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert name in str(err.value) and "\n" not in str(err.value)


def test_secret_values_never_appear_in_errors(monkeypatch):
    monkeypatch.setenv("DIALOGBOT_TELEGRAM_TOKEN", "123456:SECRET-TOKEN-VALUE")
    monkeypatch.setenv("DIALOGBOT_TOP_K", "-1")
    with pytest.raises(ConfigError) as err:
        load_config()
    assert "SECRET" not in str(err.value)
    config = load_config(top_k=5)
    assert "SECRET" not in repr(config)
    assert config.enabled_platforms() == ["telegram"]
    assert config.secrets() == ["123456:SECRET-TOKEN-VALUE"]


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("nope.toml")
