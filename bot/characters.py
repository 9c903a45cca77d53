"""Characters: several DialoGPT models (fine-tunes) in one bot, chosen per channel.

DIALOGBOT_CHARACTERS="rick=models/rick,joshua=models/joshua,stock=microsoft/DialoGPT-medium"
names the models (any `from_pretrained` id or directory; with the remote backend, the model
name the server knows). DIALOGBOT_MODEL is the default character: the entry with the same
model takes its name, else it is the character "default". `/settings character=rick` chooses
one per channel; `bot.router.CharacterRouter` serves them.

`Cast` is the table (pure, cheap to build from the settings); `check_cast` is the start-up
check of every local character (config.json and tokenizer files only, no weights): a missing
directory, another architecture or a tokenizer other than the default's (DialoGPT's, GPT-2's)
is a `ConfigError` of one line naming DIALOGBOT_CHARACTERS and the character. Characters
must share the tokenizer because a bot turn is stored as the ids its model generated and the
next prompt may go to another character.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.errors import ConfigError

if TYPE_CHECKING:
    from bot.config import Config

SETTING = "DIALOGBOT_CHARACTERS"
DEFAULT = "default"  # the name of DIALOGBOT_MODEL when no entry names it
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
ARCHITECTURE = "GPT2LMHeadModel"


def parse_characters(value: str) -> tuple[tuple[str, str], ...]:
    """"rick=models/rick, stock=microsoft/DialoGPT-medium" -> (("rick", "models/rick"), ...).

    Names are lower-cased; entries are separated by commas or new lines. Raises ValueError
    (one line) for an entry without "=", an empty model, a bad or repeated name, or "default"
    (reserved: `/settings character=default` goes back to DIALOGBOT_MODEL)."""
    out: list[tuple[str, str]] = []
    for entry in value.replace("\n", ",").split(","):
        if not entry.strip():
            continue
        name, sep, model = (part.strip() for part in entry.partition("="))
        name = name.lower()
        if not sep or not model:
            raise ValueError(f"entries look like name=model (a hub id or directory), "
                             f"got {entry.strip()!r}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"character names are 1-32 letters, digits, '_' or '-', "
                             f"got {name!r}")
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} is reserved (it means DIALOGBOT_MODEL)")
        if any(name == known for known, _ in out):
            raise ValueError(f"character {name!r} is named twice")
        out.append((name, model))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Cast:
    """The characters in force: (name, model) pairs, the default first; `remote` = the models
    are names sent to a completions server, not loaded here."""

    entries: tuple[tuple[str, str], ...]
    default: str
    remote: bool = False

    @classmethod
    def from_config(cls, config: "Config") -> "Cast":
        remote = config.generator_backend == "openai"
        default_model = (config.generator_model or config.model) if remote else config.model
        entries = parse_characters(config.characters)
        named = [name for name, model in entries if model == default_model]
        default = named[0] if named else DEFAULT
        if not named:
            entries = ((DEFAULT, default_model), *entries)
        ordered = sorted(entries, key=lambda entry: entry[0] != default)  # stable
        return cls(tuple(ordered), default, remote)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    def model(self, name: str) -> str:
        return dict(self.entries)[name]

    def resolve(self, name: str | None) -> str:
        """The character that answers for a channel's choice: unknown or None -> default."""
        return name if name in self.names else self.default


def check_cast(cast: Cast) -> None:
    """Start-up check of every character (reads config.json and the tokenizer, no weights).
    Nothing to check locally for remote characters (their tokenizer is DIALOGBOT_MODEL's)."""
    if cast.remote:
        return
    reference: tuple[str, str] | None = None
    for name, model in cast.entries:
        fingerprint = check_character(name, model)
        if reference is None:
            reference = (name, fingerprint)
        elif fingerprint != reference[1]:
            raise ConfigError(
                f"{_where(name, model)}: its tokenizer differs from {reference[0]!r}'s "
                "(every character must use DialoGPT's GPT-2 tokenizer: same vocabulary, "
                "merges and end-of-text)")


def check_character(name: str, model: str) -> str:
    """Raise ConfigError unless `model` is a readable GPT-2 LM; return its tokenizer's
    fingerprint."""
    from transformers import AutoConfig, AutoTokenizer

    where = _where(name, model)
    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"{where}: no such directory")
    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ConfigError(f"{where}: cannot be read ({reason})") from None
    architectures = getattr(config, "architectures", None) or [ARCHITECTURE]
    if config.model_type != "gpt2" or ARCHITECTURE not in architectures:
        found = ", ".join(architectures) if config.model_type == "gpt2" else config.model_type
        raise ConfigError(f"{where}: a {found} model; characters must be DialoGPT models "
                          f"(GPT-2, {ARCHITECTURE})")
    return tokenizer_fingerprint(tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:  # noqa: ANN001 - a transformers tokenizer
    """A hash of what maps text to ids: vocabulary (added tokens included), BPE merges and the
    end-of-text token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    merges = json.loads(backend.to_str()).get("model", {}).get("merges") if backend else None
    body = json.dumps([sorted(tokenizer.get_vocab().items()), merges,
                       tokenizer.eos_token, tokenizer.eos_token_id])
    return hashlib.sha256(body.encode()).hexdigest()


def _where(name: str, model: str) -> str:
    return f"{SETTING}: character {name!r} ({model})"


def _looks_local(model: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ~, more than
    one '/', or its parent directory exists here (models/rick with ./models present)."""
    path = Path(model).expanduser()
    return (path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
            or path.exists() or (path.parent != Path(".") and path.parent.is_dir()))
