"""The decode-attention kernel over float16 row buffers (bot/csrc/decode_attention.cpp),
against torch's attention on the same keys/values widened to fp32."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bot import decode_kernel

pytestmark = pytest.mark.skipif(not decode_kernel.cpu_supported(),
                                reason="the decode kernel needs AVX2")


@pytest.fixture(scope="module")
def kernel():
    module = decode_kernel.load()
    assert module is not None, "the kernel did not build on an AVX2 CPU (see the log)"
    return module


def rows_of(count: int, layers: int, heads: int, capacity: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((layers, 2, heads, capacity, dim), generator=gen).half()
            for _ in range(count)]


@pytest.mark.parametrize("heads, dim", [(16, 64), (2, 32), (3, 8), (12, 72)])
def test_each_row_gets_its_new_token_stored_and_attends_like_torch(kernel, heads, dim):
    """Rows of every awkward length (the first position, around a multiple of 8, the last
    position of the buffer) in one call: each row's new key/value lands at its position of
    that layer (rounded to float16) and nowhere else, and the output equals torch's
    attention over the row's float16 history widened to fp32 (within 1e-5)."""
    capacity, layers, layer = 64, 3, 1
    starts = [0, 1, 7, 8, 9, 15, 16, 33, capacity - 1]
    bufs = rows_of(len(starts), layers, heads, capacity, dim)
    before = [b.clone() for b in bufs]
    query = torch.randn((len(starts), heads, dim))
    new = torch.randn((2, len(starts), heads, dim))
    scale = dim ** -0.5
    out = kernel.decode_attention(query, new, bufs, layer, starts, scale)
    assert out.shape == (len(starts), heads, dim) and out.dtype == torch.float32
    for r, start in enumerate(starts):
        expected = before[r].clone()
        expected[layer, :, :, start] = new[:, r].half()
        assert torch.equal(bufs[r], expected)  # one slot of one layer written
        kv = expected[layer, :, :, :start + 1].float()
        ref = torch.nn.functional.scaled_dot_product_attention(
            query[r].unsqueeze(0).unsqueeze(2), kv[0:1], kv[1:2], scale=scale)[0, :, 0]
        assert torch.allclose(out[r], ref, atol=1e-5, rtol=1e-5), (start, (out[r] - ref).abs().max())


def test_a_long_history_with_peaked_scores_stays_exact(kernel):
    """1,024 positions, scores spread over +-80 (softmax's exp near its range): no overflow,
    no NaN, the same output as torch."""
    heads, dim, capacity = 2, 64, 1024
    (buf,) = rows_of(1, 1, heads, capacity, dim, seed=3)
    query = torch.randn((1, heads, dim)) * 12
    new = torch.randn((2, 1, heads, dim))
    out = kernel.decode_attention(query, new, [buf], 0, [capacity - 1], 1.0)
    kv = buf[0].float()
    ref = torch.nn.functional.scaled_dot_product_attention(query.unsqueeze(2), kv[0:1],
                                                           kv[1:2], scale=1.0)[0, :, 0]
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["fp32 buffer", "a start past the buffer", "starts missing",
                                  "odd head_dim", "layer out of range"])
def test_wrong_input_is_refused_with_a_message(kernel, case):
    bufs = rows_of(2, 2, 2, 16, 16)
    query, new, starts, layer = torch.randn((2, 2, 16)), torch.randn((2, 2, 2, 16)), [3, 4], 0
    if case == "fp32 buffer":
        bufs[1] = bufs[1].float()
    elif case == "a start past the buffer":
        starts = [3, 16]
    elif case == "starts missing":
        starts = [3]
    elif case == "odd head_dim":
        bufs = rows_of(2, 2, 2, 16, 12)
        query, new = torch.randn((2, 2, 12)), torch.randn((2, 2, 2, 12))
    else:
        layer = 2
    with pytest.raises(RuntimeError, match="buffer|start|head_dim"):
        kernel.decode_attention(query, new, bufs, layer, starts, 0.25)


def test_the_kernel_lets_other_python_threads_run(kernel):
    """The decode worker calls it from its own thread: the event loop's thread keeps running
    during a long call (the GIL is released), ticking far more often than the call lasts."""
    rows, heads, dim, capacity = 96, 16, 64, 1024
    bufs = rows_of(rows, 1, heads, capacity, dim)
    query, new = torch.randn((rows, heads, dim)), torch.randn((2, rows, heads, dim))
    spans: list[float] = []

    def call():
        for _ in range(3):
            start = time.perf_counter()
            kernel.decode_attention(query, new, bufs, 0, [capacity - 1] * rows, 0.125)
            spans.append(time.perf_counter() - start)

    worker = threading.Thread(target=call)
    ticks = [time.perf_counter()]
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert min(spans) > 0.008  # long enough to tell
    assert max(gaps) < min(spans) / 2, (max(gaps), spans)


def test_the_choice_times_the_kernel_against_torchs_ways_for_real(kernel):
    """The measurement behind `bot.kvcache.decode_kernel_for` runs the kernel and torch's two
    ways on this CPU: positive durations."""
    from bot import kvcache

    ours, torch_way = kvcache.time_decode_kernel(kernel, 4, 16, lengths=(32, 64), reps=3)
    assert ours > 0 and torch_way > 0
