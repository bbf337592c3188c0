"""Memory the engine freed goes back to the OS once the batch is idle (engine/memory.py).

The soak's RSS drift (docs/operations.md, "Chaos and soak") was freed memory kept by MLX's
buffer cache and glibc's arenas, not live state: an idle engine now holds neither."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_cluster.cache.testing import load_tiny, make_engine, random_prompt, run_requests
from mlx_cluster.engine.engine import Engine
from mlx_cluster.engine.memory import IdleReclaimer, _libc_trim
from mlx_cluster.engine.plan import FLAG_IDLE, StepPlan


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def fake_reclaimer(clock=None, min_interval_s=1.0):
    calls = []
    r = IdleReclaimer(
        min_interval_s,
        clock=clock or Clock(),
        trim=lambda pad: calls.append(("trim", pad)) or 1,
        clear_cache=lambda: calls.append(("clear",)),
    )
    return r, calls


def test_reclaims_once_per_idle_spell_after_work_and_never_while_busy():
    clock = Clock()
    r, calls = fake_reclaimer(clock)
    assert not r.after_step(idle=True)  # idle from the start: nothing was freed
    assert not r.after_step(idle=False) and not r.after_step(idle=False)
    assert calls == []
    assert r.after_step(idle=True)
    assert calls == [("clear",), ("trim", 0)]  # MLX's cache first, so glibc can trim what it freed
    clock.t += 10
    assert not r.after_step(idle=True)  # still the same idle spell: nothing new to give back
    assert r.reclaims == 1


def test_a_reclaim_too_soon_after_the_last_waits_for_a_later_idle_step():
    clock = Clock()
    r, calls = fake_reclaimer(clock, min_interval_s=1.0)
    r.after_step(idle=False)
    assert r.after_step(idle=True)
    clock.t += 0.2
    r.after_step(idle=False)
    assert not r.after_step(idle=True)  # 0.2 s after the last one
    clock.t += 1.0
    assert r.after_step(idle=True)  # the next idle heartbeat plan
    assert r.reclaims == 2


class PlanBus:
    """Hands out the given plans in order, as a worker receives them from rank 0."""

    def __init__(self, plans):
        self.plans = list(plans)

    def exchange(self, plan):
        return self.plans.pop(0)


class NullExecutor:
    digest = 0

    def apply(self, plan):
        pass

    def step(self):
        return []


def test_every_rank_reclaims_on_the_first_idle_plan_after_work():
    plans = [StepPlan(step=i, flags=FLAG_IDLE if i >= 3 else 0) for i in range(6)]
    engine = Engine(NullExecutor(), PlanBus(plans), None, heartbeat_s=1)
    engine.reclaimer, calls = fake_reclaimer()
    for _ in range(3):
        engine.step()
    assert calls == []
    engine.step()  # the first idle plan
    assert engine.reclaimer.reclaims == 1
    engine.step()
    engine.step()
    assert engine.reclaimer.reclaims == 1


@pytest.fixture(scope="module")
def loaded(models_dir):
    return load_tiny(models_dir)


def test_an_idle_engine_keeps_no_mlx_buffer_cache_after_requests(loaded):
    """Before the fix, an idle rank kept what its last decode steps freed in MLX's cache
    (12 MB per rank in the soak; mlx-lm clears it only every 512 decode steps)."""
    engine = make_engine(loaded, None, max_batch_size=8, prefill_chunk=128)
    prompts = [random_prompt(n, seed=n) for n in (5, 23, 41, 77, 130, 9, 64, 200)]
    run_requests(engine, prompts, max_tokens=12)
    engine.reclaimer.min_interval_s = 0.0  # no rate limit inside a test
    engine.step()  # nothing queued: an idle plan
    assert engine.idle
    assert engine.reclaimer.reclaims >= 1
    assert mx.get_cache_memory() == 0


@pytest.mark.skipif(_libc_trim() is None, reason="no malloc_trim in this C library (not glibc)")
def test_glibc_gives_back_freed_arena_pages_on_reclaim():
    """The mechanism the reclaimer relies on: freed chunks between live ones stay resident until
    malloc_trim(0) (sizes above pymalloc's 512 B and below glibc's mmap threshold)."""
    from mlx_cluster.engine.memory import rss_kb

    keep, scratch = [], []
    for i in range(6000):
        (keep if i % 4 == 0 else scratch).append(bytes(12_000 + (i % 7) * 64))
    del scratch
    before = rss_kb()
    IdleReclaimer(clear_cache=lambda: None).reclaim()
    assert before - rss_kb() > 20_000  # ~50 MB freed between the live quarter
    del keep


@pytest.mark.skipif(_libc_trim() is None, reason="no glibc")
def test_large_frees_go_back_to_the_os_with_the_mmap_threshold_pinned():
    """Without the pin, freeing a 4 MB block raises glibc's mmap threshold to 4 MB: the 512 KB
    blocks after it come from the heap, and once freed under a live block they stay resident.

    In a fresh process: glibc serves a large request from a free chunk the heap already holds,
    whatever the threshold, and the tests before this one leave such chunks behind (it failed
    about one run in three after them)."""
    code = """
from mlx_cluster.engine.memory import fix_mmap_threshold, rss_kb

assert not fix_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"})  # the operator's setting wins
assert fix_mmap_threshold({})
big = b"x" * (4 << 20)
del big
blocks = [b"y" * (512 << 10) for _ in range(40)]  # 20 MB, every page touched
live = [b"z" * 2000 for _ in range(100)]  # live blocks after them
before = rss_kb()
del blocks
assert before - rss_kb() > 15_000, (before, rss_kb())
del live
"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
