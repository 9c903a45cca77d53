"""Training data for `dialogbot train`: CSV scripts, JSONL dialogues and plain-text dialogues
read into one shape, and each example turned into token ids the way the bot builds prompts.

Pure Python (no torch): the reader and the tokenisation are what the tests check most.

- A `Corpus` holds dialogues (tuples of turn texts, cleaned as the bot cleans an incoming
  message) and `Example`s: one response (a turn index) and the turns before it that are its
  context (from `first`).
- CSV: one dialogue, the whole script. With a character, each of their lines is a response;
  without one, every line with a line before it is. Context: up to `context_lines` lines before.
- JSONL (`{"turns": [...]}` per line) and TXT (blank-line separated blocks, a turn per line):
  every turn after the first is a response, its context all the turns before it (the token
  budget then keeps the newest that fit, as the bot does).
Every unusable input raises `DataError` with one line naming the file (and line number).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.errors import DataError
from bot.prompt import build_prompt
from bot.text import clean_incoming, one_line

FORMATS = ("csv", "jsonl", "txt")
LOSSES = ("response", "all")
IGNORE = -100  # label the loss skips (PyTorch's cross-entropy ignore_index)
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}


@dataclass(frozen=True, slots=True)
class Example:
    """`dialogue`'s turn `response` answers turns `first` .. `response - 1`."""

    dialogue: int
    response: int
    first: int


@dataclass(frozen=True, slots=True)
class Corpus:
    dialogues: tuple[tuple[str, ...], ...]
    examples: tuple[Example, ...]

    def turns(self, example: Example) -> tuple[tuple[str, ...], str]:
        """(context turns oldest first, response) of one example."""
        turns = self.dialogues[example.dialogue]
        return turns[example.first:example.response], turns[example.response]


@dataclass(frozen=True, slots=True)
class CsvColumns:
    speaker: str = "name"
    text: str = "line"


def detect_format(path: Path, given: str | None) -> str:
    if given:
        if given not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, not {given!r}")
        return given
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise DataError(f"{path}: cannot tell the format from the extension "
                        f"{path.suffix or '(none)'!r}; use --format {'|'.join(FORMATS)}")
    return found


def read_text(path: Path) -> str:
    """The file's text (UTF-8, an optional byte-order mark dropped); one-line errors."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
                        f"{line}); save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_corpus(path: Path, fmt: str | None = None, *, character: str | None = None,
                columns: CsvColumns = CsvColumns(), context_lines: int = 7) -> Corpus:
    """Read `path` (format from `fmt` or its extension) into a `Corpus` with examples."""
    kind = detect_format(path, fmt)
    text = read_text(path)
    if kind == "csv":
        corpus = csv_corpus(path, text, character, columns, context_lines)
    else:
        dialogues = jsonl_dialogues(path, text) if kind == "jsonl" else txt_dialogues(text)
        corpus = dialogue_corpus(dialogues)
    if not corpus.examples:
        raise DataError(f"{path}: no examples (a response needs at least one turn before it)")
    return corpus


def csv_corpus(path: Path, text: str, character: str | None, columns: CsvColumns,
               context_lines: int) -> Corpus:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    needed = [columns.text] + ([columns.speaker] if character is not None else [])
    missing = [name for name in needed if name not in header]
    if missing:
        raise DataError(f"{path}: no column {' or '.join(repr(m) for m in missing)} (columns: "
                        f"{', '.join(repr(h) for h in header) or 'none'}); use "
                        "--speaker-column / --text-column")
    lines: list[str] = []
    speakers: list[str] = []
    try:
        for row in reader:
            line = clean_incoming(row.get(columns.text) or "")
            if line:
                lines.append(line)
                speakers.append(one_line(row.get(columns.speaker) or ""))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
    if character is None:
        responses = range(1, len(lines))
    else:
        wanted = character.strip().casefold()
        responses = [i for i, who in enumerate(speakers) if who.casefold() == wanted and i > 0]
        if not any(who.casefold() == wanted for who in speakers):
            common = ", ".join(f"{who} ({n})" for who, n in
                               Counter(s for s in speakers if s).most_common(5))
            raise DataError(f"{path}: the character {character!r} never speaks in column "
                            f"{columns.speaker!r} (most lines: {common or 'nobody'})")
    examples = tuple(Example(0, i, max(0, i - context_lines)) for i in responses)
    return Corpus((tuple(lines),), examples)


def jsonl_dialogues(path: Path, text: str) -> list[tuple[str, ...]]:
    dialogues = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not JSON ({exc.msg})") from None
        turns = value.get("turns") if isinstance(value, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DataError(f'{path}: line {number}: not a dialogue; expected '
                            '{"turns": ["...", "..."]} (a list of strings)')
        cleaned = tuple(t for t in map(clean_incoming, turns) if t)
        if len(cleaned) < 2:
            raise DataError(f"{path}: line {number}: a dialogue needs at least two "
                            f"non-empty turns, this one has {len(cleaned)}")
        dialogues.append(cleaned)
    return dialogues


def txt_dialogues(text: str) -> list[tuple[str, ...]]:
    dialogues: list[tuple[str, ...]] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        turn = clean_incoming(line)
        if turn:
            block.append(turn)
        elif block:
            dialogues.append(tuple(block))
            block = []
    return dialogues


def dialogue_corpus(dialogues: Sequence[tuple[str, ...]]) -> Corpus:
    examples = tuple(Example(d, i, 0) for d, turns in enumerate(dialogues)
                     for i in range(1, len(turns)))
    return Corpus(tuple(dialogues), examples)


# --- token ids ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Encoded:
    """One training example: `input_ids` and the `labels` the loss reads (IGNORE = skipped)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def encode_example(context: Sequence[Sequence[int]], response: Sequence[int], eos: int,
                   block_size: int, loss: str = "response") -> Encoded | None:
    """The bot's prompt for `context` (`build_prompt`, the newest turns that fit the block
    after the response) followed by the response and its end-of-text token: exactly the
    tokens the bot feeds the model and the ones it should answer with. None when the
    response leaves no room for any context in the block."""
    room = block_size - len(response) - 1
    if not response or room < 2:
        return None
    prompt = build_prompt(context, room, eos)
    if not prompt:
        return None
    ids = (*prompt, *response, eos)
    if loss == "all":
        labels = ids
    else:
        labels = (IGNORE,) * len(prompt) + ids[len(prompt):]
    return Encoded(ids, labels)


def encode_corpus(corpus: Corpus, encode: Callable[[str], list[int]], eos: int,
                  block_size: int, loss: str = "response") -> tuple[list[Encoded], int]:
    """Encode every example, tokenising each turn once.
    Returns (encoded examples, how many were skipped for a response too long for the block)."""
    cache: dict[int, list[list[int]]] = {}
    out: list[Encoded] = []
    skipped = 0
    for example in corpus.examples:
        if example.dialogue not in cache:
            cache[example.dialogue] = [encode(t) for t in corpus.dialogues[example.dialogue]]
        ids = cache[example.dialogue]
        encoded = encode_example(ids[example.first:example.response], ids[example.response],
                                 eos, block_size, loss)
        if encoded is None:
            skipped += 1
        else:
            out.append(encoded)
    return out, skipped
