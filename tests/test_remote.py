"""The remote generator (DIALOGBOT_GENERATOR_BACKEND=openai) against a real HTTP completions
server started here (tests/fake_openai.py, the same tiny model, greedy)."""

from __future__ import annotations

import logging
import shutil

import pytest

from bot.app import build_app, make_generator
from bot.events import DecodingSettings, GenerationRequest, ReplyKind, Role, Turn
from bot.pipeline import APOLOGY, SLOW
from bot.remote import RemoteBackend
from tests.fake_openai import FakeOpenAI
from tests.recording import RecordingAdapter, message

KEY = "sk-remote-test-0123456789"


@pytest.fixture
async def server(tiny_model_dir):
    fake = await FakeOpenAI(tiny_model_dir, api_key=KEY).start()
    yield fake
    await fake.stop()


@pytest.fixture
def remote_config(make_config, server, tmp_path, tiny_model_dir):
    """A config whose DIALOGBOT_MODEL holds the tokenizer only (no config.json, no weights)."""
    only_tokenizer = tmp_path / "tokenizer-only"
    only_tokenizer.mkdir()
    for item in tiny_model_dir.iterdir():
        if "token" in item.name or item.name in ("vocab.json", "merges.txt"):
            shutil.copy(item, only_tokenizer / item.name)
    assert not list(only_tokenizer.glob("*.safetensors")) and not list(
        only_tokenizer.glob("*.bin"))

    def make(**overrides):
        values = dict(model=str(only_tokenizer), generator_backend="openai",
                      generator_url=server.url, generator_model=server.name,
                      generator_api_key=KEY)
        values.update(overrides)
        return make_config(**values)

    return make


class _Choice:
    def __init__(self, text: str):
        self.text, self.model_extra = text + "<|endoftext|>", {}


def _request(settings: DecodingSettings) -> GenerationRequest:
    turns = (Turn("telegram", "1", Role.USER, "Hello, how are you?", "7"),
             Turn("telegram", "1", Role.BOT, "I'm fine. And you?"),
             Turn("telegram", "1", Role.USER, "Does money buy happiness?", "7"))
    return GenerationRequest("telegram:1", turns, settings)


async def test_greedy_replies_equal_the_local_backends(remote_config, make_config, server):
    remote = make_generator(remote_config())
    local = make_generator(make_config(batching=False))
    assert isinstance(remote.backend, RemoteBackend)
    await remote.start()
    await local.start()
    try:
        for settings in (DecodingSettings(do_sample=False, no_repeat_ngram_size=0,
                                          max_new_tokens=12),
                         DecodingSettings(do_sample=False, no_repeat_ngram_size=3,
                                          max_new_tokens=20),
                         DecodingSettings(do_sample=False, repetition_penalty=1.3,
                                          no_repeat_ngram_size=0, max_new_tokens=16)):
            got = await remote.reply(_request(settings))
            want = await local.reply(_request(settings))
            assert got.text == want.text and got.prompt_tokens == want.prompt_tokens
            assert got.token_ids == want.token_ids  # stored for the next prompt
            without_ids = remote.backend._ids(_Choice(want.text))  # a server without them
            assert remote.backend.decode(without_ids).strip() == want.text
    finally:
        await remote.stop()
        await local.stop()
    body = server.requests[0].body
    assert body["stop"] == ["<|endoftext|>"] and body["temperature"] == 0.0
    assert body["model"] == server.name and body["n"] == 1
    assert isinstance(body["prompt"][0], list) and body["prompt"][0][-1] == 50256
    assert server.requests[1].body["no_repeat_ngram_size"] == 3
    assert server.requests[2].body["repetition_penalty"] == 1.3


@pytest.fixture
async def bot(remote_config):
    apps = []

    async def make(**overrides):
        platform = RecordingAdapter()
        app = build_app(remote_config(**overrides), [platform])
        await app.start()
        apps.append(app)
        return app, platform

    yield make
    for app in apps:
        await app.stop(drain_timeout=5)


async def test_server_errors_are_retried_then_apologised_and_the_bot_recovers(bot, server,
                                                                                caplog):
    caplog.set_level(logging.DEBUG)
    app, platform = await bot()
    server.fail_next(3, 500)  # the first try and both retries fail
    await app.pipeline.process(message("hello there"))
    assert platform.texts() == [APOLOGY]
    assert [r.status for r in server.requests] == [500, 500, 500]
    server.fail_next(1, 503)  # one failure: the client's retry succeeds
    await app.pipeline.process(message("are you back?"))
    assert platform.sent[-1].kind is ReplyKind.ANSWER and platform.sent[-1].text.strip()
    assert [r.status for r in server.requests[3:]] == [503, 200]
    turns = await app.store.recent("telegram", "100", 10)
    assert [t.role for t in turns] == [Role.USER, Role.USER, Role.BOT]
    assert KEY not in caplog.text


async def test_a_slow_server_times_out_with_an_apology_and_the_bot_recovers(bot, server):
    app, platform = await bot(generation_timeout=1.0)
    server.delay = 1.5  # longer than the timeout on every try
    await app.pipeline.process(message("are you there?"))
    assert platform.texts() == [SLOW]
    server.delay = 0.0
    await app.pipeline.process(message("and now?"))  # waits for the worker to give up
    assert platform.sent[-1].kind is ReplyKind.ANSWER
    assert server.requests[-1].status == 200


async def test_a_wrong_api_key_is_an_apology_not_a_crash(bot, server):
    app, platform = await bot(generator_api_key="sk-wrong-key-000000")
    await app.pipeline.process(message("hi"))
    assert platform.texts() == [APOLOGY]
    assert server.requests[-1].status == 401
