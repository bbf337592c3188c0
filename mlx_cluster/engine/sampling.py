"""Per-sequence logits processors built from `SamplingParams`, and top-logprobs.

Sampling itself is batched (engine/decode.py): one graph samples every row of the batch.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_cluster.engine.plan import SamplingParams


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
