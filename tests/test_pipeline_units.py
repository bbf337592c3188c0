"""Layouts without a cluster: config checks, uneven stages, the auto cost model, `mlx-cluster plan`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlx_cluster.config import ConfigError, load_config
from mlx_cluster.launcher.layout import (
    LayoutError,
    LinkCost,
    ModelFacts,
    choose_auto,
    rank_plans,
    resolve_layout,
)
from mlx_cluster.models.pipeline import Layout, split_layers
from tests.cluster import REPO

# builtin:tiny's shape; 4 MB per layer, 4 MB of embedding + head.
TINY = ModelFacts(
    num_layers=4,
    hidden=256,
    heads=8,
    kv_heads=4,
    head_dim=32,
    intermediate=704,
    layer_bytes=(4_000_000,) * 4,
    other_bytes=4_000_000,
)
# A deep model on a slow link: TP's 2 all_sums per layer cost more than splitting the compute saves.
DEEP = ModelFacts(80, 8192, 64, 8, 128, 28672, (800_000_000,) * 80, 2_000_000_000)


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_split_layers_is_proportional_and_gives_every_stage_a_layer():
    assert split_layers(4, [1, 1]) == [2, 2]
    assert split_layers(4, [1, 1, 1]) == [2, 1, 1]
    assert split_layers(10, [64, 192]) == [3, 7]
    assert split_layers(3, [1, 1000, 1]) == [1, 1, 1]
    with pytest.raises(ValueError, match="4 layers, fewer than the 5 pipeline stages"):
        split_layers(4, [1] * 5)


def test_default_is_all_tensor_and_pipeline_sizes_follow_each_other():
    assert resolve_layout(cfg("hosts=[{host: localhost, ranks: 2}]"), TINY, 2) == Layout(
        2, 1, ((0, 4),), "default: all tensor parallel"
    )
    layout = resolve_layout(cfg("hosts=[{host: localhost, ranks: 4}]", "cluster.parallel={pipeline: 2}"), TINY, 4)
    assert (layout.tensor, layout.pipeline, layout.stages) == (2, 2, ((0, 2), (2, 4)))
    assert [layout.stage_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.tensor_rank(r) for r in range(4)] == [0, 1, 0, 1]


def test_parallel_sizes_must_multiply_to_the_world_size():
    with pytest.raises(ConfigError, match=r"cluster.parallel: tensor x pipeline must equal the 3 ranks"):
        cfg("hosts=[{host: localhost, ranks: 3}]", "cluster.parallel={tensor: 2, pipeline: 2}")
    with pytest.raises(ConfigError, match=r"cluster.parallel: .*pipeline: Input should be greater than or equal to 1"):
        cfg("cluster.parallel={pipeline: 0}")
    with pytest.raises(ConfigError, match=r"cluster.parallel: .*must be auto or \{tensor: T, pipeline: P\}"):
        cfg("cluster.parallel=fast")


def test_three_ranks_on_eight_heads_are_refused_as_tensor_with_the_fix():
    with pytest.raises(LayoutError) as e:
        resolve_layout(cfg("hosts=[{host: localhost, ranks: 3}]"), TINY, 3)
    message = str(e.value)
    assert "4 KV heads, which 3 ranks cannot split evenly" in message
    assert "cluster.parallel: {tensor: 1, pipeline: 3}" in message


def test_uneven_layers_follow_hosts_layers_or_memory():
    hosts = "hosts=[{host: localhost, ranks: 1, layers: 1}, {host: 10.0.0.2, ranks: 1, layers: 3}]"
    layout = resolve_layout(cfg(hosts, "cluster.parallel={pipeline: 2}"), TINY, 2)
    assert layout.stages == ((0, 1), (1, 4)) and "hosts[].layers" in layout.reason
    hosts = "hosts=[{host: localhost, ranks: 1, memory_gb: 64}, {host: 10.0.0.2, ranks: 1, memory_gb: 192}]"
    layout = resolve_layout(cfg(hosts, "cluster.parallel={pipeline: 2}"), TINY, 2)
    assert layout.stages == ((0, 1), (1, 4)) and "memory_gb" in layout.reason
    bad = "hosts=[{host: localhost, ranks: 1, layers: 2}, {host: 10.0.0.2, ranks: 1, layers: 3}]"
    with pytest.raises(LayoutError, match="they add up to 5, the model has 4 layers"):
        resolve_layout(cfg(bad, "cluster.parallel={pipeline: 2}"), TINY, 2)
    with pytest.raises(ConfigError, match=r"hosts.1.layers: give layers: for every host or for none"):
        cfg("hosts=[{host: localhost, ranks: 1, layers: 2}, {host: 10.0.0.2, ranks: 1}]")


def test_rank_plans_count_only_the_stage_layers():
    config = cfg("hosts=[{host: localhost, ranks: 4}]", "cluster.parallel={tensor: 2, pipeline: 2}")
    plans = rank_plans(config, TINY, resolve_layout(config, TINY, 4))
    assert [p.layers for p in plans] == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert {p.heads for p in plans} == {4} and {p.kv_heads for p in plans} == {2}
    assert plans[0].weight_bytes == 4_000_000 + 2 * 4_000_000 // 2
    assert plans[0].kv_bytes_per_token == 2 * 2 * 2 * 32 * 2


def test_auto_picks_tensor_on_a_fast_link_and_pipeline_on_a_slow_one():
    config = cfg("hosts=[{host: localhost, ranks: 2}]", "cluster.parallel=auto")
    fast = LinkCost(alpha_s=5e-6, bandwidth_Bps=50e9, weight_rate_Bps=400e9)
    slow = LinkCost(alpha_s=600e-6, bandwidth_Bps=0.125e9, weight_rate_Bps=400e9)
    assert (choose_auto(config, DEEP, 2, fast).tensor, choose_auto(config, DEEP, 2, fast).pipeline) == (2, 1)
    layout = choose_auto(config, DEEP, 2, slow)
    assert (layout.tensor, layout.pipeline) == (1, 2)
    assert layout.reason.startswith("auto: link 600 us per all_sum") and "T1xP2" in layout.reason
    # Heads that do not divide: the only fitting layout, whatever the link.
    three = choose_auto(cfg("hosts=[{host: localhost, ranks: 3}]", "cluster.parallel=auto"), TINY, 3, fast)
    assert (three.tensor, three.pipeline) == (1, 3)


def test_auto_on_a_slow_cpu_weighs_the_link_against_compute():
    """Numbers measured on the 2-core CI machine (benchmarks/slow_link.py): matmuls stream
    ~0.15 GB/s of weights, so one tiny decode step is ~100 ms of compute. A 0.3 ms link (1 ms
    per all_sum) costs TP=2 8 ms a step, far less than the 50 ms it saves: tensor. At 25 ms each
    way (50 ms per all_sum) the 8 all_sums cost more than the saving: pipeline."""
    config = cfg("hosts=[{host: localhost, ranks: 2}]", "cluster.parallel=auto")

    def pick(alpha_s: float) -> tuple[int, int]:
        layout = choose_auto(config, TINY, 2, LinkCost(alpha_s, bandwidth_Bps=0.1e9, weight_rate_Bps=0.15e9))
        return layout.tensor, layout.pipeline

    assert pick(0.3e-3) == (2, 1)  # loopback
    assert pick(1e-3) == (2, 1)  # 0.3 ms each way
    assert pick(50e-3) == (1, 2)  # 25 ms each way


def test_plan_command_prints_every_rank_without_starting_anything(tmp_path, tiny_model_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "cluster: {parallel: {pipeline: 3}}\n"
        "hosts: [{host: localhost, ranks: 1, memory_gb: 64}, {host: 10.0.0.2, ranks: 2, memory_gb: 192}]\n"
        f"model: {{path: {tiny_model_path}}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "plan", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert "layout: tensor=1 x pipeline=3 (layers per stage: 0-0, 1-2, 3-3)" in out.stdout
    assert "3 all_sums over all 3 ranks" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("   ")]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("0", "localhost", "0-0"),
        ("1", "10.0.0.2", "1-2"),
        ("2", "10.0.0.2", "3-3"),
    ]
    tight = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "plan", str(path), "--set", "scheduler.max_kv_tokens=200000000"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert tight.returncode == 2 and "hosts.0.memory_gb=64: its ranks need" in tight.stderr


def test_microbatches_are_one_or_the_pipeline_size_on_a_pure_pipeline():
    from mlx_cluster.launcher.layout import microbatch_count

    four = "hosts=[{host: localhost, ranks: 4}]"
    assert microbatch_count(cfg(four, "cluster.parallel={pipeline: 4}"), Layout(1, 4, ())) == 4
    assert microbatch_count(cfg(four, "cluster.parallel={pipeline: 4, microbatches: 1}"), Layout(1, 4, ())) == 1
    assert microbatch_count(cfg(four, "cluster.parallel={pipeline: 2}"), Layout(2, 2, ())) == 1  # hybrid
    assert microbatch_count(cfg(four), Layout(4, 1, ())) == 1  # all tensor: as before
    with pytest.raises(ConfigError, match=r"cluster.parallel.microbatches: 3 micro-batches for 4 pipeline stage"):
        cfg(four, "cluster.parallel={pipeline: 4, microbatches: 3}")
    with pytest.raises(ConfigError, match=r"cluster.parallel.microbatches: micro-batches need tensor: 1"):
        cfg(four, "cluster.parallel={pipeline: 2, microbatches: 2}")
    with pytest.raises(ConfigError, match=r"cluster.parallel.microbatches: speculative decoding"):
        cfg(four, "cluster.parallel={pipeline: 4, microbatches: 4}", "speculative={method: ngram}")
