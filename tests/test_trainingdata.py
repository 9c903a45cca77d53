"""Training data: the readers, the examples' token ids and loss labels, and that a training
example is exactly the prompt the bot builds for the same turns."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from bot.errors import DataError
from bot.events import DecodingSettings, GenerationRequest, Role, Turn
from bot.generator import QueuedGenerator
from bot.hf import TransformersBackend
from bot.trainingdata import IGNORE, encode_corpus, encode_example, read_corpus

EOS = 50256
SCRIPT = """name,line
Morty,Rick where are we going?
Rick,  Somewhere fun Morty.
Morty,Is it dangerous?
Summer,Grandpa can I come?
Rick,No. Get in the car.
Morty,Fine.
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def examples(corpus):
    return [corpus.turns(e) for e in corpus.examples]


def test_csv_character_lines_are_responses_to_the_lines_before(tmp_path):
    corpus = read_corpus(write(tmp_path, "s.csv", SCRIPT), character="rick", context_lines=2)
    assert examples(corpus) == [
        (("Rick where are we going?",), "Somewhere fun Morty."),  # trimmed like a message
        (("Is it dangerous?", "Grandpa can I come?"), "No. Get in the car."),
    ]


def test_csv_without_character_every_line_after_the_first_is_a_response(tmp_path):
    corpus = read_corpus(write(tmp_path, "s.csv", SCRIPT), context_lines=7)
    assert len(corpus.examples) == 5
    assert examples(corpus)[-1] == (("Rick where are we going?", "Somewhere fun Morty.",
                                     "Is it dangerous?", "Grandpa can I come?",
                                     "No. Get in the car."), "Fine.")


def test_csv_named_columns(tmp_path):
    path = write(tmp_path, "s.csv", "who,said\nA,hi\nB,hello\n")
    with pytest.raises(DataError, match="no column 'line'"):
        read_corpus(path, character="B")
    from bot.trainingdata import CsvColumns

    corpus = read_corpus(path, character="B", columns=CsvColumns("who", "said"))
    assert examples(corpus) == [(("hi",), "hello")]


def test_jsonl_and_txt_every_turn_after_the_first_answers_all_before(tmp_path):
    jsonl = write(tmp_path, "d.jsonl", json.dumps({"turns": ["a1", "b1", "a2"]}) + "\n\n"
                  + json.dumps({"turns": ["x", "y"]}) + "\n")
    txt = write(tmp_path, "d.txt", "a1\nb1\na2\n\n  \nx\ny\n")
    want = [(("a1",), "b1"), (("a1", "b1"), "a2"), (("x",), "y")]
    assert examples(read_corpus(jsonl)) == want
    assert examples(read_corpus(txt)) == want


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not JSON"),
    ('["a", "b"]', "line 2: not a dialogue"),
    ('{"turns": ["a", 3]}', "line 2: not a dialogue"),
    ('{"turns": ["only one", "  "]}', "line 2: a dialogue needs at least two"),
])
def test_jsonl_line_that_is_not_a_dialogue_names_its_line(tmp_path, line, message):
    path = write(tmp_path, "d.jsonl", '{"turns": ["a", "b"]}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_corpus(path)


def test_response_only_loss_ignores_every_context_token():
    context, response = [[10, 11, 12], [20, 21]], [30, 31, 32]
    enc = encode_example(context, response, EOS, block_size=64, loss="response")
    assert enc.input_ids == (10, 11, 12, EOS, 20, 21, EOS, 30, 31, 32, EOS)
    assert enc.labels == (IGNORE,) * 7 + (30, 31, 32, EOS)
    every = encode_example(context, response, EOS, block_size=64, loss="all")
    assert every.labels == every.input_ids


def test_block_keeps_the_newest_context_and_skips_responses_too_long():
    context = [[1] * 10, [2] * 10, [3] * 10]
    enc = encode_example(context, [9] * 5, EOS, block_size=30)
    assert enc.input_ids == (2,) * 10 + (EOS,) + (3,) * 10 + (EOS,) + (9,) * 5 + (EOS,)
    assert encode_example(context, [9] * 28, EOS, block_size=30) is None


def test_collator_labels_mask_context_and_padding_but_not_response_and_its_eos():
    from bot.train import Collator

    short = encode_example([[5]], [6, 7], EOS, 64)
    long = encode_example([[1, 2, 3], [4]], [8], EOS, 64)
    batch = Collator(EOS)([short, long])
    ids, labels, mask = (batch[k].tolist() for k in ("input_ids", "labels", "attention_mask"))
    assert ids[0] == [5, EOS, 6, 7, EOS, EOS, EOS, EOS]
    assert ids[1] == [1, 2, 3, EOS, 4, EOS, 8, EOS]
    assert mask[0] == [1, 1, 1, 1, 1, 0, 0, 0]  # from lengths, not from token == EOS
    assert mask[1] == [1] * 8
    assert labels[0] == [IGNORE, IGNORE, 6, 7, EOS, IGNORE, IGNORE, IGNORE]
    assert labels[1] == [IGNORE] * 6 + [8, EOS]


class RecordingBackend(TransformersBackend):
    """The real backend; remembers the prompt the model was given."""

    prompts: list[list[int]]

    def generate(self, prompt, settings, cancel: threading.Event):
        self.prompts = [*getattr(self, "prompts", []), list(prompt)]
        return super().generate(prompt, settings, cancel)


async def test_training_example_is_the_prompt_the_bot_builds_plus_the_response(
        tmp_path, tiny_model_dir):
    turns = ["Hello there!", "Hi, how are you?", "Great, thanks. Going to the beach later?"]
    response = "Yes, with my dog."
    data = write(tmp_path, "d.jsonl", json.dumps({"turns": [*turns, response]}) + "\n")
    backend = RecordingBackend(str(tiny_model_dir), threads=1)
    generator = QueuedGenerator(backend, timeout=60)
    await generator.start()
    try:
        tok = backend.tokenizer
        roles = [Role.USER, Role.BOT, Role.USER]
        history = tuple(Turn("console", "c", role, text,
                             token_ids=tuple(tok.encode(text)) if role is Role.BOT else None)
                        for role, text in zip(roles, turns))
        await generator.reply(GenerationRequest("console:c", history, DecodingSettings(
            do_sample=False, max_new_tokens=4)))
    finally:
        await generator.stop()
    served = backend.prompts[-1]

    corpus = read_corpus(data)
    encoded, skipped = encode_corpus(corpus, tok.encode, EOS, block_size=512)
    last = encoded[-1]  # the example whose context is the three turns
    assert skipped == 0 and len(encoded) == 3
    assert list(last.input_ids[:len(served)]) == served
    assert list(last.input_ids[len(served):]) == tok.encode(response) + [EOS]
    assert last.labels[:len(served)] == (IGNORE,) * len(served)
