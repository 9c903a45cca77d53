"""The transformers backend: DialoGPT loaded with `from_pretrained`, run with torch.

Imported only by the composition root when the local generator is configured, so the rest of
the core never pays for importing torch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from bot.errors import ConfigError
from bot.events import DecodingSettings

log = logging.getLogger(__name__)


HUB_PROBE_TIMEOUT = 3.0
_probes: dict[str, tuple[float, str | None]] = {}


def model_error(model_id: str, exc: BaseException) -> ConfigError:
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    where = "HF_HUB_OFFLINE=1: local cache only" if offline else "local directory or hub id"
    return ConfigError(
        f"DIALOGBOT_MODEL={model_id!r} could not be loaded ({where}: {reason}). Set it to a "
        "local directory holding config.json, the weights and vocab.json + merges.txt (or "
        "tokenizer.json), or to a hub id such as microsoft/DialoGPT-medium with network access.")


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None when the Hugging Face hub answers one request within `timeout` seconds (through
    huggingface_hub's own HTTP client, so proxies apply); else why not, in a few words.

    `from_pretrained` retries a hub that cannot be reached for about a minute per file
    (huggingface_hub's backoff when nothing is cached); this one request decides first."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    now = time.monotonic()
    cached = _probes.get(endpoint)
    if cached is not None and now - cached[0] < 60:
        return cached[1]
    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
        reason = None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        text = " ".join(str(exc).split()) or type(exc).__name__
        reason = f"{endpoint} cannot be reached: {text[:80]}"
    _probes[endpoint] = (now, reason)
    return reason


def is_repo_id(source: str) -> bool:
    """True for what could be a hub id ("name" or "org/name"), not a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def pretrained_options(source: str, setting: str) -> dict:
    """Keywords for `from_pretrained(source)`: {} normally; local_files_only when the hub
    cannot be reached but the files are cached. Raises ConfigError (one line, naming
    `setting`) at once when it can be neither downloaded nor found."""
    if Path(source).exists():
        return {}
    if not is_repo_id(source):
        raise ConfigError(f"{setting}={source!r}: no such local directory, and not a hub id.")
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return {}
    reason = hub_unreachable()
    if reason is None:
        return {}
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        cached = False
    if cached:
        log.warning("%s=%s: the hub is not reachable, using the cached copy (%s)", setting,
                    source, reason)
        return {"local_files_only": True}
    raise ConfigError(f"{setting}={source!r} is not a local directory and cannot be "
                      f"downloaded ({reason}; not in the local cache either).")


def load_tokenizer(model_id: str):
    """DialoGPT's (GPT-2's) tokenizer from a hub id or directory, checked to be usable."""
    from transformers import AutoTokenizer

    options = pretrained_options(model_id, "DIALOGBOT_MODEL")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **options)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise model_error(model_id, exc) from None
    if len(tokenizer) == 0 or tokenizer.eos_token_id is None:
        raise ConfigError(f"DIALOGBOT_MODEL={model_id!r}: the tokenizer is empty or "
                          "has no end-of-text token; check vocab.json and merges.txt")
    return tokenizer


class TransformersBackend:
    """GPT-2 / DialoGPT through `AutoModelForCausalLM`; greedy or sampled `generate`."""

    def __init__(self, model_id: str, *, device: str = "cpu", threads: int | None = None,
                 quantize: str = "none", pack_weights: bool = True):
        self.model_id = model_id
        self.device = device
        self.threads = threads
        self.quantize = quantize  # bot.quant.prepare_model: none | int8 | bf16 | fp16
        self.pack_weights = pack_weights  # fp32 on a CPU: oneDNN-packed linear weights
        self.model = None
        self.tokenizer = None
        self.eos_token_id = 50256
        self.n_positions = 1024

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if self.threads:
            torch.set_num_threads(self.threads)
        self.tokenizer = load_tokenizer(self.model_id)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_id, **pretrained_options(self.model_id, "DIALOGBOT_MODEL"))
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise model_error(self.model_id, exc) from None
        self.eos_token_id = self.tokenizer.eos_token_id
        self.n_positions = int(getattr(model.config, "n_positions", None)
                               or model.config.max_position_embeddings)
        from bot.quant import prepare_model

        self.model = prepare_model(model.to(self.device).eval(), self.quantize, self.device,
                                   pack=self.pack_weights)
        log.info("model %s loaded: %d layers, %d positions, device %s, quantize %s",
                 self.model_id, getattr(model.config, "n_layer", 0), self.n_positions,
                 self.device, self.quantize)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generation_kwargs(self, settings: DecodingSettings) -> dict:
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                      pad_token_id=self.eos_token_id, eos_token_id=self.eos_token_id,
                      repetition_penalty=settings.repetition_penalty,
                      no_repeat_ngram_size=settings.no_repeat_ngram_size)
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_k=settings.top_k,
                          top_p=settings.top_p)
        return kwargs

    def generate(self, prompt: list[int], settings: DecodingSettings,
                 cancel: threading.Event) -> list[int]:
        return self.generate_candidates(prompt, settings, cancel, 1)[0]

    def generate_candidates(self, prompt: list[int], settings: DecodingSettings,
                            cancel: threading.Event, n: int) -> list[list[int]]:
        """`n` replies to one prompt from ONE `generate` call (`num_return_sequences=n`;
        n > 1 needs sampling), each cut at its first end-of-text token."""
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        kwargs = self.generation_kwargs(settings)
        if n > 1:
            kwargs["num_return_sequences"] = n
        with torch.inference_mode():
            input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids),
                generation_config=GenerationConfig(**kwargs),
                stopping_criteria=StoppingCriteriaList([_Cancelled()]))
        replies = []
        for row in out[:, len(prompt):].tolist():
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            replies.append(row)
        return replies
