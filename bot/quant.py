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
  MLP, the LM head) as int8 and quantizes activations on the fly. Activations are scaled per
  batch, so a reply can differ slightly from fp32 (and a batched row from a solo run):
  token-exact parity is an fp32 property; int8 replies are checked for well-formedness only.
- `bf16`: `model.to(torch.bfloat16)` on a CPU with native bf16 (AVX512-BF16 / AMX) or on CUDA.
- `fp16`: CUDA only.
- Every precision: GPT-2's activation runs in place (`gelu_in_place`): the same operations in
  the same order as transformers' `NewGELUActivation` (bit-identical), without five of its
  seven full-size temporaries.

Memory: `from_pretrained` leaves every weight a view of the memory-mapped checkpoint.
Each layer is converted on its own and the checkpoint pages of the original are dropped
right after (`bot.memory.drop_file_pages`), so the process holds one copy of the weights
(the converted one) while loading and after; weights that need no conversion (embeddings,
layer norms, and every weight with packing off) stay mapped, resident only where read.

Anything that cannot run where it was asked raises `ConfigError` naming DIALOGBOT_QUANTIZE.
"""

from __future__ import annotations

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


def _packed_linear_class():
    import torch
    from torch import nn

    class PackedLinear(nn.Module):
        """`y = x @ W.T + b` with W reordered once for oneDNN (fp32, CPU)."""

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
            self.register_buffer("packed_weight", packed, persistent=False)
            self.register_buffer("bias", None if bias is None else bias.detach().clone(),
                                 persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, self.in_features).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias,
                                                     "none", [], "")
            return out.view(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}"

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
                log.info("fp32 weights packed for oneDNN: %d linear layers",
                         pack_linear_weights(model))
            else:
                log.warning("DIALOGBOT_PACK_WEIGHTS: this torch has no oneDNN linear ops; "
                            "using torch's default matmul")
        return model
    if quantize == "int8":
        log.info("dynamic int8 quantization: %d linear layers", quantize_int8(model))
        return model
    dtype = torch.bfloat16 if quantize == "bf16" else torch.float16
    log.info("model weights cast to %s", dtype)
    cast_parameters(model, dtype)
    return model
