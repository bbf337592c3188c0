"""The prefix cache inside the engine, on builtin:tiny, without HTTP: cold, RAM-hit and SSD-hit
runs give the same greedy tokens, blocks are isolated by namespace, eviction and clearing work,
and the cached-token count the frontend reports is what was actually restored."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from mlx_cluster.cache import PrefixCache, kv_dtype
from mlx_cluster.cache.testing import (
    cache_config,
    generate,
    load_tiny,
    make_engine,
    make_executor,
    new_sequences,
    random_prompt,
    run_requests,
)
from mlx_cluster.engine.plan import FLAG_CLEAR_CACHE, StepPlan

BS = 16
BLOCK_BYTES = 4 * 2 * 4 * BS * 32 * 4  # tiny: 4 layers x (k, v) x 4 KV heads x 16 tokens x head_dim 32 x fp32
PROMPT = random_prompt(100, seed=1)  # 6 full blocks; at most 6 restorable ((100 - 1) // 16)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def loaded(models_dir):
    return load_tiny(models_dir)


@pytest.fixture(scope="module")
def baseline(loaded):
    """Greedy tokens without any prefix cache."""
    ex = make_executor(loaded, None)
    prompts = {"p": PROMPT, "p+": PROMPT + random_prompt(40, seed=2)}
    return {k: generate(ex, [p], MAX_TOKENS)[0].tokens for k, p in prompts.items()}


def restorable(prompt) -> int:
    return (len(prompt) - 1) // BS * BS


def test_cold_ram_and_ssd_hits_give_identical_tokens(loaded, baseline, tmp_path):
    ex = make_executor(loaded, cache_config(tmp_path, block_size=BS, ssd={"policy": "write_through"}))
    cache = ex.prefix_cache
    [cold] = generate(ex, [PROMPT], MAX_TOKENS)
    assert cold.cached_tokens == 0 and cold.tokens == baseline["p"]

    [ram] = generate(ex, [PROMPT], MAX_TOKENS)
    assert ram.cached_tokens == restorable(PROMPT) == 96
    assert ram.tokens == baseline["p"]
    assert cache.stats().ram.hits == 6

    assert cache.ssd.flush(10)
    cache.ram.clear()
    [ssd] = generate(ex, [PROMPT], MAX_TOKENS)
    assert ssd.cached_tokens == 96 and ssd.tokens == baseline["p"]
    assert cache.stats().ssd.hits >= 6 and cache.stats().ssd.read_bytes > 6 * BLOCK_BYTES

    # A longer prompt reuses the shorter one's blocks, and its generated tokens too.
    [longer] = generate(ex, [PROMPT + random_prompt(40, seed=2)], MAX_TOKENS)
    assert longer.cached_tokens == 96 and longer.tokens == baseline["p+"]
    cache.close()


def test_restart_serves_from_ssd(loaded, baseline, tmp_path):
    """write_back: blocks reach the disk on eviction, or when the cache closes at shutdown."""
    ex = make_executor(loaded, cache_config(tmp_path, block_size=BS))
    generate(ex, [PROMPT], MAX_TOKENS)
    assert ex.prefix_cache.stats().ssd.writes == 0  # nothing evicted yet
    ex.close()
    assert ex.prefix_cache.stats().ssd.blocks >= 6

    restarted = make_executor(loaded, cache_config(tmp_path, block_size=BS))
    [r] = generate(restarted, [PROMPT], MAX_TOKENS)
    assert r.cached_tokens == 96 and r.tokens == baseline["p"]
    restarted.close()


def test_blocks_are_isolated_by_namespace(loaded, tmp_path):
    cfg = cache_config(tmp_path, block_size=BS, ssd={"policy": "write_through"})
    ex = make_executor(loaded, cfg)
    generate(ex, [PROMPT], MAX_TOKENS)
    ex.prefix_cache.close()

    other_model = make_executor(loaded, cfg, fingerprint="0" * 64)
    [r] = generate(other_model, [PROMPT], MAX_TOKENS)
    assert r.cached_tokens == 0 and other_model.prefix_cache.stats().ssd.hits == 0
    other_model.prefix_cache.close()

    quantized = make_executor(loaded, cache_config(tmp_path, block_size=BS, kv_bits=8))
    assert not quantized.prefix_cache.plan_sequence(new_sequences(quantized, [PROMPT], 1)[0]).restore_blocks
    quantized.prefix_cache.close()

    class TwoRanks:  # planning only: a cache for a 2-rank group looks in tp2/, with another namespace
        def rank(self):
            return 0

        def size(self):
            return 2

    tp2 = PrefixCache(cfg, fingerprint=loaded.fingerprint, dtype=kv_dtype(loaded.model), group=TwoRanks())
    assert "tp2" in tp2.ssd.stats.dir and tp2.ssd.stats.blocks == 0
    assert tp2.cached_prefix_tokens(PROMPT) == 0
    tp2.close()


def test_eviction_under_a_tiny_ram_budget(loaded, baseline, tmp_path):
    cfg = cache_config(tmp_path, block_size=BS, ram_gb=3 * BLOCK_BYTES / 1e9)
    ex = make_executor(loaded, cfg)
    cache = ex.prefix_cache
    generate(ex, [PROMPT], MAX_TOKENS)
    s = cache.stats()
    # The chain's head fills RAM; its tail never evicts its own head, so it goes to the SSD.
    assert s.ram.blocks == 3 and s.ram.bytes == 3 * BLOCK_BYTES and s.ram.rejected >= 3
    generate(ex, [random_prompt(100, seed=9)], MAX_TOKENS)  # another chain evicts the first
    s = cache.stats()
    assert s.ram.blocks == 3 and s.ram.evictions == 3
    assert cache.ssd.flush(10) and cache.stats().ssd.blocks == 9
    [hit] = generate(ex, [PROMPT], MAX_TOKENS)
    assert hit.cached_tokens == 96 and hit.tokens == baseline["p"]
    assert cache.stats().ssd.hits >= 6
    cache.close()

    no_ssd = make_executor(loaded, cache_config(None, block_size=BS, ram_gb=3 * BLOCK_BYTES / 1e9))
    generate(no_ssd, [PROMPT], MAX_TOKENS)
    [partial] = generate(no_ssd, [PROMPT], MAX_TOKENS)
    assert partial.cached_tokens == 48 and partial.tokens == baseline["p"]


def test_concurrent_request_reuses_a_prompt_still_generating(loaded, tmp_path):
    ex = make_executor(loaded, cache_config(tmp_path, block_size=BS))
    shared = random_prompt(64, seed=5)
    [first] = new_sequences(ex, [shared + [20, 21, 22]], max_tokens=50)
    ex.apply(StepPlan(step=0, new=(first,)))
    ex.step()  # prefill
    assert ex.step() == []  # the prompt ends: its blocks are stored before its first token
    assert ex.prefix_cache.stats().ram.blocks == 4
    [second] = generate(ex, [shared + [30, 31]], 2)
    assert second.cached_tokens == 64 and ex.active == 1
    for _ in range(12):
        ex.step()  # 67 prompt + >= 14 generated tokens: more than 5 blocks
    ex.apply(StepPlan(step=1, drop=(first.seq_id,)))
    # Dropped sequences store their blocks too (prompt and generated tokens).
    assert ex.prefix_cache.stats().ram.blocks >= 5
    ex.prefix_cache.close()


def on_ssd_only(loaded, tmp_path):
    """An executor that has PROMPT's blocks on its SSD tier only; and their ids."""
    ex = make_executor(loaded, cache_config(tmp_path, block_size=BS, ssd={"policy": "write_through"}))
    generate(ex, [PROMPT], MAX_TOKENS)
    assert ex.prefix_cache.ssd.flush(10)
    ex.prefix_cache.ram.clear()
    ids = ex.prefix_cache.block_ids(PROMPT)
    assert len(ids) == 6 and all(ex.prefix_cache.ssd.contains(b) for b in ids)
    return ex, ids


