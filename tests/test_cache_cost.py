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


def model(prefill_s_per_token=None, copy_s_per_byte=0.0, read_s_per_byte=None, upload_s_per_byte=None) -> CostModel:
    m = CostModel(BS, BLOCK)
    if prefill_s_per_token is not None:
        m.observe_prefill(1000, 1000 * prefill_s_per_token)
    m.copy.add(copy_s_per_byte)
    if upload_s_per_byte is not None:
        m.upload.add(upload_s_per_byte)
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


def test_blocks_read_into_host_memory_are_restored_when_uploading_beats_prefill():
    # A Mac: unified memory, 1 MB "uploads" in 0.1 ms, a block prefills in 16 ms.
    m = model(prefill_s_per_token=1e-3, upload_s_per_byte=1e-10, read_s_per_byte=1e-9)
    assert m.plan(["memory", "staged", "staged"]).blocks == 3 and m.reads_pay()


def test_blocks_read_into_host_memory_are_not_restored_when_uploading_loses_to_prefill():
    # A discrete GPU: turning host bytes into device KV costs more than prefilling the block
    # (an H200 prefills 16 tokens of an 8B model in ~1 ms, and its warm SSD hits cost ~3 ms a
    # block more than recomputing), however fast the disk read was. RAM-tier blocks (already
    # on the device) are still used.
    m = model(prefill_s_per_token=33e-6, upload_s_per_byte=1e-9, read_s_per_byte=1e-11)
    d = m.plan(["memory", "staged", "staged", "reading"])
    assert d.blocks == 1 and d.wait_s == 0
    assert m.reads_pay() is False  # so the reads stop being queued at all (but for a re-measure now and then)


def test_unmeasured_costs_presume_the_tier_helps_for_a_bounded_time():
    assert model().plan(["reading"]).wait_s == UNMEASURED_WAIT_S
    assert model(prefill_s_per_token=1e-3).plan(["reading"]).wait_s == UNMEASURED_WAIT_S


def test_prefill_cost_is_the_margin_not_the_fixed_cost_of_a_forward():
    """GPU-like: every forward costs 14 ms of host work whatever its size, each token 0.1 ms more.
    Warm requests prefill one-block tails; charging their 14 ms to 16 tokens made SSD reads look
    cheaper than recomputing (measured on an H200: 1.92x TTFT). The fitted margin does not."""
    m = CostModel(BS, BLOCK)
    m.ssd_read = Ewma()
    m.ssd_read.add(1.5e-3 / BLOCK)  # 1.5 ms to read and verify a block
    m.upload.add(1.0e-3 / BLOCK)  # 1.0 ms to upload it
    for tokens in (32, 256):  # the start-up warm-up's two sizes
        m.observe_prefill(tokens, 0.014 + 1e-4 * tokens)
    for _ in range(30):  # then warm requests: one-block tails after a restore
        m.observe_prefill(16, 0.014 + 1e-4 * 16)
    assert m.prefill.value == pytest.approx(1e-4)
    assert m.prefill.fixed_s == pytest.approx(0.014)
    assert m.reads_pay() is False  # 2.5 ms to read and upload a block, 1.6 ms to prefill it
    assert m.plan(["reading"] * 4).wait_s == 0.0  # not worth holding a request for
    assert m.plan(["staged"] * 4).blocks == 4  # already read: uploading (1 ms) still beats 1.6 ms
    for _ in range(1000):  # hours of one-block tails: the long prefills are not forgotten
        m.observe_prefill(16, 0.014 + 1e-4 * 16)
    assert m.prefill.value == pytest.approx(1e-4)
    ratio = CostModel(BS, BLOCK)  # what seconds / tokens said: 0.97 ms per token
    ratio.observe_prefill(16, 0.014 + 1e-4 * 16)
    assert ratio.prefill_block_s() == pytest.approx(16 * (0.014 + 1.6e-3) / 16)


def test_prefill_fit_falls_back_to_the_ratio_without_a_spread_of_sizes():
    m = CostModel(BS, BLOCK)
    assert m.prefill.value is None and m.prefill.fixed_s is None
    m.observe_prefill(0, 1.0)  # nothing prefilled: no sample
    assert m.prefill.value is None
    m.observe_prefill(64, 0.064)
    m.observe_prefill(64, 0.064)
    assert m.prefill_block_s() == pytest.approx(0.016)
    m.observe_prefill(70, 0.050)  # noise that would make the slope negative
    assert m.prefill.value > 0


