"""Load this rank's part of the model for the cluster's tensor x pipeline layout.

The rank computes the layout itself (every rank gets the same answer from the same config,
checkpoint headers and, for `parallel: auto`, link numbers averaged over the group), then:
all tensor parallel -> the loader as before; otherwise it loads only its stage's layers,
sharded over its stage's tensor ranks, and wires the stage edges (models/pipeline.py).
"""

from __future__ import annotations

import logging
import sys
import time

import mlx.core as mx

from mlx_cluster.launcher.layout import (
    LinkCost,
    ModelFacts,
    check_memory,
    format_plan,
    rank_plans,
    resolve_layout,
)
from mlx_cluster.models.loader import load_model_shard, resolve_local_path
from mlx_cluster.models.pipeline import (
    GroupView,
    Layout,
    check_pipelinable,
    drop_embedding,
    drop_other_layers,
    layout_fingerprint,
    wire_stage,
)

log = logging.getLogger(__name__)

PROBE_REPEATS = 5
PROBE_NAP_S = 1e-3
PROBE_BIG_VALUES = 1 << 20  # 4 MB of float32: long enough that bandwidth shows
# 4 KB of float32, the size of a decode step's hidden state (a few sequences): latency. Not one
# value: the ring backend's all_sum of a single value takes a slow path (8 ms against 0.3 ms for
# 2 to 2048 values, measured on 127.0.0.1), which made `auto` see a slow link on loopback.
PROBE_SMALL_VALUES = 1024


def _fastest_s(fn, repeats: int = PROBE_REPEATS) -> float:
    """The fastest of a few timed runs: interference (other threads, other processes on the
    machine) only ever adds time, so the fastest run is the closest to the link's own cost.
    Each run starts after a short sleep: on a busy machine a process that wakes from sleep is
    scheduled promptly, so both ranks are more likely on a core at once (measured on 2 loaded
    cores: the fastest of 10 back-to-back 4 KB all_sums on 127.0.0.1 took 7.7 ms, of 30 after
    a 1 ms nap 0.25 ms)."""
    fn()  # warm: first-call allocation and connection costs
    best = float("inf")
    for _ in range(repeats):
        time.sleep(PROBE_NAP_S)
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_link(group) -> LinkCost:
    """A few timed all_sums (4 KB: latency, 4 MB: bandwidth) and a matmul (weight streaming rate),
    averaged over the ranks with one more all_sum so every rank decides alike."""
    small = mx.zeros((PROBE_SMALL_VALUES,))
    big = mx.zeros((PROBE_BIG_VALUES,))
    weights, x = mx.ones((2048, 2048)), mx.ones((DECODE_ROWS, 2048))
    mx.eval(small, big, weights, x)
    # Rank 0 starts its HTTP server on the main thread meanwhile (imports: the GIL held for
    # seconds), and a thread whose all_sum has finished waits for the GIL: with the default 5 ms
    # switch interval a 1 ms link measured 48 ms per all_sum. A short interval for the probe only.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        alpha = _fastest_s(lambda: mx.eval(mx.distributed.all_sum(small, group=group)), 6 * PROBE_REPEATS)
        big_s = _fastest_s(lambda: mx.eval(mx.distributed.all_sum(big, group=group)))
        matmul_s = _fastest_s(lambda: mx.eval(x @ weights))
    finally:
        sys.setswitchinterval(switch_interval)
    mine = mx.array([alpha, big_s, matmul_s], dtype=mx.float32)
    alpha, big_s, matmul_s = (mx.distributed.all_sum(mine, group=group) / group.size()).tolist()
    return LinkCost(
        alpha_s=alpha,
        bandwidth_Bps=big.nbytes / max(big_s - alpha, 1e-9),
        weight_rate_Bps=weights.nbytes / max(matmul_s, 1e-9),
    )


DECODE_ROWS = 8


def load_rank_model(cfg, path: str, group, rank: int):
    """(LoadedModel, Layout) for this rank; rank 0 logs the plan of every rank."""
    model_dir = resolve_local_path(path, cfg.model.revision)
    from mlx_lm.utils import load_config

    facts = ModelFacts.of(load_config(model_dir), model_dir)
    link = measure_link(group) if cfg.cluster.parallel == "auto" else None
    layout = resolve_layout(cfg, facts, group.size(), link)
    plans = rank_plans(cfg, facts, layout)
    check_memory(cfg, plans)
    if rank == 0:
        log.info("placement:\n%s", format_plan(cfg, facts, layout, plans))
    kwargs = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if not layout.is_pipelined:
        return load_model_shard(path, group, **kwargs), layout
    if cfg.model.adapter_path is not None or cfg.adapters:
        # LoRA slots are laid out by layer path and tensor group (models/lora.py): not per stage yet.
        raise ValueError("model.adapter_path / adapters: LoRA adapters are not supported with pipeline stages yet")
    return load_stage(path, layout, rank, group, **kwargs), layout


def load_stage(path: str, layout: Layout, rank: int, group, **kwargs):
    """This rank's stage: its layers only, sharded over its stage's tensor ranks, edges wired."""
    start, end = layout.layers_of(rank)

    def keep_stage_layers(model):
        check_pipelinable(model)
        drop_other_layers(model, start, end)
        if layout.stage_of(rank) > 0 and drop_embedding(model):
            log.info("stage %d does not hold the token embedding (the head is untied)", layout.stage_of(rank))

    view = GroupView(layout.tensor_rank(rank), layout.tensor)
    loaded = load_model_shard(path, view, after_shard=keep_stage_layers, **kwargs)
    wire_stage(loaded.model, layout, rank, group)
    loaded.fingerprint = layout_fingerprint(loaded.fingerprint, layout)
    log.info("stage %d of %d: layers %d-%d", layout.stage_of(rank), layout.pipeline, start, end - 1)
    return loaded
