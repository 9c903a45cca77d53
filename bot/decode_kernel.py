"""The decode-attention kernel for float16 keys/values on a CPU (`csrc/decode_attention.cpp`).

A decode step attends every row's one new token over its own history, for every layer. With
keys/values stored in float16, torch offers two ways, and on some CPUs both are slow: its
attention kernel on float16 buffers (3x slower than fp32 on an AMD EPYC with AVX2 only), or
widening each row's history to fp32 first (a copy of the history per row, layer and step).
This kernel reads the float16 buffers once, converting in registers, for all rows and heads
of a layer in one call split over torch's threads, and writes the rows' new keys/values
too: one row of DialoGPT-medium's shape over 800 tokens on that CPU, 16 rows x 24 layers,
56-98 ms against 137-162 ms widened and 660-910 ms on float16 as stored.

It is compiled on first use with torch's extension builder (a C++ compiler and ninja;
`make install` builds it ahead) into torch's extension cache, for CPUs with AVX2, FMA and
F16C. Where it cannot be built or loaded, `load()` returns None and logs why; the bot then
attends the torch way (`bot.kvcache`). Whether it is used is measured (`bot.kvcache`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_attention.cpp"
NAME = "dialogbot_decode_attention"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def cpu_supported() -> bool:
    """True on a CPU where torch runs AVX2 (or AVX-512) kernels: AVX2, FMA and F16C."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def load():
    """The compiled kernel module (its `decode_attention`), built if needed; None where this
    CPU lacks AVX2 or the build or load fails (logged once)."""
    if not cpu_supported():
        log.info("decode kernel: not for this CPU (no AVX2)")
        return None
    try:
        from torch.utils.cpp_extension import load as build

        module = build(name=NAME, sources=[str(SOURCE)], extra_cflags=FLAGS,
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, no headers: attend the torch way
        log.warning("decode kernel: not available, attending with torch (%s: %s)",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    log.info("decode kernel: loaded")
    return module


if __name__ == "__main__":  # `python -m bot.decode_kernel`: build it ahead (make install)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("decode kernel:", "ready" if load() is not None else "not available")
