"""Engine-level helpers for prefix-cache tests and measurements (no HTTP, no bus).

They drive an `Executor` the way the engine does on rank 0: look the prompts up (SSD reads
start), hold them while the cost model says the reads are worth waiting for, plan the restores
at admission, apply(plan), step() until the sequences finish.

    loaded = load_tiny(models_dir)
    ex = make_executor(loaded, cache_config(tmp_path))
    [r] = generate(ex, [prompt], max_tokens=8)   # r.tokens, r.cached_tokens, r.ttft_s
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_cluster.cache.prefix_cache import PrefixCache, kv_dtype
from mlx_cluster.config import CacheSection
from mlx_cluster.engine.executor import Executor
from mlx_cluster.engine.plan import NewSequence, SamplingParams, StepPlan

_seq_ids = itertools.count(1)


def cache_config(tmp_dir: str | Path | None = None, **overrides) -> CacheSection:
    """A CacheSection; `ssd` overrides go in as a dict, e.g. ssd={"policy": "write_through"}."""
    ssd = {"dir": str(tmp_dir) if tmp_dir is not None else "/nonexistent", "enabled": tmp_dir is not None}
    ssd.update(overrides.pop("ssd", {}))
    return CacheSection.model_validate({**overrides, "ssd": ssd})


def load_tiny(models_dir: str | Path, group=None):
    """builtin:tiny, materialised under `models_dir` and loaded for `group` (default: this process)."""
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import load_model_shard

    path = resolve_model_path("builtin:tiny", str(models_dir))
    return load_model_shard(path, group if group is not None else mx.distributed.init())


def make_executor(
    loaded,
    cache_cfg: CacheSection | None,
    *,
    fingerprint: str | None = None,
    group=None,
    max_batch_size: int = 8,
    prefill_chunk: int = 512,
    ssd_queue_size: int = 4096,
    live_kv=None,
) -> Executor:
    """An Executor on `loaded` with a PrefixCache (none when cache_cfg is None); `live_kv` (an
    engine.kv_quant.LiveKV) quantizes its running batch's KV."""
    cache = None
    if cache_cfg is not None:
        cache = PrefixCache(
            cache_cfg,
            fingerprint=fingerprint or loaded.fingerprint,
            dtype=kv_dtype(loaded.model),
            group=group if group is not None else mx.distributed.init(),
            ssd_queue_size=ssd_queue_size,
            live=live_kv,
        )
    vocab = loaded.config.get("vocab_size")
    return Executor(
        loaded.model,
        vocab_size=vocab,
        max_batch_size=max_batch_size,
        prefill_batch_size=max_batch_size,
        prefill_chunk=prefill_chunk,
        prefix_cache=cache,
        live_kv=live_kv,
    )


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    ttft_s: float = 0.0  # from lookup to the first token: SSD reads, restore and prefill included


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=0, temperature=0.0)


def new_sequences(executor: Executor, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[NewSequence]:
    """NewSequences as rank 0's frontend would admit them (restore_blocks planned)."""
    from mlx_cluster.cache.restore_planner import RestorePlanner

    seqs = [NewSequence(next(_seq_ids), tuple(p), greedy(max_tokens)) for p in prompts]
    if executor.prefix_cache is not None:
        planner = RestorePlanner(executor.prefix_cache)
        for s in seqs:
            planner.arrived(s)
        while any(planner.held(s) for s in seqs):
            time.sleep(0.0005)
        seqs = [planner.admitted(s) for s in seqs]
    return seqs


def generate(executor: Executor, prompts: Sequence[Sequence[int]], max_tokens: int = 8) -> list[Result]:
    """Run greedy generations to completion in one batch; results in prompt order. Sequences
    already in the executor keep running alongside (their tokens are ignored here)."""
    t0 = time.perf_counter()
    seqs = new_sequences(executor, prompts, max_tokens)
    results = {s.seq_id: Result() for s in seqs}
    executor.apply(StepPlan(step=0, new=tuple(seqs)))
    open_ids = set(results)
    while open_ids:
        for out in executor.step():
            r = results.get(out.seq_id)
            if r is None:
                continue  # a sequence someone else started
            if not r.tokens:
                r.ttft_s = time.perf_counter() - t0
                r.cached_tokens = out.cached_tokens
            r.tokens.append(out.token)
            if out.finish_reason is not None:
                open_ids.discard(out.seq_id)
    return [results[s.seq_id] for s in seqs]


class LocalBus:
    """The control bus of a one-rank group: rank 0's plan is the plan."""

    def exchange(self, plan: StepPlan) -> StepPlan:
        return plan


def make_engine(loaded, cache_cfg: CacheSection | None, *, max_queue: int = 64, **executor_kw):
    """An Engine with a Frontend (rank 0's role) on a one-rank local bus."""
    from mlx_cluster.engine.engine import Engine
    from mlx_cluster.engine.frontend import Frontend

    executor = make_executor(loaded, cache_cfg, **executor_kw)
    frontend = Frontend(
        loaded.tokenizer,
        max_batch_size=executor.generator.completion_batch_size,
        max_new_per_step=executor.generator.prefill_batch_size,
        max_queue=max_queue,
        prefix_cache=executor.prefix_cache,
    )
    return Engine(executor, LocalBus(), frontend, heartbeat_s=1.0)


def run_requests(engine, prompts: Sequence[Sequence[int]], max_tokens: int = 4, max_steps: int = 10_000) -> list:
    """Submit one greedy request per prompt, step until all are done; each request's DoneEvent."""
    from mlx_cluster.engine.frontend import DoneEvent, ErrorEvent, GenerationRequest

    events: list[list] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        req = GenerationRequest(f"req-{next(_seq_ids)}", list(p), greedy(max_tokens), events[i].append)
        assert engine.frontend.submit(req)
    for _ in range(max_steps):
        if all(e and isinstance(e[-1], (DoneEvent, ErrorEvent)) for e in events):
            return [e[-1] for e in events]
        engine.step()
    raise TimeoutError("requests did not finish")


def random_prompt(n: int, seed: int, vocab: int = 2048, low: int = 16) -> list[int]:
    """`n` token ids from a seeded generator (avoiding the low control-token ids)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(low, vocab) for _ in range(n)]
