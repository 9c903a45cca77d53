"""`dialogbot export`: the store's conversations as JSONL training data, through the real store
and the CLI, read back by the trainer's reader and trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.events import Role, Turn, TurnState
from bot.trainingdata import read_corpus
from storage.store import SQLAlchemyStore

BIN = Path(sys.executable).parent / "dialogbot"


async def say(store, channel: str, author: str, text: str) -> Turn:
    return await store.append(Turn("console", channel, Role.USER, text, author_id=author,
                                   author_name=author, state=TurnState.PENDING))


async def answer(store, to: Turn, text: str, generated: bool = True) -> Turn:
    ids = tuple(range(1, len(text.split()) + 1)) if generated else None
    return await store.add_reply(Turn("console", to.channel, Role.BOT, text, token_ids=ids),
                                 [to.id])


@pytest.fixture
async def history(tmp_path):
    """Two channels; in "c1" a user who is then forgotten and a fallback line."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    store = SQLAlchemyStore(url)
    await store.start()
    one = await say(store, "c1", "ann", "hello there")
    await answer(store, one, "hi ann, nice to see you")
    two = await say(store, "c1", "bob", "my phone number is 555")
    await answer(store, two, "noted, bob")
    three = await say(store, "c1", "ann", "what do you think about cats?")
    await answer(store, three, "I'm not sure what to say to that.", generated=False)
    four = await say(store, "c1", "ann", "do you like cats?")
    await answer(store, four, "cats are great")
    other = await say(store, "c2", "cy", "anyone here?")
    await answer(store, other, "just me")
    await say(store, "c3", "dee", "a message nobody answered")
    await store.forget("console", "bob")  # his message and the reply to it go
    expected = [t.text for t in await store.recent("console", "c1", 1000)
                if t.role is Role.USER or t.token_ids]
    await store.stop()
    return url, expected


def export(args, url, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
    env.update(DIALOGBOT_DATABASE_URL=url, HF_HUB_OFFLINE="1")
    return subprocess.run([str(BIN), "export", "--platform", "console", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


async def test_exported_channel_round_trips_without_forgotten_or_ungenerated_turns(
        tmp_path, history, tiny_model_dir):
    url, expected = history
    out = tmp_path / "chat.jsonl"
    result = export(["--channel", "c1", "--out", str(out)], url, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 1 dialogues (5 turns) to {out}"
    line, = out.read_text(encoding="utf-8").splitlines()
    turns = json.loads(line)["turns"]
    assert turns == expected == ["hello there", "hi ann, nice to see you",
                                 "what do you think about cats?", "do you like cats?",
                                 "cats are great"]
    assert not any("555" in t or "bob" in t or "not sure" in t for t in turns)

    corpus = read_corpus(out)  # what `dialogbot train` reads
    assert corpus.dialogues == (tuple(turns),) and len(corpus.examples) == 4

    from bot.train import TrainOptions, train

    trained = train(TrainOptions(data=out, out=tmp_path / "model", base=str(tiny_model_dir),
                                 max_steps=2, eval_fraction=0), say=lambda _: None)
    summary = json.loads((tmp_path / "model" / "dialogbot-training.json").read_text())
    assert trained.steps == 2 and summary["examples"]["train"] == 4


async def test_export_all_channels_skips_those_without_a_dialogue(tmp_path, history):
    url, _ = history
    out = tmp_path / "all.jsonl"
    result = export(["--all", "--out", str(out)], url, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["channel"] for r in rows] == ["console:c1", "console:c2"]  # c3: one turn
    assert rows[1]["turns"] == ["anyone here?", "just me"]

    again = export(["--all", "--out", str(out)], url, tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    neither = export(["--out", str(tmp_path / "x.jsonl")], url, tmp_path)
    assert neither.returncode == 2 and "--channel" in neither.stderr


async def test_store_lists_a_platforms_channels(tmp_path, history):
    url, _ = history
    store = SQLAlchemyStore(url)
    await store.start()
    try:
        assert await store.channels("console") == ["c1", "c2", "c3"]
        assert await store.channels("telegram") == []
    finally:
        await store.stop()


async def test_a_group_channel_exports_one_dialogue_per_conversation(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    store = SQLAlchemyStore(url)
    await store.start()
    for author, text in (("ann", "ann asks"), ("bob", "bob asks"), ("ann", "ann again")):
        asked = await store.append(Turn("console", "g", Role.USER, text, author_id=author,
                                        author_name=author, state=TurnState.PENDING,
                                        conversation=f"u:{author}"))
        await store.add_reply(Turn("console", "g", Role.BOT, f"to {text}", token_ids=(1, 2),
                                   conversation=f"u:{author}"), [asked.id])
    await store.stop()
    out = tmp_path / "g.jsonl"
    result = export(["--channel", "g", "--out", str(out)], url, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["conversation"], r["turns"]) for r in rows] == [
        ("u:ann", ["ann asks", "to ann asks", "ann again", "to ann again"]),
        ("u:bob", ["bob asks", "to bob asks"])]
