"""Remote generation: DialoGPT served by any OpenAI-compatible completions endpoint (vLLM,
TGI, llama.cpp's server), reached with the official `openai` client.

`RemoteBackend` is a `bot.generator.Backend`, so it runs inside the one generator worker
thread like the local backends: the prompt is built by the bot's own tokenizer and prompt
builder (`AutoTokenizer.from_pretrained(model)`, no weights are loaded) and sent as token ids;
the channel's decoding settings go with it; end-of-text is the stop token. The worker's rules
apply unchanged (empty or repeated replies retried, fallback line, rankers, word filter).

Contract: `generate` blocks its (worker) thread for at most about `timeout` x (retries + 1)
seconds; the client retries connection errors, 408/409/429 and 5xx with exponential backoff
(`max_retries`). Any failure raises `GenerationError` (the user gets the short apology).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from bot.errors import GenerationError
from bot.events import DecodingSettings
from bot.hf import load_tokenizer

log = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"


class RemoteBackend:
    """Completions over HTTP; only the tokenizer is local (see module docstring)."""

    def __init__(self, tokenizer_id: str, url: str, *, model: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0, retries: int = 2):
        self.tokenizer_id = tokenizer_id
        self.url = url.rstrip("/")
        self.model = model or tokenizer_id
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.tokenizer = None
        self.client = None
        self.eos_token_id = 50256
        self.n_positions = 1024

    def load(self) -> None:
        import openai

        self.tokenizer = load_tokenizer(self.tokenizer_id)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_id = self.tokenizer.eos_token_id
        limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        if 0 < limit <= 65536:  # "unlimited" tokenizers report a huge sentinel
            self.n_positions = limit
        self.client = openai.OpenAI(base_url=self.url, api_key=self.api_key or "none",
                                    timeout=self.timeout, max_retries=self.retries)
        log.info("remote generator %s (model %s), tokenizer %s, %d positions",
                 self.url, self.model, self.tokenizer_id, self.n_positions)

    def ping(self) -> bool:
        """The server answers its model list (readiness; any thread, blocking up to 2 s)."""
        if self.client is None:
            return False
        self.client.with_options(timeout=2.0, max_retries=0).models.list()
        return True

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def request(self, prompt: list[int], settings: DecodingSettings, n: int) -> dict[str, Any]:
        """The completions parameters for one call. Greedy = temperature 0. top_k,
        repetition_penalty and no_repeat_ngram_size travel in the body as vLLM's extra
        sampling parameters (servers that do not know one ignore it)."""
        extra: dict[str, Any] = {"stop_token_ids": [self.eos_token_id],
                                 "skip_special_tokens": True, "return_token_ids": True}
        if settings.repetition_penalty != 1.0:
            extra["repetition_penalty"] = settings.repetition_penalty
        if settings.no_repeat_ngram_size:
            extra["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
        if settings.do_sample and settings.top_k > 0:
            extra["top_k"] = settings.top_k
        return dict(model=self.model, prompt=[prompt], max_tokens=settings.max_new_tokens,
                    temperature=settings.temperature if settings.do_sample else 0.0,
                    top_p=settings.top_p if settings.do_sample else 1.0,
                    stop=[EOS_TEXT], n=n, extra_body=extra)

    def generate(self, prompt: list[int], settings: DecodingSettings,
                 cancel: threading.Event) -> list[int]:
        return self.generate_candidates(prompt, settings, cancel, 1)[0]

    def generate_candidates(self, prompt: list[int], settings: DecodingSettings,
                            cancel: threading.Event, n: int) -> list[list[int]]:
        """`n` replies from one call, as token ids: the generated ids when the server returns
        them (vLLM's `return_token_ids`), else the returned text re-encoded."""
        import openai

        try:
            response = self.client.completions.create(**self.request(prompt, settings, n))
        except openai.APITimeoutError:
            raise GenerationError(f"generator server timed out after {self.timeout:g}s"
                                  ) from None
        except openai.APIStatusError as exc:
            raise GenerationError(f"generator server answered {exc.status_code}") from None
        except openai.APIError as exc:
            raise GenerationError(f"generator server failed: {type(exc).__name__}") from None
        choices = sorted(response.choices, key=lambda c: c.index)
        if not choices:
            raise GenerationError("generator server returned no choices")
        return [self._ids(choice) for choice in choices]

    def _ids(self, choice: Any) -> list[int]:
        ids = (choice.model_extra or {}).get("token_ids")
        if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
            return ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
        return self.encode(choice.text.split(EOS_TEXT)[0])
