"""All settings, read once: environment (DIALOGBOT_*), a `.env` file, an optional TOML file.

Priority: explicit arguments > environment > .env > TOML file > defaults.
A bad value raises `ConfigError` with one line naming the setting; secrets never appear in it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bot.errors import ConfigError
from bot.events import DecodingSettings

ENV_PREFIX = "DIALOGBOT_"
_toml_file: ContextVar[Path | None] = ContextVar("dialogbot_toml_file", default=None)
SECRET_FIELDS = ("discord_token", "telegram_token", "telegram_webhook_secret",
                 "generator_api_key")
PLATFORMS = ("console", "telegram", "discord")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]
    return value


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8",
        extra="ignore", validate_default=True, case_sensitive=False,
    )

    # --- model and generation -------------------------------------------------------------
    model: str = Field("microsoft/DialoGPT-medium", min_length=1,
                       description="Hub id or local directory of a DialoGPT model.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:0 ...")
    torch_threads: int | None = Field(None, ge=1, le=256,
                                      description="torch intra-op threads (default: torch's).")
    generator_backend: Literal["torch", "ct2", "openai"] = Field("torch", description=(
        "torch = transformers (DIALOGBOT_QUANTIZE applies); ct2 = CTranslate2 int8, "
        "needs the ct2 extra; the model is converted once into $HF_HOME/dialogbot-ct2; "
        "openai = an OpenAI-compatible completions server at DIALOGBOT_GENERATOR_URL "
        "(only the tokenizer of DIALOGBOT_MODEL is loaded)."))
    generator_url: str | None = Field(None, description=(
        "Base URL of the completions server, e.g. http://vllm:8000/v1 (backend openai)."))
    generator_api_key: SecretStr | None = Field(None, description="Its API key, if any.")
    generator_model: str | None = Field(None, description=(
        "Model name sent to the server (default: DIALOGBOT_MODEL)."))
    quantize: Literal["none", "int8", "bf16", "fp16"] = Field("none", description=(
        "torch precision: none = fp32; int8 = dynamic int8 (CPU); bf16 (CPU with native "
        "bf16, or GPU); fp16 (GPU only)."))
    pack_weights: bool = Field(True, description=(
        "fp32 on a CPU: reorder the linear weights once into oneDNN's blocked layout "
        "(same math; batched decode ~1.7x faster). false = torch's default matmul."))
    characters: str = Field("", description=(
        "Several models, chosen per channel with /settings character=NAME: "
        "'rick=models/rick,stock=microsoft/DialoGPT-medium' (name=hub id or directory; with "
        "the openai backend, name=model name on the server). DIALOGBOT_MODEL is the default "
        "character. Unset = one model."))
    max_models: int = Field(2, ge=1, le=64, description=(
        "Character models kept in memory at once; the least recently used is unloaded to "
        "load another (remote characters do not count)."))
    generation_timeout: float = Field(120.0, gt=0, le=3600,
                                      description="Seconds before a generation is abandoned.")
    queue_size: int = Field(64, ge=1, le=100_000,
                            description="Generation requests that may wait; more get 'busy'.")
    batching: bool = Field(True, description=(
        "Continuous batching across channels with per-channel KV cache reuse "
        "(bot/batching.py; torch backend). Off = one request at a time."))
    max_batch_size: int = Field(16, ge=1, le=256,
                                description="Most requests decoded together in one step.")
    max_batch_wait_ms: float = Field(2.0, ge=0, le=1000, description=(
        "When idle, how long the first request waits for others to start with it."))
    kv_cache_mb: float | None = Field(None, ge=0, description=(
        "MiB of per-conversation keys/values kept between turns, LRU-evicted. Unset = a "
        "quarter of the machine's memory or half of what is free after loading, the smaller. "
        "0 = off."))
    kv_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description=(
        "How the batching generator stores keys/values: auto = bfloat16 where attention in "
        "bf16 measures faster at load (a GPU; a CPU with AMX, not every CPU with "
        "AVX512-BF16), float16 elsewhere. Half precision is attended as stored where that "
        "measures faster than widening to fp32 (timed at load), widened otherwise. Both halve "
        "their memory and the bytes a decode step reads; float32 gives replies "
        "bit-identical to generate()."))
    window_step: int = Field(256, ge=0, le=1024, description=(
        "When the prompt window must slide, drop at least this many tokens of old turns at "
        "once so the prompt's beginning (and its cache) stays stable. 0 = slide per turn."))
    context: Literal["chain", "user", "channel"] = Field("chain", description=(
        "Context of a group message (each channel can change it with /settings context=): "
        "chain = the reply chain that leads to it (a message replying to nothing continues "
        "its author's last exchange with the bot); user = each user's own conversation with "
        "the bot; channel = everyone shares one history. Direct chats are one conversation."))
    history_turns: int = Field(64, ge=1, le=1000,
                               description="Most recent turns read for a prompt.")
    recover_window: float = Field(300.0, ge=0, description=(
        "After a restart, answer messages left unanswered this many seconds ago or less; "
        "older ones are skipped. 0 = skip all."))
    claim_lease: float = Field(30.0, ge=1, le=3600, description=(
        "Seconds a message being answered (or a reply being sent) stays claimed by this "
        "instance unless renewed; another instance (or the next start) takes over a claim "
        "that ran out. Renewed every third of it while the work goes on."))
    shutdown_timeout: float = Field(30.0, ge=0, le=600, description=(
        "On SIGTERM/SIGINT, seconds to let replies in flight finish before they are abandoned."))
    send_retries: int = Field(3, ge=0, le=10, description=(
        "Retries (with backoff) when a platform send fails; rate limits are waited out by the "
        "platform libraries themselves."))
    fallback_reply: str = Field("I'm not sure what to say to that.", min_length=1)

    # decoding defaults (overridable per channel with /settings)
    do_sample: bool = True
    temperature: float = Field(0.8, gt=0, le=5)
    top_k: int = Field(50, ge=0, le=50257)
    top_p: float = Field(0.9, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=1, le=5)
    no_repeat_ngram_size: int = Field(3, ge=0, le=10)
    max_new_tokens: int = Field(64, ge=1, le=512)
    candidates: int = Field(1, ge=1, le=64, description=(
        "Replies sampled per message (one batched call); the rankers pick one. 1 = off."))

    # --- reply quality (bot/rankers.py, bot/quality.py) -----------------------------------
    max_candidates: int = Field(8, ge=1, le=64, description=(
        "Most candidates a channel may ask for with /settings candidates=N."))
    rankers: str = Field("", description=(
        "DialogRPT rankers with optional weights, e.g. 'human-vs-rand:0.5,updown:1' "
        "(names map to microsoft/DialogRPT-<name>; hub ids and local directories work too)."))
    repeat_window: int = Field(4, ge=0, le=100, description=(
        "Candidates repeating one of the bot's last N replies (or the user's message) are "
        "dropped. 0 = off."))
    blocklist: Path | None = Field(None, description=(
        "Word filter: a file with one word or phrase a line; candidates containing one are "
        "dropped. Unset = off."))
    neutral_reply: str = Field("Let's talk about something else.", min_length=1,
                               description="Sent when the word filter dropped every candidate.")

    # --- storage ----------------------------------------------------------------------------
    database_url: str = Field("sqlite+aiosqlite:///data/dialogbot.db", min_length=1)

    # --- limits -----------------------------------------------------------------------------
    user_rate: int = Field(8, ge=1, description="Messages a user may send per user_period.")
    user_period: float = Field(60.0, gt=0)
    channel_rate: int = Field(30, ge=1, description="Messages a channel may send per period.")
    channel_period: float = Field(60.0, gt=0)

    # --- access -----------------------------------------------------------------------------
    admin_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- platforms --------------------------------------------------------------------------
    telegram_token: SecretStr | None = None
    telegram_base_url: str | None = None
    telegram_base_file_url: str | None = None
    telegram_webhook_url: str | None = None
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = Field(8443, ge=1, le=65535)
    telegram_webhook_secret: SecretStr | None = None

    discord_token: SecretStr | None = None
    discord_channels: Annotated[list[int], NoDecode] = Field(default_factory=list)
    discord_shards: str | None = Field(None, description="unset = one connection; 'auto'; or N")
    discord_shard_ids: Annotated[list[int], NoDecode] = Field(default_factory=list, description=(
        "Shards this instance runs, e.g. 0,1 (with DIALOGBOT_DISCORD_SHARD_COUNT)."))
    discord_shard_count: int | None = Field(None, ge=1, description=(
        "Total shards across all instances."))

    # --- operations -------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = Field("text", description=(
        "json = one JSON object a line, with platform and channel on every line."))
    metrics_port: int | None = Field(None, ge=0, le=65535, description=(
        "Serve /metrics, /healthz and /readyz on this port (unset = off; 0 = any free port)."))
    metrics_host: str = Field("0.0.0.0", description="Address the metrics server binds.")
    redis_url: str | None = Field(None, description=(
        "redis://host:6379/0: limits and per-channel locks shared by every instance "
        "(unset = in-process)."))
    redis_prefix: str = Field("dialogbot", min_length=1,
                              description="Prefix of every Redis key this bot writes.")
    lock_lease: float = Field(30.0, ge=1, le=3600, description=(
        "Seconds a channel lock in Redis lives unless renewed; a crashed instance's lock "
        "expires after this."))

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _admin_ids(cls, value: Any) -> Any:
        value = _split_list(value)
        for entry in value or []:
            platform, _, ident = str(entry).partition(":")
            if platform not in PLATFORMS or not ident:
                raise ValueError(f"entries look like telegram:123 or discord:456, got {entry!r}")
        return value

    @field_validator("rankers")
    @classmethod
    def _rankers(cls, value: str) -> str:
        from bot.rankers import parse_rankers

        parse_rankers(value)
        return value

    @field_validator("blocklist", mode="before")
    @classmethod
    def _blocklist(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        if value is not None and not Path(value).is_file():
            raise ValueError("no such file")
        return value

    @field_validator("characters")
    @classmethod
    def _characters(cls, value: str) -> str:
        from bot.characters import parse_characters

        parse_characters(value)
        return value.strip()

    @field_validator("max_candidates")
    @classmethod
    def _candidates_within_max(cls, value: int, info: ValidationInfo) -> int:
        wanted = info.data.get("candidates", 1)
        if wanted > value:
            raise ValueError(f"must be at least DIALOGBOT_CANDIDATES ({wanted})")
        return value

    @field_validator("generator_url")
    @classmethod
    def _generator_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("generator_backend") == "openai" and not value:
            raise ValueError("required with DIALOGBOT_GENERATOR_BACKEND=openai")
        return value or None

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _shard_ids(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("discord_shard_count")
    @classmethod
    def _shard_count(cls, value: int | None, info: ValidationInfo) -> int | None:
        ids = info.data.get("discord_shard_ids") or []
        if ids and value is None:
            raise ValueError("set it when DIALOGBOT_DISCORD_SHARD_IDS is set")
        if value is not None and any(not 0 <= i < value for i in ids):
            raise ValueError(f"every shard id must be below it (ids {ids})")
        return value

    @field_validator("discord_channels", mode="before")
    @classmethod
    def _discord_channels(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("discord_shards")
    @classmethod
    def _shards(cls, value: str | None) -> str | None:
        if value in (None, "", "auto"):
            return value or None
        if not value.isdigit() or int(value) < 1:
            raise ValueError("use 'auto' or a positive number of shards")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("generator_backend", "quantize", "log_format", "context", "kv_dtype",
                     mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("telegram_token", "discord_token", "kv_cache_mb", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        toml = _toml_file.get()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # --- derived ----------------------------------------------------------------------------
    @property
    def decoding(self) -> DecodingSettings:
        return DecodingSettings(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, max_new_tokens=self.max_new_tokens,
            candidates=self.candidates)

    def secrets(self) -> list[str]:
        """Every secret value in force, for the log redaction filter."""
        out = []
        for name in SECRET_FIELDS:
            value = getattr(self, name, None)
            if isinstance(value, SecretStr) and value.get_secret_value():
                out.append(value.get_secret_value())
        for url in (self.redis_url, self.generator_url):  # passwords inside URLs
            password = urlsplit(url).password if url else None
            if password:
                out.append(password)
        return out

    def enabled_platforms(self) -> list[str]:
        found = [p for p in ("telegram", "discord") if getattr(self, f"{p}_token")]
        return found or ["console"]


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def load_config(config_file: str | Path | None = None, **overrides: Any) -> Config:
    """Build the one settings object, or raise ConfigError with one clear line."""
    path = Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    token = _toml_file.set(path)
    try:
        return Config(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except ValueError as exc:  # e.g. a TOML syntax error
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None
    finally:
        _toml_file.reset(token)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else "?"
        msg = err["msg"].removeprefix("Value error, ")
        shown = "" if field in SECRET_FIELDS else f" (got {err.get('input')!r})"
        parts.append(f"{env_name(field)}: {msg}{shown}")
    return "invalid setting: " + "; ".join(parts)


def configure_logging(config: Config) -> None:
    from bot.logs import setup_logging

    setup_logging(config.log_level, config.secrets(), fmt=config.log_format)
    logging.getLogger(__name__).debug("logging configured")
