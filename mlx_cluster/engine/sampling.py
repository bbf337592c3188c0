"""Per-sequence samplers and logits processors built from `SamplingParams`.

Seeded sampling must not depend on who else is in the batch or which rank runs it, so each
sequence owns its own PRNG key chain (split once per sampled token) instead of sharing MLX's
global random state. Same seed and same logits give the same token everywhere.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlx_cluster.engine.plan import SamplingParams


class SeededSampler:
    """Temperature / top-k / top-p / min-p sampling with a private key chain."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.top_k = params.top_k if 0 < params.top_k < vocab_size else 0
        self.key = mx.random.key(params.seed & 0xFFFFFFFFFFFFFFFF)
        # 1/T overflows float32 below T ~ 3e-39 (inf * 0 = NaN: random tokens); capped, it is argmax.
        self.inv_temperature = min(1.0 / params.temperature, 1e30)

    def __call__(self, logprobs: mx.array) -> mx.array:
        p = self.params
        if 0.0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p > 0.0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if self.top_k:
            logprobs = apply_top_k(logprobs, self.top_k)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * self.inv_temperature, key=sub)


def make_sampler(params: SamplingParams, vocab_size: int) -> SeededSampler | None:
    """None means greedy: the batch then shares one argmax."""
    return None if params.greedy else SeededSampler(params, vocab_size)


def make_logits_processors(params: SamplingParams, prompt_len: int) -> list:
    """OpenAI semantics: logit_bias and repetition penalty over prompt and output,
    presence and frequency penalties over the generated tokens only.

    A processor gets (context tokens so far, logits of shape (1, vocab)).
    """
    processors = []
    if params.logit_bias:
        ids = mx.array([t for t, _ in params.logit_bias])
        values = mx.array([b for _, b in params.logit_bias])

        def logit_bias(_, logits):
            return logits.at[:, ids].add(values.astype(logits.dtype))

        processors.append(logit_bias)

    if params.repetition_penalty not in (0.0, 1.0):
        penalty = params.repetition_penalty

        def repetition(context, logits):
            if context.size == 0:
                return logits
            selected = logits[:, context]
            selected = mx.where(selected < 0, selected * penalty, selected / penalty)
            return _put(logits, context, selected)

        processors.append(repetition)

    if params.presence_penalty or params.frequency_penalty:
        presence, frequency = params.presence_penalty, params.frequency_penalty

        def presence_frequency(context, logits):
            generated = context[prompt_len:]
            if generated.size == 0:
                return logits
            counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[generated].add(1)
            penalty = frequency * counts + presence * (counts > 0).astype(logits.dtype)
            return logits - penalty[None, :]

        processors.append(presence_frequency)
    return processors


def _put(logits: mx.array, ids: mx.array, values: mx.array) -> mx.array:
    """logits[:, ids] = values (repeated ids write the same value, so order does not matter)."""
    logits = mx.array(logits)
    logits[:, ids] = values
    return logits


def top_logprobs(logprobs: mx.array, k: int) -> tuple[list[int], list[float]]:
    """The k most likely tokens of one row of log-probabilities, best first."""
    k = min(k, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
    values = logprobs[ids]
    order = mx.argsort(-values)
    ids, values = ids[order], values[order]
    return ids.tolist(), values.tolist()
