"""Characters (DIALOGBOT_CHARACTERS): several DialoGPT models in one process, chosen per channel.

Two tiny random-weight models with different seeds stand for two fine-tunes: their greedy
replies differ, so a reply shows which model wrote it. "Solo" replies come from each model on
its own (the one-request-at-a-time generator, transformers' `generate`) for the same request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from bot.app import build_app, make_generator
from bot.characters import Cast, parse_characters
from bot.config import load_config
from bot.errors import ConfigError
from bot.events import DecodingSettings, GenerationRequest, ReplyKind, Role, Turn
from bot.metrics import Metrics
from bot.router import CharacterRouter
from tests.fake_openai import FakeOpenAI
from tests.modelkit import make_model_dir
from tests.recording import CountingGenerator, RecordingAdapter, message

GREEDY = dict(do_sample=False, no_repeat_ngram_size=0)


@pytest.fixture(scope="session")
def cast_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny models that never end a reply early, so greedy replies are full and differ."""
    root = tmp_path_factory.mktemp("characters")
    return {name: make_model_dir(root / name, "tiny", seed=seed, never_eos=True)
            for name, seed in (("rick", 11), ("joshua", 22))}


@pytest.fixture(scope="session")
def few_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 4-layer x 256 models (~110 MB each): big enough for memory to be measured."""
    root = tmp_path_factory.mktemp("characters-few")
    return {name: make_model_dir(root / name, "few", seed=seed, never_eos=True)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture
def chars_config(make_config, cast_dirs):
    def make(**overrides):
        values = dict(model=str(cast_dirs["rick"]),
                      characters=f"rick={cast_dirs['rick']},joshua={cast_dirs['joshua']}")
        values.update(overrides)
        return make_config(**values)

    return make


class Solo:
    """Each model's own reply to a request (one generator per model, started on first use)."""

    def __init__(self, make_config):
        self.make_config = make_config
        self.generators: dict[Path, object] = {}

    async def reply(self, model_dir: Path, request: GenerationRequest) -> str:
        if model_dir not in self.generators:
            generator = make_generator(self.make_config(model=str(model_dir), batching=False))
            await generator.start()
            self.generators[model_dir] = generator
        return (await self.generators[model_dir].reply(request)).text

    async def stop(self) -> None:
        for generator in self.generators.values():
            await generator.stop()


@pytest.fixture
async def solo(make_config):
    helper = Solo(make_config)
    yield helper
    await helper.stop()


class LoadLog(Metrics):
    """Records each character load: (name, time.monotonic() when loaded)."""

    def __init__(self):
        self.loads: list[tuple[str, float]] = []

    def character_loaded(self, character: str, seconds: float) -> None:
        self.loads.append((character, time.monotonic()))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.loads]


class PeakRss:
    """This process's resident memory sampled every 2 ms (psutil) in a thread."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def request(name: str | None, text: str = "Hello, who are you?", key: str = "telegram:1",
            **settings) -> GenerationRequest:
    turns = (Turn("telegram", key.split(":")[1], Role.USER, text, "7"),)
    return GenerationRequest(key, turns, DecodingSettings(**{**GREEDY, **settings}), name)


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["rick", "rick=", "=models/rick", "default=models/x",
                                   "rick=a,Rick=b", "bad name=models/x"])
def test_a_bad_characters_entry_is_one_line_naming_the_setting(make_config, value):
    with pytest.raises(ConfigError) as caught:
        make_config(characters=value)
    assert "DIALOGBOT_CHARACTERS" in str(caught.value) and "\n" not in str(caught.value)


def test_the_default_character_is_dialogbot_model(make_config, cast_dirs):
    rick, joshua = str(cast_dirs["rick"]), str(cast_dirs["joshua"])
    assert parse_characters(f" Rick={rick}\n joshua = {joshua} ,") == (
        ("rick", rick), ("joshua", joshua))
    named = Cast.from_config(make_config(model=joshua, characters=f"rick={rick},joshua={joshua}"))
    assert named.default == "joshua" and named.names == ("joshua", "rick")
    unnamed = Cast.from_config(make_config(characters=f"rick={rick}"))
    assert unnamed.default == "default" and unnamed.model("default") != rick
    assert unnamed.resolve("rick") == "rick"
    assert unnamed.resolve("gone") == unnamed.resolve(None) == "default"


def test_a_missing_directory_stops_start_up_with_one_line(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
    env.update(DIALOGBOT_MODEL=str(tiny_model_dir), HF_HUB_OFFLINE="1",
               DIALOGBOT_CHARACTERS=f"rick={tmp_path / 'models' / 'rick'}",
               DIALOGBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/bot.db")
    result = subprocess.run([str(Path(sys.executable).parent / "dialogbot"), "chat"],
                            input="hello\n", capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    *logged, line = result.stderr.strip().splitlines()  # log lines, then the error's one line
    assert line.startswith("dialogbot: DIALOGBOT_CHARACTERS: character 'rick'"), line
    assert line.endswith("no such directory") and all(" INFO " in x for x in logged), logged


def _other_tokenizer(source: Path, target: Path) -> None:
    """The same model with two vocabulary entries swapped (a different tokenizer)."""
    shutil.copytree(source, target)
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]
    (target / "tokenizer.json").write_text(json.dumps(spec))
    (target / "vocab.json").write_text(json.dumps(vocab))


def _other_architecture(source: Path, target: Path) -> None:
    """A GPT-Neo config with DialoGPT's tokenizer files (no weights: the check reads none)."""
    from transformers import GPTNeoConfig

    target.mkdir()
    GPTNeoConfig(num_layers=2, attention_types=[[["global"], 2]]).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(source / name, target / name)


