"""Model preparation for the precision chosen with DIALOGBOT_QUANTIZE.

`prepare_model(model, quantize, device)` runs once, in the generator's worker, right after the
model is loaded and moved to its device:

- `none`: fp32. On a CPU (and `pack=True`, DIALOGBOT_PACK_WEIGHTS), every linear layer's
  weight (GPT-2's `Conv1D`s and the LM head) is reordered once into oneDNN's blocked layout
  and run with oneDNN's matmul (`PackedLinear`, the kernel `torch.compile` uses for frozen
  CPU linears): the same fp32 math, rounded differently in the last bits (logits within
  1e-4); decoding a few rows at once is ~1.7x faster than torch's default matmul on
  2 AVX2 cores, one row ~1.15x. Greedy replies match the model card's loop in the tests.
- `int8`: CPU only. GPT-2's `Conv1D` layers (a linear layer with its weight stored transposed)
  become `nn.Linear`, then torch's dynamic quantization stores every linear weight (attention,
  MLP, the LM head) as int8 and quantizes activations on the fly; the token embedding is
  stored as int8 rows with a scale each (`int8_token_embedding`). Activations are scaled per
  batch, so a reply can differ slightly from fp32 (and a batched row from a solo run):
  token-exact parity is an fp32 property; int8 replies are checked for well-formedness only.
- `bf16`: `model.to(torch.bfloat16)` on a CPU with native bf16 (AVX512-BF16 / AMX) or on CUDA.
- `fp16`: CUDA only.
- Every precision: GPT-2's activation runs in place (`gelu_in_place`): the same operations in
  the same order as transformers' `NewGELUActivation` (bit-identical), without five of its
  seven full-size temporaries. With packed fp32 weights it then moves into the MLP's first
  linear layer (`fuse_gelu`: oneDNN's gelu-tanh post-op, within 1e-5 of `gelu_new`, checked
  at load), so the activation costs no pass of its own.

Memory: `from_pretrained` leaves every weight a view of the memory-mapped checkpoint.
Each layer is converted on its own and the checkpoint pages of the original are dropped
right after (`bot.memory.drop_file_pages`), so the process holds one copy of the weights
(the converted one) while loading and after; weights that need no conversion (embeddings,
layer norms, and every weight with packing off) stay mapped, resident only where read.

Anything that cannot run where it was asked raises `ConfigError` naming DIALOGBOT_QUANTIZE.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

from bot.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZE_OPTIONS = ("none", "int8", "bf16", "fp16")


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (oneDNN reports AVX512-BF16 or AMX).

    A bf16 matmul "works" on any CPU, emulated and slower than fp32, so trying one proves
    nothing: oneDNN's own check is used, with torch's CPU capability as a fallback."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def check_quantize(quantize: str, device: str) -> None:
    """Raise ConfigError when `quantize` cannot run on `device` (cheap: no model needed)."""
    if quantize not in QUANTIZE_OPTIONS:
        raise ConfigError(f"DIALOGBOT_QUANTIZE={quantize!r}: use one of "
                          f"{', '.join(QUANTIZE_OPTIONS)}")
    if quantize == "int8" and is_cuda(device):
        raise ConfigError("DIALOGBOT_QUANTIZE=int8 is torch dynamic quantization, CPU only; "
                          f"DIALOGBOT_DEVICE={device!r}: use fp16 on a GPU")
    if quantize == "fp16" and not is_cuda(device):
        raise ConfigError("DIALOGBOT_QUANTIZE=fp16 needs a CUDA device "
                          f"(DIALOGBOT_DEVICE={device!r}); on a CPU use int8 or bf16")
    if quantize == "bf16" and not is_cuda(device) and not cpu_supports_bf16():
        raise ConfigError("DIALOGBOT_QUANTIZE=bf16: this CPU has no native bf16 "
                          "(AVX512-BF16/AMX), where it is slower than fp32; use int8 or none")


def conv1d_to_linear(model: Any) -> int:
    """Replace every transformers `Conv1D` in `model` by an equivalent `nn.Linear`, in place.

    Conv1D computes x @ W + b with W of shape (in, out); nn.Linear stores (out, in), so the
    weight is transposed. Returns how many layers were replaced."""
    from transformers.pytorch_utils import Conv1D

    return _replace_layers(model, lambda child: isinstance(child, Conv1D), _as_linear)


def _as_linear(child: Any) -> Any:
    import torch
    from torch import nn

    linear = nn.Linear(child.nx, child.nf, bias=True, device=child.weight.device,
                       dtype=child.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(child.weight.t())
        linear.bias.copy_(child.bias)
    return linear


def _replace_layers(model: Any, wanted, convert) -> int:
    """Replace each child layer for which `wanted(child)` holds by `convert(child)`, one at a
    time, dropping the old weight's checkpoint pages as soon as it is converted: loading and
    converting never holds more than one layer twice (see `bot.memory`)."""
    import torch

    from bot.memory import FileMappings, drop_file_pages, release_freed_memory

    mappings = FileMappings()
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children() if wanted(child)]
    with torch.no_grad():
        for parent, name in places:
            child = getattr(parent, name)
            setattr(parent, name, convert(child))
            for tensor in (child.weight, getattr(child, "bias", None)):
                drop_file_pages(tensor, mappings)
            del child
            release_freed_memory()  # the conversion's temporaries, before the next layer
    return len(places)


def cast_parameters(model: Any, dtype: Any) -> None:
    """`model.to(dtype)` one tensor at a time, dropping each original's checkpoint pages."""
    from bot.memory import FileMappings, drop_file_pages

    mappings = FileMappings()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            old = tensor.data
            tensor.data = old.to(dtype)
            drop_file_pages(old, mappings)
            del old


