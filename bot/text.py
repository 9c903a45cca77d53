"""Pure text helpers: clean what comes in, make what goes out inert, split to platform limits."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except tab and newline; DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# "@name", "@everyone", "@here": a WORD JOINER after the "@" keeps the text readable but no
# platform parses it as a mention (Telegram notifies plain-text @username mentions).
_MENTION = re.compile(r"@(?=\w)")
WORD_JOINER = "\u2060"


def fix_unicode(text: str) -> str:
    """Replace lone surrogates (broken UTF-16 from some clients) with U+FFFD."""
    if not _has_surrogates(text):
        return text
    # a valid pair that arrived as two code points is joined; a lone half becomes U+FFFD
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def clean_incoming(text: str | None) -> str:
    """What the model and the store get: valid Unicode, no control characters, trimmed."""
    if not text:
        return ""
    text = fix_unicode(text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return text.strip()


def clean_outgoing(text: str) -> str:
    """What a platform gets: valid Unicode, no control characters, no runs of blank lines,
    and no live @mentions."""
    text = _CONTROL.sub("", fix_unicode(text).replace("\r", ""))
    text = _MENTION.sub("@" + WORD_JOINER, text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def one_line(text: str) -> str:
    return " ".join(text.split())


def split_message(text: str, limit: int) -> list[str]:
    """Split into parts of at most `limit` characters, at a line break, else a space, else hard.

    Never returns an empty part; joining the parts with the separators they were split at gives
    the text back (modulo the whitespace at the cut).
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = window.rfind("\n")
        if cut < limit // 2:
            cut = max(window.rfind(" "), cut)
        if cut < limit // 4:
            cut = limit
            # do not cut between a character and its combining marks
            while cut > 1 and unicodedata.combining(rest[cut]):
                cut -= 1
        head, rest = rest[:cut].rstrip(), rest[cut:].lstrip()
        if head:
            parts.append(head)
    if rest:
        parts.append(rest)
    return parts
