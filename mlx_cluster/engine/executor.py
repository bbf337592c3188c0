"""Runs a step plan on this rank's model shard with mlx-lm's continuous batcher.

mlx-lm's `BatchGenerator` already does what we need per step: one batched decode for the
running sequences plus one chunk of batched prefill for joining ones, with logits processors,
stop tokens and removal. Its decode step is ours (`engine/decode.py`): one sampler for the
whole batch instead of one per sequence. Given the same calls in the same order, it does the
same thing on every rank; that is the whole lock-step contract.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import StopSequences

from mlx_cluster.constrain import sequence_constraint
from mlx_cluster.engine import adapters as adapter_ops
from mlx_cluster.engine.decode import Batcher, RowSampling
from mlx_cluster.engine.plan import NewSequence, SamplingParams, StepPlan
from mlx_cluster.engine.sampling import make_logits_processors, top_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenOutput:
    """One sampled token of one sequence."""

    seq_id: int
    token: int
    finish_reason: str | None  # "stop" (stop token), "length", or None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    cached_tokens: int = 0  # on a sequence's first token: prompt tokens restored from the prefix cache


@dataclass
class ExecutorStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    dropped_sequences: int = 0  # running sequences a plan removed (aborted, or ended by a stop string)


class Executor:
    """Applies plans to the batch and produces this step's tokens."""

    def __init__(
        self,
        model,
        *,
        vocab_size: int,
        max_batch_size: int,
        prefill_batch_size: int,
        prefill_chunk: int,
        stream=None,
        prefix_cache=None,
        live_kv=None,
        speculator=None,
        microbatches: int = 1,
    ):
        self.vocab_size = vocab_size
        self.speculator = speculator  # engine/speculate.py, or None
        self.generator = Batcher(
            model,
            live_kv=live_kv,
            speculator=speculator,
            microbatches=microbatches,
            completion_batch_size=max_batch_size,
            prefill_batch_size=min(prefill_batch_size, max_batch_size),
            prefill_step_size=prefill_chunk,
            stream=stream,
        )
        self.prefix_cache = prefix_cache
        self.adapters = None  # the model's AdapterSet (models/lora.py), when it serves LoRA adapters
        self.agree_min = list  # one rank agrees with itself; rank.py plugs in ControlBus.agree_min
        self.adapter_results: dict[int, str | None] = {}  # this step's adapter loads: slot -> error
        self._uid_to_seq: dict[int, NewSequence] = {}
        self._seq_to_uid: dict[int, int] = {}
        self._cached_tokens: dict[int, int] = {}  # seq id -> restored tokens, until its first token
        self.digest = 0  # crc32 chain over every sampled token, compared across ranks
        self.stats = ExecutorStats()

    @property
    def prefix_cache(self):
        return self._prefix_cache

    @prefix_cache.setter
    def prefix_cache(self, cache) -> None:
        # The cache's cost model learns this rank's prefill speed from the batcher's prefills.
        self._prefix_cache = cache
        self.generator.set_prefill_meter(cache.cost.observe_prefill if cache is not None else None)

    @property
    def active(self) -> int:
        return len(self._seq_to_uid)

    def apply(self, plan: StepPlan) -> None:
        """Drop finished or aborted sequences, then add the new ones."""
        cache = self.prefix_cache
        if cache is not None and plan.clear_cache:
            cache.clear()
        if cache is not None and plan.prefetch:
            cache.prefetch(plan.prefetch, plan.step)  # background reads; nothing here waits for them
        # Dropped sequences store blocks, which may evict: pin what the new ones restore first.
        with cache.pinned(plan.new) if cache is not None else contextlib.nullcontext():
            drop = [self._seq_to_uid[s] for s in plan.drop if s in self._seq_to_uid]
            if drop:
                self.stats.dropped_sequences += len(drop)
                # Every rank logs this: the outside proof that an abort reached the workers.
                log.info(
                    "dropped %d running sequence(s) at step %d (%d tokens generated on this rank so far)",
                    len(drop),
                    plan.step,
                    self.stats.generation_tokens,
                )
                caches = self.generator.remove(drop, return_prompt_caches=cache is not None)
                for uid in drop:
                    seq = self._uid_to_seq.pop(uid)
                    del self._seq_to_uid[seq.seq_id]
                    self._cached_tokens.pop(seq.seq_id, None)
                    if cache is not None and uid in caches:
                        cache.on_sequence_done(seq, *caches[uid])
            self.adapter_results = {}
            if plan.adapters:
                self.adapter_results = adapter_ops.apply_ops(self.adapters, plan.adapters, self.agree_min, cache)
            if plan.new:
                self._insert(plan.new)

    def _insert(self, new: tuple[NewSequence, ...]) -> None:
        prompts, caches, cached_tokens = [], [], []
        # One call for the batch: restoring involves one collective, only when some seq has a hit.
        restores = self.prefix_cache.restore_batch(new) if self.prefix_cache is not None else [None] * len(new)
        for seq, restored in zip(new, restores):
            if restored is None:
                prompts.append(list(seq.prompt))
                caches.append(None)
                cached_tokens.append([])
            else:
                cache, n = restored
                prompts.append(list(seq.prompt[n:]))
                caches.append(cache)
                cached_tokens.append(list(seq.prompt[:n]))
                self._cached_tokens[seq.seq_id] = n
        uids = self.generator.insert(
            prompts,
            max_tokens=[s.params.max_tokens for s in new],
            caches=caches if any(c is not None for c in caches) else None,
            all_tokens=cached_tokens,
            samplers=[RowSampling(s.params, self.vocab_size, sequence_constraint(s.grammar), s.adapter) for s in new],
            logits_processors=[make_logits_processors(s.params, len(s.prompt)) for s in new],
            stop_sequences=[StopSequences([[t] for t in s.params.stop_token_ids] or None) for s in new],
        )
        for uid, seq in zip(uids, new):
            self._uid_to_seq[uid] = seq
            self._seq_to_uid[seq.seq_id] = uid
        self.stats.prompt_tokens += sum(len(p) for p in prompts)

    def step(self) -> list[TokenOutput]:
        """One batched decode step plus one prefill chunk; the tokens sampled in it."""
        if not self._seq_to_uid:
            return []
        prompt_responses, responses = self.generator.next()
        self.stats.steps += 1
        if self.prefix_cache is not None:
            self._store_prefilled(prompt_responses)
        outputs = []
        for r in responses:
            seq = self._uid_to_seq[r.uid]
            outputs.append(self._output(seq, r, self._cached_tokens.pop(seq.seq_id, 0)))
            self.digest = zlib.crc32(r.token.to_bytes(4, "little"), self.digest)
            if r.finish_reason is not None:
                # The batcher already let go of it; forget it here too.
                del self._uid_to_seq[r.uid]
                del self._seq_to_uid[seq.seq_id]
                if self.prefix_cache is not None and r.prompt_cache is not None:
                    self.prefix_cache.on_sequence_done(seq, r.prompt_cache, r.all_tokens)
        self.stats.generation_tokens += len(outputs)
        return outputs

    def _store_prefilled(self, prompt_responses) -> None:
        """Store the blocks of prompts that finished prefilling, while their sequences generate on."""
        uids = [r.uid for r in prompt_responses if r.end_of_prompt]
        if uids:
            for uid, (cache, tokens) in self.generator.extract_cache(uids).items():
                self.prefix_cache.on_prompt_done(self._uid_to_seq[uid], cache, tokens)

    def _output(self, seq: NewSequence, r, cached_tokens: int) -> TokenOutput:
        p = seq.params
        if not p.logprobs:
            return TokenOutput(seq.seq_id, r.token, r.finish_reason, cached_tokens=cached_tokens)
        logprob = r.logprobs[r.token].item()
        top = ()
        if p.top_logprobs:
            ids, values = top_logprobs(r.logprobs, p.top_logprobs)
            top = tuple(zip(ids, values))
        return TokenOutput(seq.seq_id, r.token, r.finish_reason, logprob, top, cached_tokens)

    def close(self) -> None:
        self.generator.close()
        if self.prefix_cache is not None:
            self.prefix_cache.close()


