"""The benchmark's steady-state workloads (imported by bench/bench.py, run in its subprocesses).

- `warm_run`: N channels each in the middle of a conversation (400-900 tokens of history, a
  ~20-token new message, 40 new tokens), several turns each, all channels sending at once per
  round: aggregate tokens/s, p50/p95 latency, cache hit rate. "In the middle" is set up
  without running the model: each channel's previous prompt is put in the prefix cache with
  keys/values of the right shape (their values do not change the compute), as the previous
  turn would have left them; the budget then decides what stays.
- `bare_ceiling`: the model alone, the same rows and cache lengths, no sampling and no
  scheduling: a left-padded batch in a preallocated cache, decoded step by step with
  transformers' own attention. The bot's decode tokens/s are reported as a fraction of it.
- `turn_profile`: where a turn's time goes (prefill tokens and seconds, decode steps and
  seconds, cache hit), from the batching worker's counters.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

NEW_TOKENS = 40


def warm_histories(tokenizer, channels: int, seed: int):
    """Per channel: alternating turns (user text ~20 tokens, bot ids 40 tokens) totalling
    400-900 tokens, ending with the bot's turn, and the ~20-token message that comes next."""
    rng = random.Random(seed)
    out = []
    for _ in range(channels):
        total, turns, used = rng.randint(400, 900), [], 0
        while used < total:
            user = tokenizer.decode([rng.randrange(300, 40000) for _ in range(20)])
            bot = [rng.randrange(300, 40000) for _ in range(NEW_TOKENS)]
            turns += [(user, None), (tokenizer.decode(bot), bot)]
            used += 20 + NEW_TOKENS + 2
        out.append(turns)
    return out


def next_message(tokenizer, rng: random.Random) -> str:
    return tokenizer.decode([rng.randrange(300, 40000) for _ in range(20)])


def model_card_sample(tokenizer, seed: int, count: int) -> list[list[int]]:
    """The prompts of the warm workload's first turn for its first `count` channels, as the
    model card's loop builds them (every turn followed by end-of-text)."""
    rng = random.Random(seed + 1)
    prompts = []
    for turns in warm_histories(tokenizer, count, seed):
        turns = turns + [(next_message(tokenizer, rng), None)]
        ids: list[int] = []
        for text, token_ids in turns:
            ids += (list(token_ids) if token_ids is not None else tokenizer.encode(text)) + [
                50256]
        prompts.append(ids)
    return prompts


def seed_cache(generator, requests) -> None:
    """Put each request's prompt in the prefix cache with keys/values of the right shape, as
    the conversation's previous turn leaves them."""
    import torch

    worker = generator.worker
    for request in requests:
        prompt = worker.prompt_for(request, worker.prefix.ticket())
        row = worker.layout.new_row()
        row.buf[:, :, :, :len(prompt)].normal_()
        row.length = len(prompt)
        worker.prefix.put(request.channel_key, prompt, row, worker.prefix.ticket())
    torch.manual_seed(0)