@functools.cache  # one class per process: isinstance works across calls
def _packed_linear_class():
    import torch
    from torch import nn

    class PackedLinear(nn.Module):
        """`y = x @ W.T + b` with W reordered once for oneDNN (fp32, CPU); with
        `gelu=True`, GPT-2's activation applied to y inside the same oneDNN call
        (`fuse_gelu`)."""

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
            self.register_buffer("packed_weight", packed, persistent=False)
            self.register_buffer("bias", None if bias is None else bias.detach().clone(),
                                 persistent=False)
            self.gelu = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, self.in_features).contiguous()
            attr, algorithm = ("gelu", "tanh") if self.gelu else ("none", "")
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias,
                                                     attr, [], algorithm)
            return out.view(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}"
                    + (", gelu" if self.gelu else ""))

    return PackedLinear


def can_pack() -> bool:
    """True when this torch has oneDNN and its prepacked linear ops."""
    import torch

    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linear_weights(model: Any) -> int:
    """Replace every `Conv1D` and fp32 `nn.Linear` of `model` (on the CPU) by a
    `PackedLinear`, in place, one layer at a time. Returns how many layers were replaced."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    packed_linear = _packed_linear_class()

    def wanted(child: Any) -> bool:
        return (isinstance(child, (Conv1D, nn.Linear)) and child.weight.dtype == torch.float32
                and child.weight.device.type == "cpu")

    def convert(child: Any) -> Any:
        if isinstance(child, Conv1D):  # Conv1D keeps its weight as (in, out)
            return packed_linear(child.weight.t(), child.bias)
        return packed_linear(child.weight, child.bias)

    return _replace_layers(model, wanted, convert)


def fuse_gelu(model: Any) -> int:
    """Run GPT-2's activation inside each MLP's first linear layer where that layer is a
    `PackedLinear`: oneDNN applies its gelu-tanh post-op to each block of the product while
    it is still in the CPU's cache, so the [tokens, 4 x hidden] output is written once and
    never read back for a separate activation pass; `mlp.act` becomes `nn.Identity`.
    The same function as transformers' `gelu_new`, but computed with oneDNN's own tanh, so
    not bit-identical: checked on this machine before fusing (`_fused_gelu_agrees`), and
    not fused where it differs by more than 1e-5. Returns how many MLPs were fused."""
    from torch import nn
    from transformers.activations import NewGELUActivation

    mlps = [m for m in model.modules()
            if isinstance(getattr(m, "c_fc", None), _packed_linear_class())
            and isinstance(getattr(m, "act", None), (NewGELUActivation, _gelu_class()))]
    if not mlps or not _fused_gelu_agrees(mlps[0].c_fc):
        return 0
    for mlp in mlps:
        mlp.c_fc.gelu = True
        mlp.act = nn.Identity()
    return len(mlps)


def _fused_gelu_agrees(linear: Any) -> bool:
    """oneDNN's fused activation against transformers' `gelu_new` on `linear`'s output for
    inputs of a layer-normed scale: within 1e-5 (absolute) or 1e-4 (relative)."""
    import torch
    from transformers.activations import NewGELUActivation

    x = torch.randn(64, linear.in_features, generator=torch.Generator().manual_seed(0)) * 3
    with torch.inference_mode():
        want = NewGELUActivation()(linear(x))
        linear.gelu = True
        try:
            got = linear(x)
        except RuntimeError as e:  # a oneDNN build without the post-op
            log.warning("GPT-2's activation not fused into the linear layer: %s", e)
            return False
        finally:
            linear.gelu = False
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
        log.warning("GPT-2's activation not fused into the linear layer: oneDNN's differs "
                    "from gelu_new by %.1e", (got - want).abs().max().item())
        return False
    return True


def quantize_int8(model: Any) -> int:
    """Every `Conv1D` and `nn.Linear` of `model` as torch's dynamically quantized int8
    `Linear` (per-tensor weight scale, as `torch.ao.quantization.quantize_dynamic`), one layer
    at a time: the fp32 weights are never all converted at once."""
    from torch import nn
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import default_dynamic_qconfig
    from transformers.pytorch_utils import Conv1D

    def convert(child: Any) -> Any:
        linear = _as_linear(child) if isinstance(child, Conv1D) else child
        linear.qconfig = default_dynamic_qconfig
        return DynamicLinear.from_float(linear)

    with warnings.catch_warnings():  # torch 2.10+ flags the qint8 tensor API as deprecated
        warnings.simplefilter("ignore", UserWarning)
        return _replace_layers(model, lambda c: isinstance(c, (Conv1D, nn.Linear)), convert)


@functools.cache
def _int8_embedding_class():
    import torch
    from torch import nn

    class Int8Embedding(nn.Module):
        """A token embedding stored as int8 with one fp32 scale per row (symmetric: a row's
        largest magnitude maps to 127); a lookup returns the rows dequantized to fp32."""

        def __init__(self, weight: torch.Tensor, mappings=None):
            """Converted 1,024 rows at a time; with `mappings` (`bot.memory.FileMappings`)
            each block's checkpoint pages are dropped once converted."""
            from bot.memory import drop_file_pages

            super().__init__()
            self.num_embeddings, self.embedding_dim = weight.shape
            rows = torch.empty(weight.shape, dtype=torch.int8)
            scale = torch.empty(weight.shape[0], dtype=torch.float32)
            for begin in range(0, weight.shape[0], 1024):
                block = weight.detach()[begin:begin + 1024]
                s = block.abs().amax(dim=1).float().clamp_(min=1e-12).div_(127.0)
                scale[begin:begin + 1024] = s
                rows[begin:begin + 1024] = torch.round(block / s[:, None]).to(torch.int8)
                drop_file_pages(block, mappings)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("scale", scale, persistent=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.rows[ids].float().mul_(self.scale[ids].unsqueeze(-1))

        def extra_repr(self) -> str:
            return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

    return Int8Embedding


def int8_token_embedding(model: Any) -> bool:
    """Replace GPT-2's token embedding (`transformer.wte`, fp32; the released DialoGPT ties
    it to the LM head, which `quantize_int8` has already copied to int8) by an
    `Int8Embedding`, and drop the fp32 original's checkpoint pages. A lookup reads one
    row; over a bot's life nearly every row is read once, so the mapped fp32 matrix became
    resident bit by bit (DialoGPT-medium: 206 MB, a fifth of the int8 model); int8 rows
    take a quarter of it. False (nothing changed) when the model has no such embedding."""
    from torch import nn

    from bot.memory import FileMappings

    wte = getattr(getattr(model, "transformer", None), "wte", None)
    if type(wte) is not nn.Embedding:
        return False
    model.transformer.wte = _int8_embedding_class()(wte.weight, FileMappings())
    return True  # the conversion's temporaries go back when `prepare_model` returns


def activation_dtype(model: Any) -> Any:
    """The dtype `model` computes in: what its token embedding returns (an int8 model's
    embedding returns fp32 rows)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model.get_input_embeddings()(torch.zeros((1, 1), dtype=torch.long,
                                                        device=device)).dtype


@functools.cache
def _gelu_class():
    import math

    import torch
    from torch import nn

    scale = math.sqrt(2.0 / math.pi)

    class InPlaceGELU(nn.Module):
        """GPT-2's `gelu_new` (transformers' `NewGELUActivation`), the same operations in the
        same order, so bit-identical, but evaluated in two buffers instead of seven. Alone, a
        [512, 4096] activation (one layer of a 512-token DialoGPT-medium prefill) took 14.2 ms
        as written and 2.9 ms so; inside a whole prefill the gain measured 0-5%
        (`bench/bench_ab.py gelu`). Falls back to the written form when autograd records
        (training)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.requires_grad and torch.is_grad_enabled():
                return 0.5 * x * (1.0 + torch.tanh(scale * (x + 0.044715 * torch.pow(x, 3.0))))
            t = torch.pow(x, 3.0)
            t.mul_(0.044715).add_(x).mul_(scale).tanh_().add_(1.0)
            return torch.mul(x, 0.5).mul_(t)

    return InPlaceGELU