def _sequence_classifier(source: Path, target: Path) -> None:
    """A GPT-2 config for another head (a DialogRPT ranker)."""
    shutil.copytree(source, target)
    spec = json.loads((target / "config.json").read_text())
    spec["architectures"] = ["GPT2ForSequenceClassification"]
    (target / "config.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("make_other,reason", [
    (_other_tokenizer, "tokenizer differs"), (_other_architecture, "gpt_neo model"),
    (_sequence_classifier, "GPT2ForSequenceClassification model")])
async def test_another_tokenizer_or_architecture_stops_start_up(chars_config, cast_dirs, tmp_path,
                                                                make_other, reason):
    make_other(cast_dirs["joshua"], tmp_path / "other")
    config = chars_config(characters=f"rick={cast_dirs['rick']},other={tmp_path / 'other'}")
    router = make_generator(config)
    app = build_app(config, [RecordingAdapter()], generator=router)
    with pytest.raises(ConfigError) as caught:
        await app.start()
    line = str(caught.value)
    assert line.startswith("DIALOGBOT_CHARACTERS: character 'other'") and reason in line
    assert "\n" not in line
    assert router.loaded == [] and not router.ready  # stopped before any model loaded


# --- serving ----------------------------------------------------------------------------------
async def test_two_characters_in_two_channels_reply_with_their_own_models_at_once(
        chars_config, cast_dirs, solo, caplog):
    caplog.set_level(logging.DEBUG, logger="bot.router")
    config = chars_config(max_new_tokens=96, metrics_port=0, metrics_host="127.0.0.1")
    router = make_generator(config)
    assert isinstance(router, CharacterRouter)
    platform = RecordingAdapter()
    generator = CountingGenerator(router)  # keeps the requests for the solo replies
    app = build_app(config, [platform], generator=generator)
    router.metrics = app.pipeline.metrics  # what build_app does for an unwrapped router
    await app.start()
    try:
        assert router.loaded == ["rick"] and router.ready  # the default loads at start
        await app.pipeline.process(message("/settings character=joshua", channel="2"))
        assert "character = joshua*" in platform.sent[-1].text
        await app.pipeline.process(message("/help", channel="2"))
        assert "Characters: rick, joshua (default rick)" in platform.sent[-1].text
        platform.sent.clear()
        for channel in ("1", "2"):  # turn 1 loads joshua
            await app.pipeline.process(message("Hello, who are you?", channel=channel))
        assert sorted(router.loaded) == ["joshua", "rick"]
        workers = {name: router.slots[name].generator.worker for name in ("rick", "joshua")}
        marks = {name: len(worker.stats.steps) for name, worker in workers.items()}
        await asyncio.gather(*(app.pipeline.process(message("And what do you do?", channel=c))
                               for c in ("1", "2")))
        steps = {name: list(worker.stats.steps)[marks[name]:]
                 for name, worker in workers.items()}
        metrics = samples(app.pipeline.metrics.render()[0].decode())
    finally:
        await app.stop()

    assert [r.kind for r in platform.sent] == [ReplyKind.ANSWER] * 4
    for channel, name, other in (("1", "rick", "joshua"), ("2", "joshua", "rick")):
        sent = [r.text for r in platform.sent if r.channel == channel]
        asked = [r for r in generator.requests if r.channel_key == f"telegram:{channel}"]
        assert len(sent) == len(asked) == 2 and {r.character for r in asked} == {name}
        for text, request in zip(sent, asked):
            assert text == await solo.reply(cast_dirs[name], request)
            assert text != await solo.reply(cast_dirs[other], request)
    # the turn-2 replies were decoded at the same time, each in its own model's worker
    (rick_start, rick_end), (joshua_start, joshua_end) = [
        (s[0][0], s[-1][0] + s[-1][2]) for s in steps.values()]
    assert rick_start < joshua_end and joshua_start < rick_end, steps
    for name in ("rick", "joshua"):
        assert metrics[("dialogbot_generation_seconds_count", (("character", name),))] == 2
        assert metrics[("dialogbot_character_load_seconds_count", (("character", name),))] == 1
    assert metrics[("dialogbot_characters_loaded", ())] == 2
    assert "character joshua answered telegram:2" in caplog.text


