"""Pure rules that decide which generated candidates may be sent.

- `normalise` / `is_repeat`: a candidate equal to one of the bot's last few replies or to the
  user's last message (ignoring case, spaces and punctuation) is a repeat.
- `fold` / `Blocklist`: an optional word filter. Listed words and phrases match whole words,
  case-insensitively, after Unicode folding (NFKC, casefold, combining marks stripped,
  zero-width characters removed, common Cyrillic/Greek look-alikes mapped to Latin), so
  "Bаd" with a Cyrillic "а" or "b\u200bad" still match "bad".

Only candidates are ever checked; what users wrote and what is stored is never changed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.errors import ConfigError
from bot.events import Role, Turn

# Characters that render as nothing: zero-width space/joiners, word joiner, BOM, soft hyphen,
# Mongolian vowel separator, invisible operators.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u2061\u2062"
                                    "\u2063\u2064"))

# Look-alike letters (lower case: applied after casefold) -> the Latin letter they imitate.
CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
    "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i",
    "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "һ": "h", "ӏ": "l",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ς": "c",
})

_NOT_WORD = re.compile(r"[\W_]+")


def fold(text: str) -> str:
    """Text as the word filter sees it: NFKC, casefolded, no combining marks, no invisible
    characters, look-alike letters mapped to Latin."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold()
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", text.translate(CONFUSABLES))


def normalise(text: str) -> str:
    """Text as the repeat rule sees it: case, spacing and punctuation ignored."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def is_repeat(candidate: str, earlier: Iterable[str]) -> bool:
    """True when `candidate` equals one of `earlier` after `normalise` (an empty normal form,
    e.g. only punctuation, counts as a repeat of nothing)."""
    key = normalise(candidate)
    return bool(key) and any(key == normalise(text) for text in earlier)


def earlier_lines(turns: Sequence[Turn], bot_replies: int) -> tuple[str, ...]:
    """What a candidate must not repeat: the bot's last `bot_replies` replies and the user
    messages it is answering (those after its last reply). Empty when `bot_replies` is 0."""
    if bot_replies <= 0:
        return ()
    users: list[str] = []
    for turn in reversed(turns):
        if turn.role is Role.BOT:
            break
        users.append(turn.text)
    bots = [t.text for t in turns if t.role is Role.BOT][-bot_replies:]
    return tuple(users + bots)


class Blocklist:
    """Listed words and phrases, matched as whole words in folded text."""

    def __init__(self, entries: Iterable[str]):
        folded = sorted({" ".join(fold(e).split()) for e in entries if e.strip()}, key=len,
                        reverse=True)
        self.entries = tuple(e for e in folded if e)
        body = "|".join(r"\s+".join(map(re.escape, e.split())) for e in self.entries)
        self._pattern = re.compile(rf"(?<!\w)(?:{body})(?!\w)") if body else None

    @classmethod
    def from_file(cls, path: str | Path) -> "Blocklist":
        """One word or phrase a line; blank lines and lines starting with # are ignored."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"DIALOGBOT_BLOCKLIST={str(path)!r} could not be read: "
                              f"{type(exc).__name__}") from None
        return cls(line for line in lines if not line.lstrip().startswith("#"))

    def __len__(self) -> int:
        return len(self.entries)

    def blocks(self, text: str) -> bool:
        """True when `text` contains a listed word or phrase."""
        return self._pattern is not None and self._pattern.search(fold(text)) is not None


@dataclass(frozen=True, slots=True)
class ReplyRules:
    """How the worker picks among candidates.

    max_candidates: upper bound on candidates per reply whatever a channel asks for
    repeat_window:  how many of the bot's last replies a candidate must not repeat (0 = off)
    blocklist:      path of the word list, or None (filter off)
    neutral_reply:  sent when the word filter dropped every candidate
    """

    max_candidates: int = 8
    repeat_window: int = 4
    blocklist: Path | None = None
    neutral_reply: str = "Let's talk about something else."
