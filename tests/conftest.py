"""Shared fixtures: a tiny random-weight DialoGPT-shaped model with the real tokenizer, and
configs that point the bot at it and at a database in the test's temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.modelkit import make_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers x 64, n_positions 1024, vocab 50257, untied embeddings, saved once."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-dialogpt", "tiny")


@pytest.fixture
def make_config(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """make_config(**overrides) -> Config on the tiny model, a fresh SQLite file, greedy
    decoding, no .env from the developer's checkout, torch on one thread."""
    from bot.config import load_config

    for key in list(os.environ):
        if key.startswith("DIALOGBOT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)

    def make(**overrides):
        values = dict(model=str(tiny_model_dir),
                      database_url=f"sqlite+aiosqlite:///{tmp_path / 'data' / 'bot.db'}",
                      do_sample=False, no_repeat_ngram_size=0, max_new_tokens=12,
                      torch_threads=1)
        values.update(overrides)
        return load_config(**values)

    return make


@pytest.fixture(autouse=True)
def _restore_logging():
    """Tests that call bot.logs.setup_logging change the root logger; put it back after each
    test so later tests see pytest's own logging set-up."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))