async def test_with_one_model_at_a_time_alternating_characters_reload_in_flat_memory(
        make_config, few_dirs):
    a, b = few_dirs["a"], few_dirs["b"]
    config = make_config(model=str(a), characters=f"a={a},b={b}", max_models=1,
                         max_new_tokens=8)
    router = make_generator(config)
    router.metrics = log = LoadLog()
    replies: dict[str, list[str]] = {"a": [], "b": []}
    await router.start()
    try:
        replies["a"].append((await router.reply(request("a"))).text)  # a: loaded, warm
        one_model = psutil.Process().memory_info().rss
        with PeakRss() as rss:
            for name in "babab":
                replies[name].append((await router.reply(request(name))).text)
                assert router.loaded == [name]
        after = psutil.Process().memory_info().rss
    finally:
        await router.stop()
    assert log.names == ["a", "b", "a", "b", "a", "b"]
    assert len(set(replies["a"])) == len(set(replies["b"])) == 1  # same model, same reply
    assert replies["a"][0] != replies["b"][0]
    model_bytes = (a / "model.safetensors").stat().st_size
    margin = model_bytes // 2
    assert rss.peak - one_model < margin, (
        f"peak {rss.peak / 2**20:.0f} MB vs {one_model / 2**20:.0f} MB with one model loaded "
        f"(a model is {model_bytes / 2**20:.0f} MB)")
    assert after - one_model < margin


async def test_a_busy_model_is_unloaded_only_after_its_requests_are_answered(
        chars_config, cast_dirs, solo):
    router = make_generator(chars_config(max_models=1))
    router.metrics = log = LoadLog()
    await router.start()
    done: dict[str, float] = {}

    def finish(name: str, task: asyncio.Task) -> None:
        done[name] = time.monotonic()

    try:
        asked = {"long": request("rick", max_new_tokens=300),
                 "joshua": request("joshua", key="telegram:2", max_new_tokens=12),
                 "rick": request("rick", "Are you still there?", key="telegram:3",
                                 max_new_tokens=12)}
        tasks = {"long": asyncio.create_task(router.reply(asked["long"]))}
        tasks["long"].add_done_callback(lambda t: finish("long", t))
        stats = router.slots["rick"].generator.worker.stats
        while stats.decode_steps < 5:
            await asyncio.sleep(0.002)
        tasks["joshua"] = asyncio.create_task(router.reply(asked["joshua"]))
        while not (router.slots["rick"].draining or "joshua" in router.loaded):
            await asyncio.sleep(0.002)  # every model is busy: rick drains
        tasks["rick"] = asyncio.create_task(router.reply(asked["rick"]))  # waits, not joins
        results = {name: await task for name, task in tasks.items()}
    finally:
        await router.stop()
    assert len(results["long"].token_ids) == 300 and not results["long"].fallback
    assert log.names == ["rick", "joshua", "rick"]
    assert done["long"] <= log.loads[1][1]  # joshua loaded after rick's request was answered
    for name, key in (("long", "rick"), ("joshua", "joshua"), ("rick", "rick")):
        assert results[name].text == await solo.reply(cast_dirs[key], asked[name])