class FakeCache:
    """Stands in for PrefixCache: block a in the RAM tier (so on every rank), b and c on SSD,
    read on rank 0 once `done` says so; on the workers once the planner is told they are."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.done = False
        self.held = 0

    def block_ids(self, prompt, adapter=0):
        return [b"a", b"b", b"c"]

    def lookup(self, ids):
        return list(ids[1:])

    def decide(self, ids, everywhere=True):
        from mlx_cluster.cache.cost import RestoreDecision

        if self.done and everywhere:
            return RestoreDecision(3, 0.0, 0)
        return RestoreDecision(1, self.wait_s, 2)  # b and c still being read somewhere

    def count_held(self):
        self.held += 1

    def plan_sequence(self, seq, ids, everywhere=True):
        import dataclasses

        return dataclasses.replace(seq, restore_blocks=tuple(ids[: self.decide(ids, everywhere).blocks]))


def seq(i=1):
    return NewSequence(i, (1, 2, 3), SamplingParams(max_tokens=1, seed=0))


def test_planner_holds_while_reads_are_worth_it_then_admits_with_the_blocks():
    now = [0.0]
    cache = FakeCache(wait_s=0.5)
    planner = RestorePlanner(cache, clock=lambda: now[0])
    planner.arrived(seq())
    assert planner.take_hints() == (b"b", b"c") and planner.take_hints() == ()
    assert planner.held(seq()) and planner.waiting_for_reads and cache.held == 1
    now[0] = 0.2
    assert planner.held(seq()) and cache.held == 1  # counted once
    cache.done = True
    assert not planner.held(seq())
    assert planner.admitted(seq()).restore_blocks == (b"a", b"b", b"c")


def test_planner_stops_holding_when_the_wait_runs_out():
    now = [0.0]
    planner = RestorePlanner(FakeCache(wait_s=0.5), clock=lambda: now[0])
    planner.arrived(seq())
    assert planner.held(seq())
    now[0] = 0.6
    assert not planner.held(seq()) and not planner.waiting_for_reads
    assert planner.admitted(seq()).restore_blocks == (b"a",)  # the reads lost: prefill the rest


def two_ranks(wait_s=0.5):
    """A planner on rank 0 of two ranks, its worker's reports in `through` (the latest step the
    worker has read the prefetch lists of), its request's hints published in plan 5."""
    now, through = [0.0], [-1]
    cache = FakeCache(wait_s)
    planner = RestorePlanner(cache, clock=lambda: now[0], world_size=2, workers_read_through=lambda: through[0])
    planner.arrived(seq())
    assert planner.held(seq())  # nobody has read anything yet
    assert planner.take_hints(5) == (b"b", b"c")
    return planner, cache, now, through


def test_planner_admits_at_once_when_every_rank_has_read_the_blocks():
    planner, cache, now, through = two_ranks()
    now[0], cache.done, through[0] = 0.01, True, 5
    assert not planner.held(seq())
    assert planner.admitted(seq()).restore_blocks == (b"a", b"b", b"c")


def test_planner_waits_for_a_slow_worker_after_its_own_reads_are_done():
    planner, cache, now, through = two_ranks()
    now[0], cache.done = 0.01, True  # rank 0's reads are done; the worker has not reported yet
    assert planner.held(seq())
    now[0], through[0] = 0.3, 4  # a report for an earlier plan does not cover this request
    assert planner.held(seq())
    now[0], through[0] = 0.4, 5
    assert not planner.held(seq())
    assert planner.admitted(seq()).restore_blocks == (b"a", b"b", b"c")


def test_planner_admits_without_ssd_blocks_when_a_worker_never_reports():
    planner, cache, now, through = two_ranks()
    now[0], cache.done = 0.01, True
    assert planner.held(seq())
    now[0] = 0.51  # the wait the cost model allows has run out
    assert not planner.held(seq()) and not planner.waiting_for_reads
    assert planner.admitted(seq()).restore_blocks == (b"a",)  # the RAM tier is the same on every rank


def test_planner_without_worker_reports_never_plans_ssd_blocks_on_several_ranks():
    now = [0.0]
    cache = FakeCache(wait_s=0.5)
    cache.done = True
    planner = RestorePlanner(cache, clock=lambda: now[0], world_size=2)
    planner.arrived(seq())
    planner.take_hints(1)
    now[0] = 1.0
    assert not planner.held(seq()) and planner.admitted(seq()).restore_blocks == (b"a",)


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


def test_real_cache_counts_ssd_blocks_as_restorable_only_once_every_rank_has_read_them(loaded, tmp_path):
    ex, cold = ssd_only(loaded, tmp_path)
    cache = ex.prefix_cache
    ids = cache.block_ids(PROMPT)
    assert len(cache.lookup(ids)) == 6  # rank 0's reads start
    deadline = time.monotonic() + 10
    while cache.decide(ids).reading and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.decide(ids).blocks == 6  # all in rank 0's memory
    elsewhere = cache.decide(ids, everywhere=False)  # ... but not yet known to be on the workers
    assert elsewhere.blocks == 0 and elsewhere.reading == 6
    seq = NewSequence(1, tuple(PROMPT), SamplingParams(max_tokens=1, seed=0))
    assert cache.plan_sequence(seq, ids, everywhere=False).restore_blocks == ()
    assert cache.plan_sequence(seq, ids).restore_blocks == tuple(ids[:6])
    cache.close()


def test_warmup_times_a_whole_prefill_for_the_cost_model(loaded):
    """The start-up warm-up measures prefill speed; the throwaway sequences leave nothing behind."""
    from mlx_cluster.engine.executor import warmup

    ex = make_executor(loaded, None)
    timings = warmup(ex, token_id=0, prefill_tokens=64)
    assert [tokens for tokens, _ in timings] == [8, 64]  # two sizes: the fixed cost and the margin
    assert all(seconds > 0 for _, seconds in timings)
    assert not ex.active and ex.digest == 0
    cost = CostModel(block_size=16)
    for tokens, seconds in timings:
        cost.observe_prefill(tokens, seconds)
    assert cost.prefill.samples == 2 and cost.prefill_block_s() > 0
    assert warmup(ex, token_id=0, prefill_tokens=0) == []  # no prefix cache to inform: no long prefills
