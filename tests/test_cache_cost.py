"""The prefix cache's cost model: a slow tier is skipped, a fast one used (fake timings, then real runs)."""

from __future__ import annotations

import time

import pytest

from mlx_cluster.cache.cost import UNMEASURED_WAIT_S, CostModel, Ewma
from mlx_cluster.cache.restore_planner import RestorePlanner
from mlx_cluster.cache.testing import cache_config, generate, load_tiny, make_executor, random_prompt
from mlx_cluster.engine.plan import NewSequence, SamplingParams

BS = 16
BLOCK = 1 << 20  # bytes per block in these examples


def model(prefill_s_per_token=None, copy_s_per_byte=0.0, read_s_per_byte=None) -> CostModel:
    m = CostModel(BS, BLOCK)
    if prefill_s_per_token is not None:
        m.prefill.add(prefill_s_per_token)
    m.copy.add(copy_s_per_byte)
    m.ssd_read = Ewma()
    if read_s_per_byte is not None:
        m.ssd_read.add(read_s_per_byte)
    return m


def test_memory_blocks_are_restored_when_cheaper_than_prefill():
    d = model(prefill_s_per_token=1e-3).plan(["memory"] * 4)
    assert d.blocks == 4 and d.wait_s == 0


def test_memory_blocks_are_skipped_when_copying_costs_more_than_prefilling():
    # 16 tokens prefill in 16 us; copying 1 MB at 1e-9 s/B takes 1 ms: recompute.
    d = model(prefill_s_per_token=1e-6, copy_s_per_byte=1e-9).plan(["memory", "memory", "reading"])
    assert d.blocks == 0 and d.wait_s == 0


def test_a_slow_ssd_tier_is_not_waited_for():
    # A GPU-like prefill (33 us/token: 0.5 ms per block) against 1 ms to read and verify a block.
    m = model(prefill_s_per_token=33e-6, read_s_per_byte=1e-9)
    d = m.plan(["memory", "memory", "reading", "reading"])
    assert d.blocks == 2 and d.wait_s == 0  # the RAM hits are used, the SSD reads are not awaited


def test_a_fast_ssd_tier_is_waited_for_at_most_the_time_it_saves():
    # A Mac-like prefill (1 ms/token: 16 ms per block) against 1 ms per block read.
    m = model(prefill_s_per_token=1e-3, read_s_per_byte=1e-9)
    d = m.plan(["memory", "reading", "reading", "memory"])
    assert d.blocks == 1
    assert d.wait_s == pytest.approx(3 * 16e-3)  # three blocks behind the first, each saving 16 ms


def test_unmeasured_costs_presume_the_tier_helps_for_a_bounded_time():
    assert model().plan(["reading"]).wait_s == UNMEASURED_WAIT_S
    assert model(prefill_s_per_token=1e-3).plan(["reading"]).wait_s == UNMEASURED_WAIT_S


def test_prefill_samples_from_tiny_chunks_are_ignored():
    m = CostModel(BS, BLOCK)
    m.observe_prefill(3, 1.0)
    assert m.prefill.value is None
    m.observe_prefill(64, 0.064)
    assert m.prefill_block_s() == pytest.approx(0.016)