def gelu_in_place(model: Any) -> int:
    """Replace every `NewGELUActivation` of `model` by `InPlaceGELU` (bit-identical); how
    many were replaced."""
    from transformers.activations import NewGELUActivation

    cls = _gelu_class()
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children()
              if type(child) is NewGELUActivation]
    for parent, name in places:
        setattr(parent, name, cls())
    return len(places)


def prepare_model(model: Any, quantize: str, device: str, pack: bool = True) -> Any:
    """Return the model ready to serve at the requested precision (see the module doc)."""
    from bot.memory import release_freed_memory

    try:
        gelu_in_place(model)
        return _prepare(model, quantize, device, pack).eval()
    finally:
        release_freed_memory()


def _prepare(model: Any, quantize: str, device: str, pack: bool) -> Any:
    import torch

    check_quantize(quantize, device)
    if quantize == "none":
        if pack and not is_cuda(device):
            if can_pack():
                log.info("fp32 weights packed for oneDNN: %d linear layers, GPT-2's activation "
                         "fused into %d of them", pack_linear_weights(model), fuse_gelu(model))
            else:
                log.warning("DIALOGBOT_PACK_WEIGHTS: this torch has no oneDNN linear ops; "
                            "using torch's default matmul")
        return model
    if quantize == "int8":
        log.info("dynamic int8 quantization: %d linear layers, int8 token embedding: %s",
                 quantize_int8(model), int8_token_embedding(model))
        return model
    dtype = torch.bfloat16 if quantize == "bf16" else torch.float16
    log.info("model weights cast to %s", dtype)
    cast_parameters(model, dtype)
    return model
