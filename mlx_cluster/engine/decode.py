"""The batched decode step: mlx-lm's continuous batcher, sampling the whole batch at once.

mlx-lm's `GenerationBatch` samples a batch whose sequences differ (own seed, temperature,
top-p...) one sequence at a time: a slice, a sampler graph and a concatenate per row, about
ten kernels per sequence per step, all built in Python. On a GPU, host work per step sets the
pace (docs/architecture.md), so a 32-sequence sampled batch paid for ~320 extra kernels.

Here every row's sampling parameters live in device arrays that follow the batch (filtered
and extended with it), and one graph samples every row: per-row temperature, top-k, top-p and
min-p, and Gumbel-max noise from a counter-based hash of (seed, token index, vocab id). A
row's tokens therefore depend on its own seed and logits only, never on its neighbours or its
position in the batch, and every rank samples the same tokens.

Grammar constraints (`TokenConstraint`) are applied here too. Their masks need the previous
token on the host, so for a batch with constrained rows the forward pass is launched first,
the masks are computed while it runs, and only the sampling waits for them.

Everything else (prefill, stop conditions, cache extraction) stays mlx-lm's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import make_prompt_cache

from mlx_cluster.engine.kv_quant import prefill_reads
from mlx_cluster.engine.plan import SamplingParams
from mlx_cluster.models.lora import select_rows

_GOLDEN = 0x9E3779B9


@dataclass(eq=False)
class RowSampling:
    """One sequence's sampling, carried through mlx-lm's batches in its `samplers` list."""

    params: SamplingParams
    vocab_size: int
    constraint: object | None = None  # a TokenConstraint, or None
    adapter: int = 0  # the LoRA adapter slot this row runs with (models/lora.py; 0 = none)
    consumed: int = field(default=0, init=False)  # tokens the constraint has seen

    def __call__(self, logprobs: mx.array) -> mx.array:
        # mlx-lm never calls it inside a DecodeBatch; a plain GenerationBatch would.
        raise AssertionError("RowSampling is sampled by DecodeBatch, not by mlx-lm's per-row path")


def _fmix(h: mx.array) -> mx.array:
    """murmur3's 32-bit finalizer: a cheap, well-mixed hash of uint32 values."""
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, dtype=mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, dtype=mx.uint32)
    return h ^ (h >> 16)


def _gumbel(seed_lo: mx.array, seed_hi: mx.array, counter: mx.array, vocab: int) -> mx.array:
    """Gumbel(0, 1) noise, shape (rows, vocab), a pure function of each row's seed and counter."""
    row = _fmix(seed_lo ^ _fmix(seed_hi ^ _fmix(counter * mx.array(_GOLDEN, dtype=mx.uint32))))
    ids = mx.arange(vocab, dtype=mx.uint32) * mx.array(_GOLDEN, dtype=mx.uint32)
    bits = _fmix(row[:, None] ^ ids[None, :])
    return -mx.log(-mx.log(_uniform(bits)))


def _uniform(bits: mx.array) -> mx.array:
    """uint32 hash values -> float32 uniform in (0, 1), never 0 or 1, so the noise stays finite.

    23 bits, not 24: ((bits >> 8) + 0.5) / 2**24 is 1 - 2**-25 at the top, which float32 rounds
    to exactly 1.0, and -log(-log(1)) is +inf. An infinite score wins the argmax whatever the
    token's probability, and a masked token's -inf plus +inf is NaN, which wins too: one draw
    in 2**24 (about one sampled token in 128 on a 128k vocabulary) was a uniformly random
    token, and constrained rows broke their grammar (found by a strict tool call that came back
    as `{"name": "get_weather", stack`).
    """
    return ((bits >> 9).astype(mx.float32) + 0.5) * (1.0 / (1 << 23))


def _sample(logprobs, inv_temp, greedy, top_p, top_k, min_p, seed_lo, seed_hi, counter, filtered: bool):
    """Next token of every row (int32), from normalized log-probabilities (rows, vocab)."""
    vocab = logprobs.shape[-1]
    lp = logprobs.astype(mx.float32)
    keep = lp >= mx.max(lp, axis=-1, keepdims=True) + mx.log(min_p)[:, None]  # log(0) = -inf keeps all
    if filtered:  # top-k / top-p need each row sorted; skipped when no row uses them
        order = mx.argsort(-lp, axis=-1)
        ranked = mx.take_along_axis(lp, order, axis=-1)
        probs = mx.exp(ranked)
        before = mx.cumsum(probs, axis=-1) - probs  # probability mass ranked strictly above
        rank = mx.arange(vocab)[None, :]
        top_k = top_k[:, None]
        kept = (before < top_p[:, None]) & ((top_k == 0) | (rank < top_k))
        kept = kept | (rank == 0)  # the most likely token always survives
        keep = keep & mx.put_along_axis(mx.zeros_like(kept), order, kept, axis=-1)
    noisy = mx.where(keep, lp * inv_temp[:, None] + _gumbel(seed_lo, seed_hi, counter, vocab), -math.inf)
    scores = mx.where(greedy[:, None], lp, noisy)
    return mx.argmax(scores, axis=-1).astype(mx.uint32)


