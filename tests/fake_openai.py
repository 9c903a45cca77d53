"""A small OpenAI-compatible completions server for tests: aiohttp on 127.0.0.1, port 0,
wrapping a DialoGPT-shaped model with greedy `generate` (what vLLM does at temperature 0).

POST /v1/completions takes `model` (`name`, or a name of `more_models`: several fine-tunes
served by name as vLLM's --served-model-name does), `prompt` as token ids (one list, or a list holding one list),
`max_tokens`, `temperature` (must be 0: greedy only), `n` and the extra sampling fields
`repetition_penalty` / `no_repeat_ngram_size` / `return_token_ids` (vLLM's: the choice
then carries the generated `token_ids`); it stops at end-of-text and answers the way
the OpenAI API does. GET /v1/models lists the models.

Test controls: `fail_next(count, status)` answers the next calls with an error status,
`delay` holds every answer that many seconds, `gate` (an asyncio.Event, if set) holds answers
until it is set; `requests` records each call (body, start, end).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

EOS = 50256


@dataclass
class Served:
    body: dict[str, Any]
    start: float = field(default_factory=time.monotonic)
    end: float | None = None
    status: int = 200


class FakeOpenAI:
    def __init__(self, model_dir: Path | str, name: str = "dialogpt-test",
                 api_key: str | None = None, more_models: dict[str, Path | str] | None = None):
        self.model_dir = str(model_dir)
        self.name = name
        self.model_dirs = {name: str(model_dir),
                           **{k: str(v) for k, v in (more_models or {}).items()}}
        self.api_key = api_key
        self.requests: list[Served] = []
        self.delay = 0.0
        self.gate: asyncio.Event | None = None
        self._fail: list[int] = []
        self._loaded: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fake-openai")
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "FakeOpenAI":
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def fail_next(self, count: int = 1, status: int = 500) -> None:
        self._fail.extend([status] * count)

    # --- model --------------------------------------------------------------------------------
    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self._loaded = {name: AutoModelForCausalLM.from_pretrained(folder).eval()
                        for name, folder in self.model_dirs.items()}

    def _greedy(self, prompt: list[int], body: dict[str, Any]) -> list[int]:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([prompt], dtype=torch.long)
            out = self._loaded[body["model"]].generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=int(body.get("max_tokens") or 16), pad_token_id=EOS,
                eos_token_id=EOS, repetition_penalty=float(body.get("repetition_penalty", 1.0)),
                no_repeat_ngram_size=int(body.get("no_repeat_ngram_size", 0)))
        row = out[0, len(prompt):].tolist()
        return row[: row.index(EOS)] if EOS in row else row

    # --- API ----------------------------------------------------------------------------------
    def _authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == (
            f"Bearer {self.api_key}")

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "invalid api key")
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "test"}
            for name in self.model_dirs]})

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        served = Served(body)
        self.requests.append(served)
        try:
            return await self._answer(request, body, served)
        finally:
            served.end = time.monotonic()

    async def _answer(self, request: web.Request, body: dict[str, Any],
                      served: Served) -> web.Response:
        if not self._authorised(request):
            served.status = 401
            return _error(401, "invalid api key")
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._fail:
            served.status = self._fail.pop(0)
            return _error(served.status, "internal error")
        if body.get("model") not in self.model_dirs:
            served.status = 404
            return _error(404, f"model {body.get('model')!r} does not exist")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            served.status = 400
            return _error(400, "this server takes prompts as token ids")
        if float(body.get("temperature", 1.0)) != 0.0:
            served.status = 400
            return _error(400, "this test server is greedy only (temperature 0)")
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._pool, self._greedy, prompt, body)
        text = _decode(self.model_dirs[body["model"]], ids)
        n = int(body.get("n") or 1)
        return web.json_response({
            "id": f"cmpl-{len(self.requests)}", "object": "text_completion",
            "created": int(time.time()), "model": body["model"],
            "choices": [{"index": i, "text": text, "logprobs": None,
                         **({"token_ids": ids} if body.get("return_token_ids") else {}),
                         "finish_reason": "stop" if len(ids) < int(body.get("max_tokens") or 16)
                         else "length"} for i in range(n)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                      "total_tokens": len(prompt) + len(ids)}})


_tokenizers: dict[str, Any] = {}


def _decode(model_dir: str, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    if model_dir not in _tokenizers:
        _tokenizers[model_dir] = AutoTokenizer.from_pretrained(model_dir)
    return _tokenizers[model_dir].decode(ids, skip_special_tokens=True)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "server_error",
                                        "code": status}}, status=status)