_GREEDY_ONE = SamplingParams(max_tokens=2, seed=0, temperature=0.0)


def warmup(executor: Executor, token_id: int, prefill_tokens: int = 256) -> list[tuple[int, float]]:
    """Run tiny greedy generations end to end so compile and allocation costs happen now.

    Returns (tokens, seconds) of timed prefills of two sizes, `prefill_tokens` / 8 and
    `prefill_tokens` (the faster of two runs each), which the prefix cache's cost model fits its
    prefill line to (cache/cost.py): two sizes separate the per-token cost from the fixed cost
    of a forward. Without them a server whose every request hits the cache never prefills a
    whole prompt and never learns what a restore must beat: an H200 then restored from SSD what
    it could recompute faster (measured: 1.34x TTFT). `prefill_tokens=0` (no prefix cache to
    inform) skips them and returns [].
    """
    timings: list[tuple[int, float]] = []
    sizes = (prefill_tokens // 8, prefill_tokens) if prefill_tokens else ()
    timed = [(token_id,) * (n + 1) for n in sizes for _ in range(2)]
    executor.generator.set_prefill_meter(lambda tokens, seconds: timings.append((tokens, seconds)))
    try:
        for n, prompt in enumerate(((token_id, token_id), *timed)):
            _run_one(executor, NewSequence(seq_id=(1 << 63) + n, prompt=prompt, params=_GREEDY_ONE))
    finally:
        executor.generator.set_prefill_meter(None)
    executor.digest = 0
    mx.synchronize()
    fastest: dict[int, float] = {}
    for tokens, seconds in timings:
        fastest[tokens] = min(seconds, fastest.get(tokens, seconds))
    return [(n, fastest[n]) for n in sizes if n in fastest]


def _run_one(executor: Executor, seq: NewSequence) -> None:
    executor.apply(StepPlan(step=0, new=(seq,)))
    for _ in range(16):
        if not executor.active:
            break
        executor.step()