# One compiled graph per variant (and batch shape): the whole batch's sampling in a few kernels.
_sample_plain = mx.compile(lambda *a: _sample(*a, filtered=False))
_sample_sorted = mx.compile(lambda *a: _sample(*a, filtered=True))


@dataclass
class _RowArrays:
    """Per-row sampling parameters as device arrays, in batch row order."""

    inv_temp: mx.array
    greedy: mx.array
    top_p: mx.array
    top_k: mx.array
    min_p: mx.array
    seed_lo: mx.array
    seed_hi: mx.array
    counter: mx.array  # tokens this row has sampled so far

    @classmethod
    def of(cls, rows: list[RowSampling]) -> _RowArrays:
        ps = [r.params for r in rows]
        top_k = [p.top_k if 0 < p.top_k < r.vocab_size else 0 for p, r in zip(ps, rows)]
        return cls(
            # 1/T overflows float32 below T ~ 3e-39; capped, it is argmax.
            inv_temp=mx.array([min(1.0 / p.temperature, 1e30) if p.temperature > 0 else 1.0 for p in ps]),
            greedy=mx.array([p.greedy for p in ps]),
            top_p=mx.array([p.top_p if 0.0 < p.top_p < 1.0 else 1.0 for p in ps]),
            top_k=mx.array(top_k, dtype=mx.int32),
            min_p=mx.array([p.min_p for p in ps]),
            seed_lo=mx.array([p.seed & 0xFFFFFFFF for p in ps], dtype=mx.uint32),
            seed_hi=mx.array([(p.seed >> 32) & 0xFFFFFFFF for p in ps], dtype=mx.uint32),
            counter=mx.zeros((len(ps),), dtype=mx.uint32),
        )

    def take(self, keep: list[int]) -> _RowArrays:
        idx = mx.array(keep, dtype=mx.int32)
        return _RowArrays(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def concat(self, other: _RowArrays) -> _RowArrays:
        return _RowArrays(*(mx.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__))


class DecodeBatch(GenerationBatch):
    """mlx-lm's generation batch with one batched sampler (see the module docstring)."""

    speculator = None  # an engine.speculate.Speculator: set on the batcher's running batch only

    def __init__(self, *args, **kwargs):
        self._rows: _RowArrays | None = None  # built on the first step, then follows filter/extend
        super().__init__(*args, **kwargs)  # runs the first _step when there are rows

    @classmethod
    def adopt(cls, batch: GenerationBatch) -> DecodeBatch:
        """mlx-lm's empty generation batch, as a DecodeBatch (the generator starts with one)."""
        assert not batch.uids
        return cls.empty(batch.model, batch.fallback_sampler)

    def _arrays(self) -> _RowArrays:
        if self._rows is None:
            self._rows = _RowArrays.of(self.samplers)
        return self._rows

    def extend(self, batch):
        rows = self._arrays() if self.uids else None
        theirs = batch._arrays() if isinstance(batch, DecodeBatch) and batch.uids else _RowArrays.of(batch.samplers)
        super().extend(batch)
        self._rows = theirs if rows is None else rows.concat(theirs)

    def filter(self, keep):
        rows = self._rows
        super().filter(keep)
        self._rows = rows.take(keep) if rows is not None and keep else None

    def next(self):
        if self.speculator is not None and self.uids:
            responses = self.speculator.step(self)  # several tokens per row, or None: a plain step
            if responses is not None:
                return responses
        return super().next()

    def _step(self):
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens

        select_rows(self.model, [getattr(r, "adapter", 0) for r in self.samplers])
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        self._sample_next(logits, inputs)
        return self._hand_out(inputs)

    def _sample_next(self, logits: mx.array, inputs: mx.array) -> None:
        """Sample every row's next token from the logits of the forward pass fed ``inputs``
        (lazily: the device starts on it now)."""
        token_context = []
        if any(self.logits_processors):
            logits, token_context = self._process(logits, inputs)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        constrained = [i for i, r in enumerate(self.samplers) if r.constraint is not None]
        if constrained:
            # Launch the forward now; the masks need this step's input tokens on the host,
            # and are computed while the device runs the forward.
            mx.async_eval(logprobs)
            logprobs = self._mask(logprobs, inputs, constrained)

        rows = self._arrays()
        sample = _sample_sorted if _needs_sort(self.samplers) else _sample_plain
        sampled = sample(
            logprobs,
            rows.inv_temp,
            rows.greedy,
            rows.top_p,
            rows.top_k,
            rows.min_p,
            rows.seed_lo,
            rows.seed_hi,
            rows.counter,
        )
        rows.counter = rows.counter + 1

        self._next_tokens = sampled
        wants = any(r.params.logprobs for r in self.samplers)
        self._next_logprobs = list(logprobs) if wants else [None] * len(self.uids)
        mx.async_eval(self._next_tokens, rows.counter, [x for x in self._next_logprobs if x is not None], token_context)

    def _hand_out(self, inputs: mx.array):
        """The tokens this step fed (sampled by the step before), now on the host."""
        mx.eval(inputs, [x for x in self._current_logprobs if x is not None])
        inputs = inputs.tolist()
        for sti, ti in zip(self.tokens, inputs):
            sti.append(ti)
        return inputs, self._current_logprobs

    def _process(self, logits, inputs):
        """Rows with logits processors (penalties, logit_bias) get them, as mlx-lm applies them."""
        processed, token_context = [], []
        for e in range(len(self.uids)):
            row = logits[e : e + 1]
            processors = self.logits_processors[e] or ()
            if processors:
                context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                token_context.append(context)
                for processor in processors:
                    row = processor(context, row)
            processed.append(row)
        return mx.concatenate(processed, axis=0), token_context

    def _mask(self, logprobs, inputs, constrained: list[int]):
        """-inf for the tokens each constrained row's grammar forbids next."""
        tokens = inputs.tolist()
        allowed = np.ones((len(self.uids), logprobs.shape[-1]), dtype=bool)
        for i in constrained:
            row = self.samplers[i]
            c = row.constraint
            if row.consumed:  # the first step's input is the prompt's last token, not an answer token
                c.consume(tokens[i])
            row.consumed += 1
            mask = c.allowed_tokens()
            if mask is not None:
                width = min(mask.size, allowed.shape[1])
                allowed[i, :width] = mask[:width]
                allowed[i, width:] = False
        return mx.where(mx.array(allowed), logprobs, -math.inf)


def _needs_sort(rows: list[RowSampling]) -> bool:
    return any((0.0 < r.params.top_p < 1.0) or (0 < r.params.top_k < r.vocab_size) for r in rows)


class PromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, handing finished prompts to a DecodeBatch."""

    on_prefill = None  # called with (prompt tokens, seconds) after a prefill that ran alone
    timed = False  # set by the Batcher: no decode step is in flight, so the time is prefill's alone

    def prompt(self, tokens):
        select_rows(self.model, [getattr(r, "adapter", 0) for r in self.samplers])  # each row's LoRA adapter
        model = self.model
        # Pipeline stages kept busy: mlx-lm's prefill loop calls a stand-in (engine/microbatch.py).
        from mlx_cluster.engine.microbatch import pipelined_prefill

        self.model = pipelined_prefill(model) or model
        caches = self.prompt_cache
        self.prompt_cache = prefill_reads(caches)  # quantized live KV on a CPU: fused SDPA (kv_quant.py)
        try:
            if not (self.timed and self.on_prefill is not None and tokens):
                return super().prompt(tokens)
            started = time.perf_counter()
            super().prompt(tokens)  # evaluates every chunk: the time is the device's
            self.on_prefill(sum(len(t) for t in tokens), time.perf_counter() - started)
        finally:
            self.model = model
            self.prompt_cache = caches

    def generate(self, tokens):
        # mlx-lm's generate(), except for the class of the batch it returns.
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        generation = DecodeBatch(
            self.model,
            self.uids,
            mx.array([t[-1] for t in tokens]),
            self.prompt_cache,
            self.tokens,
            self.samplers,
            self.fallback_sampler,
            self.logits_processors,
            self.stop_sequences,
            self.max_tokens,
        )
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        return generation


class Batcher(BatchGenerator):
    """mlx-lm's continuous batcher with DecodeBatch as its generation batch."""

    def __init__(self, model, live_kv=None, speculator=None, microbatches: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        self._generation_batch = DecodeBatch.adopt(self._generation_batch)
        self._generation_batch.speculator = speculator
        if microbatches > 1:  # pipeline stages kept busy by micro-batches in flight (engine/microbatch.py)
            from mlx_cluster.engine.microbatch import MicroBatches

            self._generation_batch = MicroBatches(model, self.sampler, microbatches)
        self._prompt_batch.__class__ = PromptBatch
        self.live_kv = live_kv  # a kv_quant.LiveKV: sequences get quantized caches (engine/kv_quant.py)
        self._n_layers = len(make_prompt_cache(model))

    def insert_segments(self, segments, max_tokens=None, caches=None, *args, **kwargs):
        if self.live_kv is not None:
            caches = [
                c if c is not None else self.live_kv.empty_caches(self._n_layers)
                for c in caches or [None] * len(segments)
            ]
        return super().insert_segments(segments, max_tokens, caches, *args, **kwargs)

    def _make_batch(self, n: int):
        batch = super()._make_batch(n)
        batch.__class__ = PromptBatch  # same fields; only generate() differs
        return batch

    def set_prefill_meter(self, callback) -> None:
        """Report (tokens, seconds) of prefills that run with no decode step in flight (cost.py)."""
        self._prompt_batch.on_prefill = callback

    def _next(self):
        self._prompt_batch.timed = len(self._generation_batch) == 0
        return super()._next()
