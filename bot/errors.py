"""One small error tree. The pipeline turns any of these into one apology line and one log line."""

from __future__ import annotations


class BotError(Exception):
    """Base of every error the bot raises on purpose."""


class ConfigError(BotError):
    """A setting is missing or wrong; the message is one line that names the setting."""


class GenerationError(BotError):
    """The model could not produce a reply."""


class GenerationTimeout(GenerationError):
    """Generation took longer than DIALOGBOT_GENERATION_TIMEOUT."""


class BusyError(GenerationError):
    """The generation queue is full; the user is asked to try again in a moment."""


class StoreError(BotError):
    """The conversation store failed (after its own retries)."""


class PlatformError(BotError):
    """A platform adapter could not deliver or start."""


class UndeliverableError(PlatformError):
    """The platform refused a message for good (chat gone, bot blocked or kicked): retrying
    cannot help."""


class DataError(ConfigError):
    """A training or export input is unusable (missing, empty, not UTF-8, wrong columns, a bad
    line); the message is one line naming the file, and the line number where there is one."""
