"""`dialogbot export`: a platform's conversations as JSONL training data for `dialogbot train`.

Through the `Store` seam only: each channel's turns come from `store.recent` (oldest first, in
the store's conversation order) and are split into its conversations (in a group, each user's
exchange with the bot). What the model should not learn from is left out: bot lines
the model did not generate (fallback and notice lines carry no token ids) and anything a user
has /forget-ed (the store has deleted it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from bot.events import Role, Turn
from bot.ports import Store

ALL_TURNS = 1_000_000_000  # `recent`'s limit when every turn of a channel is wanted


def dialogue(turns: Sequence[Turn]) -> list[str]:
    """One conversation's turns as a dialogue: the texts, oldest first, without bot lines the
    model did not generate."""
    return [turn.text for turn in turns
            if turn.text.strip() and (turn.role is not Role.BOT or turn.token_ids)]


def conversations(turns: Sequence[Turn]) -> list[tuple[str, list[Turn]]]:
    """A channel's turns split into its conversations (`Turn.conversation`: a direct chat is
    one; in a group each user's exchange with the bot is one), each in conversation order,
    in the order they started."""
    found: dict[str, list[Turn]] = {}
    for turn in turns:
        found.setdefault(turn.conversation, []).append(turn)
    return list(found.items())


async def export_channels(store: Store, platform: str, channels: Sequence[str] | None,
                          out: Path) -> tuple[int, int]:
    """Write one `{"turns": [...], "channel": ..., "conversation": ...}` line per conversation
    with two turns or more (`channels` None = every channel of the platform); returns
    (dialogues, turns) written. The file appears whole or not at all (written to a temporary
    name, then renamed)."""
    names = list(channels) if channels else await store.channels(platform)
    lines = []
    written = 0
    for channel in names:
        for name, part in conversations(await store.recent(platform, channel, ALL_TURNS)):
            turns = dialogue(part)
            if len(turns) >= 2:
                row = {"turns": turns, "channel": f"{platform}:{channel}"}
                if name:
                    row["conversation"] = name
                lines.append(json.dumps(row, ensure_ascii=False))
                written += len(turns)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return len(lines), written
