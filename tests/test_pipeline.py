"""Pipeline and hybrid layouts served for real (`mlx-cluster up`, ring on loopback):

- 3 ranks on builtin:tiny (8 heads, 4 KV heads: tensor parallelism cannot split them), with
  `parallel: auto`, which measures the link and can only pick 3 pipeline stages;
- tensor 2 x pipeline 2 on 4 ranks;

both give the very same tokens as one rank, greedy and seeded, alone and batched, and a
killed or stopped middle stage takes the group down and restarts it like any rank.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster import SCHEDULING_SLACK_S, Cluster, pid_alive
from tests.test_faults import (
    DEATH_BOUND_S,
    HEARTBEAT_S,
    STALL_BOUND_S,
    TIMEOUT_S,
    WINDOW_S,
    generate_ok,
    seconds_until_dead,
    up_past_the_window,
    wait_restarted,
)
from tests.test_multirank import PROMPTS, complete

pytestmark = pytest.mark.slow

SUPERVISOR = {
    "max_restarts": 20,
    "collective_timeout_s": TIMEOUT_S,
    "heartbeat_s": HEARTBEAT_S,
    "restart_window_s": WINDOW_S,
    "backoff_s": 0.2,
}


@pytest.fixture(scope="module")
def one(tmp_path_factory, models_dir):
    with Cluster(tmp_path_factory.mktemp("one"), ranks=1, models_dir=models_dir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def three(tmp_path_factory, models_dir):
    config = {"cluster": {"parallel": "auto"}, "supervisor": SUPERVISOR}
    with Cluster(tmp_path_factory.mktemp("three"), ranks=3, models_dir=models_dir, config=config) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, models_dir):
    config = {"cluster": {"parallel": {"tensor": 2, "pipeline": 2}}}
    with Cluster(tmp_path_factory.mktemp("hybrid"), ranks=4, models_dir=models_dir, config=config) as cluster:
        yield cluster


def test_auto_picks_three_stages_and_says_why(three):
    out = three.output()
    assert "layout: tensor=1 x pipeline=3 (layers per stage: 0-1, 2-2, 3-3)" in out
    assert "why: auto: link" in out and "us per all_sum" in out
    assert "decode runs 3 micro-batches in flight across the 3 pipeline stages" in out
    # Each rank read only its own layers (plus embedding and head).
    for stage, layers in enumerate(("0-1", "2-2", "3-3")):
        assert f"stage {stage} of 3: layers {layers}" in out


def test_three_ranks_are_token_identical_to_one(one, three):
    for prompt in PROMPTS:
        assert complete(three, prompt, temperature=0) == complete(one, prompt, temperature=0), prompt
    seeded = dict(temperature=0.9, top_p=0.95, seed=7)
    assert complete(three, PROMPTS[1], **seeded) == complete(one, PROMPTS[1], **seeded)


def test_three_ranks_batched_are_token_identical_to_one(one, three):
    alone = [complete(one, p, temperature=0) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        together = list(pool.map(lambda p: complete(three, p, temperature=0), PROMPTS * 2))
    assert together == alone * 2


def test_prefix_cache_hits_restore_each_stage_its_own_layers(one, three):
    """Cached blocks are per rank (its layers only); a hit must give the tokens of a cold start."""
    prompt = "The cluster serves every rank the same plan. " * 6
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    cold = three.post("/v1/completions", body).json()
    warm = three.post("/v1/completions", body).json()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= warm["usage"]["prompt_tokens"] - 16
    reference = one.post("/v1/completions", body).json()["choices"][0]["text"]
    assert cold["choices"][0]["text"] == warm["choices"][0]["text"] == reference


def test_tensor_two_by_pipeline_two_is_token_identical_to_one(one, hybrid):
    assert "layout: tensor=2 x pipeline=2 (layers per stage: 0-1, 2-3)" in hybrid.output()
    assert "micro-batches in flight" not in hybrid.output()  # hybrid stages run one forward pass at a time
    alone = [complete(one, p, temperature=0) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(hybrid, p, temperature=0), PROMPTS))
    assert together == alone


def test_killed_middle_stage_restarts_the_group(three, one):
    pids, out = up_past_the_window(three)
    os.kill(pids[1], signal.SIGKILL)
    took = seconds_until_dead(three, pids[0], "rank 0 after the middle stage died", DEATH_BOUND_S)
    assert took < DEATH_BOUND_S + SCHEDULING_SLACK_S, f"rank 0 noticed after {took:.2f} s"
    wait_restarted(three, pids, out)
    assert complete(three, PROMPTS[0], temperature=0) == complete(one, PROMPTS[0], temperature=0)


def test_stopped_middle_stage_trips_the_watchdog(three):
    pids, out = up_past_the_window(three)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        took = seconds_until_dead(three, pids[0], "rank 0's watchdog", STALL_BOUND_S)
        assert took < STALL_BOUND_S + SCHEDULING_SLACK_S, f"rank 0 exited after {took:.2f} s"
        wait_restarted(three, pids, out)
    finally:
        if pid_alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    generate_ok(three)
