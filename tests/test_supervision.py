"""Supervision of the batching generator's worker (the default generator), on the tiny model:
a fault injected into one request (joining the batch, ranking its candidates, its retry) fails
that request only, the other rows of the batch finish with the replies they would get alone,
and the next request is answered at once; a worker thread that dies is restarted with the
loaded model, failing only what it held, and /readyz says so while it is down."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
import torch

from bot.app import build_app
from bot.errors import GenerationError
from bot.events import DecodingSettings
from bot.rankers import FEEDBACK, Ensemble, RankerSpec
from tests.recording import RecordingAdapter, message
from tests.test_batching import EOS, GREEDY, batcher, hf, request, solo  # noqa: F401
from tests.test_metrics import get
from tests.test_rankers import make_ranker_dirs

SAMPLED = DecodingSettings(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           no_repeat_ngram_size=0, max_new_tokens=10, candidates=3)
TEXTS = ["hello there", "what is the meaning of life, the universe and everything?",
         "I like trains very much, do you?", "good morning to you", "the weather is lovely"]


class Injected(Exception):
    """The fault the tests inject."""


class WorkerDeath(BaseException):
    """Not an Exception: nothing in the worker's loop catches it, the thread ends."""


def fail_once(obj, name: str, when):
    """Make `obj.name(*args)` raise `Injected` the first time `when(*args)` holds."""
    real = getattr(obj, name)
    fired = []

    def patched(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(args)
            raise Injected(f"injected into {name}")
        return real(*args, **kwargs)

    setattr(obj, name, patched)
    return fired


async def others_finish_and_the_next_is_prompt(gen, hf, bad: asyncio.Task, texts: list[str],
                                               good: list[asyncio.Task]) -> None:
    with pytest.raises(GenerationError, match="injected"):
        await bad
    for text, task in zip(texts, good):
        assert list((await task).token_ids) == solo(hf, text), text
    assert gen.worker.alive and gen.ready
    started = time.perf_counter()
    got = await gen.reply(request(TEXTS[0], GREEDY, "next"))
    assert list(got.token_ids) == solo(hf, TEXTS[0])
    assert time.perf_counter() - started < 5


async def test_a_fault_while_one_row_joins_the_batch_fails_that_request_only(batcher, hf):
    gen = await batcher(max_wait_ms=100)
    fired = fail_once(gen.worker, "_join",
                      lambda row: row.job.request.channel_key == "console:bad")
    bad = asyncio.create_task(gen.reply(request(TEXTS[1], GREEDY, "bad")))
    good = [asyncio.create_task(gen.reply(request(t, GREEDY, str(i))))
            for i, t in enumerate(TEXTS[2:])]
    await others_finish_and_the_next_is_prompt(gen, hf, bad, TEXTS[2:], good)
    assert fired and gen.worker.stats.max_batch >= 3  # they did decode together


async def test_a_fault_in_ranking_fails_that_request_only(batcher, hf, tiny_model_dir,
                                                          tmp_path):
    (ranker,) = make_ranker_dirs(tmp_path, count=1)
    ensemble = Ensemble([RankerSpec("r0", str(ranker), FEEDBACK, 1.0)])
    gen = await batcher(rankers=ensemble, max_wait_ms=100)
    tok = hf[0]
    bad_prompt = tok.encode(TEXTS[1]) + [EOS]
    fired = fail_once(ensemble, "best", lambda prompt, candidates: list(prompt) == bad_prompt)
    torch.manual_seed(0)
    bad = asyncio.create_task(gen.reply(request(TEXTS[1], SAMPLED, "bad")))
    ranked = asyncio.create_task(gen.reply(request(TEXTS[0], SAMPLED, "ranked")))
    good = [asyncio.create_task(gen.reply(request(t, GREEDY, str(i))))
            for i, t in enumerate(TEXTS[2:])]
    await others_finish_and_the_next_is_prompt(gen, hf, bad, TEXTS[2:], good)
    assert fired
    other = await ranked  # ranked by the same ensemble in the same batch
    assert other.text and not other.fallback


async def test_a_fault_in_one_rows_retry_fails_that_request_only(batcher, hf):
    gen = await batcher(max_wait_ms=100)
    worker = gen.worker
    real_screen = worker.screen

    def screen(batch, earlier):  # every candidate of the "bad" request is dropped
        kept, blocked = real_screen(batch, earlier)
        return ([], blocked) if TEXTS[1] in earlier else (kept, blocked)

    worker.screen = screen
    fired = fail_once(worker, "_prefill", lambda groups: groups[0].retried)
    bad = asyncio.create_task(gen.reply(request(TEXTS[1], GREEDY, "bad")))
    good = [asyncio.create_task(gen.reply(request(t, GREEDY, str(i))))
            for i, t in enumerate(TEXTS[2:])]
    await others_finish_and_the_next_is_prompt(gen, hf, bad, TEXTS[2:], good)
    assert fired and fired[0][0][0].job.request.channel_key == "console:bad"


async def test_a_decode_step_that_fails_for_one_row_fails_only_that_row(batcher, hf):
    gen = await batcher(max_wait_ms=100)
    worker = gen.worker
    real = worker._choose

    def choose(rows, scores):  # decode steps with the "bad" row in them fail
        if any(r.job.request.channel_key == "console:bad" and r.generated for r in rows):
            raise Injected("injected into the step")
        return real(rows, scores)

    worker._choose = choose
    bad = asyncio.create_task(gen.reply(request(TEXTS[1], GREEDY, "bad")))
    good = [asyncio.create_task(gen.reply(request(t, GREEDY, str(i))))
            for i, t in enumerate(TEXTS[2:])]
    await others_finish_and_the_next_is_prompt(gen, hf, bad, TEXTS[2:], good)


async def test_a_dead_worker_is_restarted_and_readyz_follows(make_config, hf):
    config = make_config(batching=True, kv_dtype="float32", metrics_port=0,
                         metrics_host="127.0.0.1")
    platform = RecordingAdapter()
    app = build_app(config, [platform])
    gen = app.generator
    gen.watchdog = 3600  # only a request notices the dead thread in this test
    await app.start()
    ready = f"http://127.0.0.1:{app.ops.port}/readyz"
    try:
        assert (await get(ready))[0] == 200
        long = replace(GREEDY, max_new_tokens=400)
        held = asyncio.create_task(gen.reply(request("tell me a story " * 20, long, "held")))
        while gen.worker.stats.decode_steps < 3:
            await asyncio.sleep(0.005)
        real_take = gen.worker._take

        def die():
            gen.worker._take = real_take
            raise WorkerDeath()

        gen.worker._take = die
        for _ in range(200):
            if not gen.worker.alive:
                break
            await asyncio.sleep(0.01)
        assert not gen.worker.alive and not gen.ready
        status, body = await get(ready)
        assert status == 503 and json.loads(body)["checks"]["generator"] is False

        started = time.perf_counter()
        await app.pipeline.process(message("hello after the crash"))
        assert time.perf_counter() - started < 10
        assert platform.texts()[-1] and not platform.texts()[-1].startswith("Sorry")
        with pytest.raises(GenerationError, match="restarted"):
            await held  # it was in the dead thread: failed, not left hanging
        assert gen.ready and gen.worker.restarts == 1
        assert (await get(ready))[0] == 200
        got = await gen.reply(request(TEXTS[0], GREEDY, "after"))
        assert list(got.token_ids) == solo(hf, TEXTS[0])
    finally:
        await app.stop(drain_timeout=5)


async def test_the_watchdog_restarts_a_dead_worker_without_traffic(batcher, hf):
    gen = await batcher(watchdog=0.05)
    real_take = gen.worker._take

    def die():
        gen.worker._take = real_take
        raise WorkerDeath()

    gen.worker._take = die
    gen.worker.jobs.put(_wake())  # the idle worker returns from `_take`, then calls it again
    deadline = time.monotonic() + 10
    while gen.worker.restarts == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert gen.worker.restarts == 1
    while not gen.ready and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert gen.ready
    got = await gen.reply(request(TEXTS[2], GREEDY, "x"))
    assert list(got.token_ids) == solo(hf, TEXTS[2])


def _wake():
    """A job nobody waits for (already cancelled): the worker skips it."""
    from bot.generator import _Job

    loop = asyncio.get_running_loop()
    job = _Job(request("ignored"), loop.create_future(), loop)
    job.cancel.set()
    return job
