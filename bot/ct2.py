"""The CTranslate2 backend: DialoGPT converted once to int8 and run by CTranslate2 on the CPU.

Chosen with DIALOGBOT_GENERATOR_BACKEND=ct2 (needs the optional extra: `pip install .[ct2]`).
`CT2Backend` is a `bot.generator.Backend`, so it runs inside the same `GenerationWorker` as
the transformers backend: same bounded queue, timeout, empty-reply retry and fallback line.

The model (hub id or local directory) is converted on first use with CTranslate2's
`TransformersConverter(...).convert(out, quantization="int8")` into
`$HF_HOME/dialogbot-ct2/<name>-int8` (next to the Hugging Face cache) and reused afterwards;
a local directory's folder name carries a hash of its path and weight files, so a changed
model is converted again. Tokens go in and out as the HF tokenizer's token strings.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import threading
import weakref
from pathlib import Path

from bot.errors import ConfigError
from bot.events import DecodingSettings
from bot.hf import load_tokenizer, model_error
from bot.quant import is_cuda

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dialogbot[ct2]' (or pip install 'ctranslate2>=4.5,<5')"
_WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json")


def ct2_available() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


def ct2_cache_root() -> Path:
    """`$HF_HOME/dialogbot-ct2` (HF_HOME read now, so a test or deployment may point it)."""
    home = os.environ.get("HF_HOME")
    if not home:
        from huggingface_hub import constants

        home = constants.HF_HOME
    return Path(home).expanduser() / "dialogbot-ct2"


def converted_dir(model_id: str, quantization: str = "int8",
                  root: Path | None = None) -> Path:
    """Where the converted model for `model_id` lives (whether or not it exists yet)."""
    root = root or ct2_cache_root()
    local = Path(model_id).expanduser()
    if local.is_dir():
        local = local.resolve()
        digest = hashlib.sha256(str(local).encode())
        for name in _WEIGHT_FILES:
            part = local / name
            if part.exists():
                stat = part.stat()
                digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        name = f"{local.name}-{digest.hexdigest()[:12]}"
    else:
        name = model_id.replace("/", "--")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return root / f"{safe}-{quantization}"


def is_converted(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def ensure_converted(model_id: str, quantization: str = "int8",
                     root: Path | None = None) -> tuple[Path, bool]:
    """(directory of the CTranslate2 model, whether it was converted now).

    Conversion writes to a temporary sibling and renames it into place, so an interrupted
    conversion or two processes converting at once never leave a half-written model."""
    import ctranslate2

    out = converted_dir(model_id, quantization, root)
    if is_converted(out):
        return out, False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    log.info("converting %s to CTranslate2 %s in %s (once)", model_id, quantization, out)
    try:
        converter = ctranslate2.converters.TransformersConverter(model_id)
        converter.convert(str(tmp), quantization=quantization, force=True)
    except Exception as exc:  # noqa: BLE001 - any loader/converter failure is a config problem
        shutil.rmtree(tmp, ignore_errors=True)
        raise model_error(model_id, exc) from None
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_converted(out):
            raise
    return out, True


def compute_type(quantize: str, device: str) -> str:
    """CTranslate2's compute type: int8 weights on the CPU, int8 + fp16 on CUDA."""
    if quantize not in ("none", "int8"):
        raise ConfigError(f"DIALOGBOT_QUANTIZE={quantize!r} with DIALOGBOT_GENERATOR_BACKEND=ct2:"
                          " the CTranslate2 backend always runs int8; use none or int8")
    return "int8_float16" if is_cuda(device) else "int8"


def sampling_options(settings: DecodingSettings) -> dict:
    """The DecodingSettings as `generate_batch` keywords (greedy = top-1 sampling)."""
    options = dict(max_length=settings.max_new_tokens,
                   repetition_penalty=settings.repetition_penalty,
                   no_repeat_ngram_size=settings.no_repeat_ngram_size)
    if settings.do_sample:
        options.update(sampling_topk=settings.top_k, sampling_topp=settings.top_p,
                       sampling_temperature=settings.temperature)
    else:
        options.update(sampling_topk=1, sampling_topp=1.0, sampling_temperature=1.0)
    return options


class CT2Backend:
    """A `Backend` over `ctranslate2.Generator`; every method runs in the worker thread."""

    def __init__(self, model_id: str, *, device: str = "cpu", threads: int | None = None,
                 quantize: str = "int8", cache_root: Path | None = None):
        if not ct2_available():
            raise ConfigError("DIALOGBOT_GENERATOR_BACKEND=ct2 needs CTranslate2, which is not "
                              f"installed: {INSTALL_HINT}")
        self.model_id = model_id
        self.device = device
        self.threads = threads
        self.compute_type = compute_type(quantize, device)
        self.cache_root = cache_root
        self.generator = None
        self.tokenizer = None
        self.path: Path | None = None
        self.converted = False  # True when load() had to convert the model
        self.eos_token_id = 50256
        self.n_positions = 1024

    def load(self) -> None:
        import ctranslate2
        from transformers import AutoConfig

        self.tokenizer = load_tokenizer(self.model_id)
        try:
            config = AutoConfig.from_pretrained(self.model_id)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise model_error(self.model_id, exc) from None
        self.eos_token_id = self.tokenizer.eos_token_id
        self.n_positions = int(getattr(config, "n_positions", None)
                               or config.max_position_embeddings)
        self.path, self.converted = ensure_converted(self.model_id, "int8", self.cache_root)
        device, _, index = self.device.partition(":")
        self.generator = ctranslate2.Generator(
            str(self.path), device=device, device_index=int(index or 0),
            compute_type=self.compute_type, inter_threads=1, intra_threads=self.threads or 0)
        _release_at_exit(self)
        log.info("CTranslate2 model %s loaded from %s (%s, device %s)", self.model_id,
                 self.path, self.compute_type, self.device)

    def close(self) -> None:
        """Unload the model (also done at interpreter exit, see `_release_at_exit`)."""
        self.generator = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt: list[int], settings: DecodingSettings,
                 cancel: threading.Event) -> list[int]:
        return self.generate_candidates(prompt, settings, cancel, 1)[0]

    def generate_candidates(self, prompt: list[int], settings: DecodingSettings,
                            cancel: threading.Event, n: int) -> list[list[int]]:
        """`n` replies to one prompt from ONE `generate_batch` call (the prompt repeated n
        times), each cut at its first end-of-text token; stops when `cancel` is set."""
        tokens = self.tokenizer.convert_ids_to_tokens(prompt)
        results = self.generator.generate_batch(
            [tokens] * n, include_prompt_in_result=False, end_token=[self.eos_token_id],
            callback=lambda step: cancel.is_set(), **sampling_options(settings))
        replies = []
        for result in results:
            row = list(result.sequences_ids[0])
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            replies.append(row)
        return replies


def _release_at_exit(backend: CT2Backend) -> None:
    """A `ctranslate2.Generator` that has run a Python step callback and is still alive when
    the interpreter finalizes aborts the process ("terminate called without an active
    exception", exit code 134; checked with ctranslate2 4.8). Dropping it from an atexit hook,
    which runs before finalization, exits cleanly. A weak reference keeps the hook from
    holding the model in memory."""
    ref = weakref.ref(backend)

    def release() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    atexit.register(release)