class FakeCache:
    """Stands in for PrefixCache: three blocks on SSD, read when `done` says so."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.done = False
        self.held = 0

    def block_ids(self, prompt, adapter=0):
        return [b"a", b"b", b"c"]

    def lookup(self, ids):
        return list(ids)

    def decide(self, ids):
        from mlx_cluster.cache.cost import RestoreDecision

        return RestoreDecision(3 if self.done else 0, 0.0 if self.done else self.wait_s, 0 if self.done else 3)

    def count_held(self):
        self.held += 1

    def plan_sequence(self, seq, ids):
        import dataclasses

        return dataclasses.replace(seq, restore_blocks=tuple(ids[: self.decide(ids).blocks]))


def seq(i=1):
    return NewSequence(i, (1, 2, 3), SamplingParams(max_tokens=1, seed=0))


def test_planner_holds_while_reads_are_worth_it_then_admits_with_the_blocks():
    now = [0.0]
    cache = FakeCache(wait_s=0.5)
    planner = RestorePlanner(cache, clock=lambda: now[0])
    planner.arrived(seq())
    assert planner.take_hints() == (b"a", b"b", b"c") and planner.take_hints() == ()
    assert planner.held(seq()) and planner.waiting_for_reads and cache.held == 1
    now[0] = 0.2
    assert planner.held(seq()) and cache.held == 1  # counted once
    cache.done = True
    assert not planner.held(seq())
    assert planner.admitted(seq()).restore_blocks == (b"a", b"b", b"c")


def test_planner_gives_workers_as_long_again_as_its_own_reads_took():
    now = [0.0]
    cache = FakeCache(wait_s=0.5)
    planner = RestorePlanner(cache, clock=lambda: now[0], world_size=2)
    planner.arrived(seq())
    assert planner.held(seq())
    now[0], cache.done = 0.1, True  # rank 0's reads took 0.1 s; the workers started a plan later
    assert planner.held(seq())
    now[0] = 0.19
    assert planner.held(seq())
    now[0] = 0.21
    assert not planner.held(seq()) and planner.admitted(seq()).restore_blocks == (b"a", b"b", b"c")


def test_planner_stops_holding_when_the_wait_runs_out():
    now = [0.0]
    planner = RestorePlanner(FakeCache(wait_s=0.5), clock=lambda: now[0])
    planner.arrived(seq())
    assert planner.held(seq())
    now[0] = 0.6
    assert not planner.held(seq()) and not planner.waiting_for_reads
    assert planner.admitted(seq()).restore_blocks == ()  # the reads lost: prefill it all


# ---- real runs on builtin:tiny -------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(models_dir):
    return load_tiny(models_dir)


PROMPT = random_prompt(6 * BS + 5, seed=11)


def ssd_only(loaded, tmp_path):
    """An executor whose prompt blocks are on SSD only (RAM tier emptied), costs measured."""
    ex = make_executor(loaded, cache_config(tmp_path, block_size=BS, ssd={"policy": "write_through"}))
    generate(ex, [random_prompt(64, seed=5)], 2)  # measures prefill once compiled
    generate(ex, [random_prompt(64, seed=6)], 2)
    [cold] = generate(ex, [PROMPT], 4)
    assert ex.prefix_cache.ssd.flush(10)
    ex.prefix_cache.ram.clear()
    return ex, cold


def test_real_run_uses_a_fast_ssd_tier(loaded, tmp_path):
    ex, cold = ssd_only(loaded, tmp_path)
    [hit] = generate(ex, [PROMPT], 4)
    assert hit.cached_tokens == 6 * BS and hit.tokens == cold.tokens
    assert ex.prefix_cache.stats().ssd.prefetch_adopted == 6
    ex.prefix_cache.close()


def test_real_run_skips_a_slow_ssd_tier(loaded, tmp_path):
    ex, cold = ssd_only(loaded, tmp_path)
    cache = ex.prefix_cache
    read = cache.ssd._read_host

    def slow_read(*args, **kw):  # a disk that takes 200 ms per block
        time.sleep(0.2)
        return read(*args, **kw)

    cache.ssd._read_host = slow_read
    cache.cost.ssd_read = Ewma(value=1e-3)  # and the cost model knows it: recomputing wins
    [miss] = generate(ex, [PROMPT], 4)
    assert miss.cached_tokens == 0 and miss.tokens == cold.tokens
    assert cache.stats().recomputed_blocks == 6
    assert cache.stats().ssd.prefetched == 0  # not even read: it would only take CPU from the engine
    cache.close()


def test_auto_tier_sizes_are_a_share_of_what_is_free_and_say_how_to_change_them(tmp_path, caplog):
    from mlx_cluster.cache import sizing

    with caplog.at_level("INFO"):
        ram = sizing.ram_tier_bytes("auto")
        ssd = sizing.ssd_tier_bytes("auto", tmp_path / "not-yet" / "kv")
    free, _ = sizing.available_memory()
    assert 0 < ram <= free * sizing.RAM_SHARE * 1.05
    assert 0 < ssd <= min(sizing.free_disk(tmp_path) * sizing.SSD_SHARE * 1.05, sizing.SSD_AUTO_CAP)
    assert "set cache.ram_gb to change" in caplog.text and "set cache.ssd.max_gb to change" in caplog.text
    assert sizing.ram_tier_bytes(1.5) == 1_500_000_000 and sizing.ssd_tier_bytes(0, tmp_path) == 0


def test_reads_that_lose_to_prefill_are_not_even_started_except_to_remeasure():
    assert model(prefill_s_per_token=33e-6, read_s_per_byte=1e-9).reads_pay() is False
    assert model(prefill_s_per_token=1e-3, read_s_per_byte=1e-9).reads_pay() is True
    assert model(prefill_s_per_token=1e-3).reads_pay() is None