def test_damaged_ssd_block_restores_fewer_tokens_and_says_so(loaded, baseline, tmp_path):
    ex, ids = on_ssd_only(loaded, tmp_path)
    cache = ex.prefix_cache
    victim = Path(cache.ssd._path(ids[3]))
    victim.write_bytes(victim.read_bytes()[:100])
    # The prefetch finds the damage: the chain ends before it, and the rest is prefilled.
    [r] = generate(ex, [PROMPT], MAX_TOKENS)
    assert r.cached_tokens == 3 * BS and r.tokens == baseline["p"]
    assert cache.stats().ssd.corrupt == 1
    assert cache.ssd.flush(10) and cache.ssd.read(ids[3]) is not None  # deleted, then stored anew
    cache.close()


def test_a_block_still_being_read_is_prefilled_not_waited_for(loaded, tmp_path):
    ex, ids = on_ssd_only(loaded, tmp_path)
    cache = ex.prefix_cache
    # Planned as if every block were in memory, but none was prefetched: restore_batch must not
    # read the disk on the engine thread, so nothing is restored and the answer is the same.
    seq = dataclasses.replace(new_sequences(ex, [PROMPT[:1]], MAX_TOKENS)[0], prompt=tuple(PROMPT))
    seq = dataclasses.replace(seq, restore_blocks=tuple(ids))
    reads = cache.stats().ssd.read_bytes
    assert cache.restore_batch([seq]) == [None]
    assert cache.stats().ssd.read_bytes == reads
    cache.close()


def test_quantized_blocks(loaded, baseline, tmp_path):
    ex = make_executor(loaded, cache_config(tmp_path, block_size=BS, kv_bits=8, ssd={"policy": "write_through"}))
    generate(ex, [PROMPT], MAX_TOKENS)
    [hit] = generate(ex, [PROMPT], MAX_TOKENS)
    assert hit.cached_tokens == 96
    assert hit.tokens[0] == baseline["p"][0]  # 8-bit KV is close, not bit-identical
    s = ex.prefix_cache.stats()
    assert s.ram.bytes < 0.35 * s.ram.raw_bytes and s.ram.quant_bytes_saved > 0
    assert ex.prefix_cache.ssd.flush(10)
    d = ex.prefix_cache.stats().to_dict()
    assert d["ssd"]["quant_bytes_saved"] > 0
    ex.prefix_cache.close()


def test_engine_reports_actual_cached_tokens_and_clears_on_every_rank(loaded, tmp_path):
    engine = make_engine(loaded, cache_config(tmp_path, block_size=BS, ssd={"policy": "write_through"}))
    cache = engine.executor.prefix_cache
    [cold] = run_requests(engine, [PROMPT])
    [warm] = run_requests(engine, [PROMPT])
    assert (cold.cached_tokens, warm.cached_tokens) == (0, 96) and warm.prompt_tokens == 100
    assert engine.executor.stats.prompt_tokens == 100 + 4  # the hit prefilled only 4 tokens

    cleared = []
    engine.frontend.clear_cache(lambda: cleared.append(True))
    plan = engine.step()
    assert plan.flags & FLAG_CLEAR_CACHE and cleared == [True]
    assert cache.stats().ram.blocks == 0 and cache.stats().ssd.blocks == 0
    assert [f for f in os.listdir(cache.ssd.dir) if not f.startswith(".")] == []
    [again] = run_requests(engine, [PROMPT])
    assert again.cached_tokens == 0
    engine.executor.close()