async def warm_run(generator, tokenizer, settings, checker, *, channels: int, rounds: int,
                   seed: int) -> dict:
    """`rounds` turns per channel, every channel sending at once in each round."""
    from bot.events import GenerationRequest, Role, Turn

    histories = warm_histories(tokenizer, channels, seed)
    rng = random.Random(seed + 1)
    keys = [f"warm-{seed}-{channels}-{i}" for i in range(channels)]
    turns = [[Turn("bench", key, Role.BOT if ids is not None else Role.USER, text,
                   token_ids=tuple(ids) if ids is not None else None) for text, ids in h]
             for key, h in zip(keys, histories)]
    seed_cache(generator, [GenerationRequest(f"bench:{k}", tuple(t), settings)
                           for k, t in zip(keys, turns)])
    before = generator.cache_stats()
    stats = generator.worker.stats
    counters = (stats.prefill_tokens, stats.prefill_seconds, stats.reused_tokens,
                stats.decode_steps, stats.decode_seconds)
    latencies: list[float] = []
    prompt_tokens: list[int] = []
    wall = 0.0

    async def one(index: int) -> None:
        history = turns[index]
        history.append(Turn("bench", keys[index], Role.USER, next_message(tokenizer, rng)))
        t0 = time.perf_counter()
        got = await generator.reply(GenerationRequest(f"bench:{keys[index]}",
                                                      tuple(history[-64:]), settings))
        latencies.append(time.perf_counter() - t0)
        prompt_tokens.append(got.prompt_tokens)
        checker.check(got)
        history.append(Turn("bench", keys[index], Role.BOT, got.text, token_ids=got.token_ids))

    first_started = time.monotonic()
    for _ in range(rounds):
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(channels)))
        wall += time.perf_counter() - started
    after = generator.cache_stats()
    lookups = (after.hits - before.hits) + (after.misses - before.misses)
    full = [seconds for started, rows, seconds in stats.steps
            if rows == min(16, channels) and started >= first_started]
    return dict(channels=channels, rounds=rounds, replies=channels * rounds,
                tokens_per_s=channels * rounds * NEW_TOKENS / wall,
                p50_s=statistics.median(latencies),
                p95_s=sorted(latencies)[round(0.95 * (len(latencies) - 1))],
                hit_rate=(after.hits - before.hits) / lookups if lookups else 0.0,
                cache_mb=after.max_bytes / 2**20,
                prompt_min=min(prompt_tokens), prompt_max=max(prompt_tokens),
                step16_ms=1000 * statistics.median(full) if full else None,
                decode16_tokens_per_s=16 / statistics.median(full) if full else None,
                last_prompts=prompt_tokens[-min(16, channels):],
                # where the rounds' time went, per round
                prefill_tokens=(stats.prefill_tokens - counters[0]) / rounds,
                prefill_s=(stats.prefill_seconds - counters[1]) / rounds,
                reused_tokens=(stats.reused_tokens - counters[2]) / rounds,
                decode_steps=(stats.decode_steps - counters[3]) / rounds,
                decode_s=(stats.decode_seconds - counters[4]) / rounds,
                round_s=wall / rounds,
                steps=[(rows, round(1000 * seconds, 1)) for started, rows, seconds in stats.steps
                       if started >= first_started])


def bare_ceiling(model, lengths: list[int], steps: int = 12) -> dict:
    """The model alone on `len(lengths)` rows whose caches hold `lengths` tokens: left-padded
    in a preallocated fp32 cache, `steps` decode steps with transformers' sdpa attention and
    a padding mask, no sampling. Median step time and tokens/s."""
    import torch
    from transformers import Cache, DynamicLayer

    config = model.config
    heads, dim = config.n_head, config.n_embd // config.n_head
    rows, longest = len(lengths), max(lengths)
    capacity = longest + steps + 1
    from bot.quant import activation_dtype

    dtype = activation_dtype(model)

    class Layer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.kbuf = torch.randn((rows, heads, capacity, dim), dtype=dtype)
            self.vbuf = torch.randn((rows, heads, capacity, dim), dtype=dtype)
            self.length, self.is_initialized = longest, True
            self.dtype, self.device = dtype, self.kbuf.device
            self.keys, self.values = self.kbuf[:, :, :longest], self.vbuf[:, :, :longest]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            self.kbuf[:, :, self.length:end] = key_states
            self.vbuf[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
            return self.keys, self.values

    cache = Cache(layers=[Layer() for _ in range(config.n_layer)])
    mask = torch.zeros((rows, capacity), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, longest - n:longest] = 1
    ids = torch.randint(300, 40000, (rows, 1))
    times = []
    with torch.inference_mode():
        for step in range(steps):
            mask[:, longest + step] = 1
            position = torch.tensor([[n + step] for n in lengths])
            started = time.perf_counter()
            model(input_ids=ids, position_ids=position, cache=cache, use_cache=True,
                  attention_mask=mask[:, :longest + step + 1])
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times[2:])
    return dict(rows=rows, step_ms=1000 * step_s, tokens_per_s=rows / step_s,
                history=f"{min(lengths)}-{max(lengths)}")


class TurnProfile:
    """Where one turn's time went, from the batching worker's counters."""

    def __init__(self, generator):
        self.stats = getattr(getattr(generator, "worker", None), "stats", None)
        self.cache = getattr(generator, "cache_stats", None)

    def __enter__(self) -> "TurnProfile":
        if self.stats is not None:
            s = self.stats
            self._start = (s.prefill_tokens, s.prefill_seconds, s.reused_tokens,
                           s.decode_steps, s.decode_seconds, self.cache().hits)
        return self

    def __exit__(self, *exc) -> None:
        if self.stats is None:
            self.figures = {}
            return
        s = self.stats
        tokens, seconds, reused, steps, decode_seconds, hits = self._start
        self.figures = dict(prefill_tokens=s.prefill_tokens - tokens,
                            prefill_s=s.prefill_seconds - seconds,
                            reused_tokens=s.reused_tokens - reused,
                            decode_steps=s.decode_steps - steps,
                            decode_s=s.decode_seconds - decode_seconds,
                            hit=self.cache().hits - hits)