async def test_a_character_change_drops_the_cache_and_survives_a_restart(chars_config,
                                                                          cast_dirs, solo):
    config = chars_config(admin_ids="telegram:1")

    def said(text: str, author: str = "1"):
        return message(text, channel="-5", author=author, direct=False, to_me=True)

    async def start():
        platform = RecordingAdapter()
        router = make_generator(config)
        app = build_app(config, [platform], generator=CountingGenerator(router))
        await app.start()
        return app, platform, router

    def stats(router: CharacterRouter, name: str) -> tuple[int, int]:
        worker_stats = router.slots[name].generator.worker.stats
        return worker_stats.prefill_tokens, worker_stats.reused_tokens

    async def answered_by(name: str, text: str) -> int:
        """Send `text`; check `name`'s model answered; return the prompt's length."""
        await app.pipeline.process(said(text))
        asked = app.generator.requests[-1]
        assert asked.character == name
        assert platform.sent[-1].text == await solo.reply(cast_dirs[name], asked)
        return sum(1 + len(t.token_ids if t.role is Role.BOT else tokenizer.encode(t.text))
                   for t in asked.turns)  # each turn and its end-of-text: no window yet

    tokenizer = AutoTokenizer.from_pretrained(cast_dirs["rick"])

    app, platform, router = await start()
    try:
        await app.pipeline.process(said("Hello there"))
        before = stats(router, "rick")
        await app.pipeline.process(said("How are you?"))
        assert stats(router, "rick")[1] > before[1]  # turn 2 reuses turn 1's cache

        await app.pipeline.process(said("/settings character=joshua", author="2"))
        assert platform.sent[-1].private and "Only admins" in platform.sent[-1].text
        assert await app.store.get_settings("telegram", "-5") == {}
        await app.pipeline.process(said("/settings character=joshua"))
        assert "character = joshua*" in platform.sent[-1].text
        await answered_by("joshua", "Tell me more")

        await app.pipeline.process(said("/settings character=default"))
        assert "character = rick* (of rick, joshua)" in platform.sent[-1].text
        assert await app.store.get_settings("telegram", "-5") == {"character": "default"}
        before = stats(router, "rick")
        prompt = await answered_by("rick", "And now?")
        prefilled, reused = (x - y for x, y in zip(stats(router, "rick"), before))
        assert (prefilled, reused) == (prompt, 0)  # rick's cache of this chat was dropped
        await app.pipeline.process(said("/settings character=joshua"))
    finally:
        await app.stop()

    app, platform, router = await start()
    try:
        await answered_by("joshua", "Still there?")
        await app.pipeline.process(said("/settings"))
        assert "character = joshua*" in platform.sent[-1].text
    finally:
        await app.stop()


async def test_remote_characters_send_their_model_name_per_request(make_config, cast_dirs,
                                                                     solo):
    server = await FakeOpenAI(cast_dirs["rick"], name="rick-ft",
                              more_models={"joshua-ft": cast_dirs["joshua"]}).start()
    config = make_config(model=str(cast_dirs["rick"]), generator_backend="openai",
                         generator_url=server.url, generator_model="rick-ft",
                         characters="rick=rick-ft,joshua=joshua-ft", max_models=1)
    router = make_generator(config)
    platform = RecordingAdapter()
    app = build_app(config, [platform], generator=CountingGenerator(router))
    await app.start()
    try:
        await app.pipeline.process(message("/settings character=joshua", channel="2"))
        platform.sent.clear()
        for channel in ("1", "2", "2", "1"):
            await app.pipeline.process(message("Hello, who are you?", channel=channel))
        assert sorted(router.loaded) == ["joshua", "rick"]  # no limit for remote characters
    finally:
        await app.stop()
        await server.stop()
    assert [r.body["model"] for r in server.requests] == [
        "rick-ft", "joshua-ft", "joshua-ft", "rick-ft"]
    for sent, asked in zip(platform.sent, app.generator.requests):  # one at a time
        name = {"1": "rick", "2": "joshua"}[sent.channel]
        assert asked.character == name and asked.channel_key == f"telegram:{sent.channel}"
        assert sent.text == await solo.reply(cast_dirs[name], asked)


async def test_without_characters_nothing_changes(make_config):
    config = make_config()
    generator = make_generator(config)
    assert not isinstance(generator, CharacterRouter)
    platform = RecordingAdapter()
    app = build_app(config, [platform], generator=generator)
    await app.start()
    try:
        await app.pipeline.process(message("/settings character=rick"))
        assert "Can't set" in platform.sent[-1].text and "character" not in \
            platform.sent[-1].text.split("one of:")[1]
        await app.pipeline.process(message("/settings"))
        assert "character" not in platform.sent[-1].text
    finally:
        await app.stop()


async def test_load_and_unload_are_ordered_and_an_unknown_name_gets_the_default(chars_config):
    config = chars_config(metrics_port=0, metrics_host="127.0.0.1")
    router = make_generator(config)
    assert build_app(config, [RecordingAdapter()], generator=router).pipeline.metrics is \
        router.metrics  # build_app counts its loads
    assert not router.ready
    await router.start()
    try:
        assert router.ready and router.loaded == ["rick"]
        got = await router.reply(request("no-such-character"))
        assert router.loaded == ["rick"] and got.text
        await asyncio.gather(router.reply(request("joshua")), router.reply(request("joshua")))
        assert router.loaded == ["rick", "joshua"] and router.queue_depth == 0
    finally:
        await router.stop()
    assert router.loaded == [] and not router.ready
