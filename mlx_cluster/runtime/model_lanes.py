"""Wires several models (`models:`, engine/models.py) into a rank: lanes, loaders, rank 0's fronts.

The model loaded at start-up is built exactly as a single `model:` is (runtime/rank.py); the
others get their lane here: on every rank the functions that read, warm up and size them, and
on rank 0 a tokenizer, chat/agent setup, limits and frontend from start-up, so their requests
are validated and queued before their weights are in memory.
"""

from __future__ import annotations

import logging

from mlx_cluster.engine.models import ModelLane, ModelSet

log = logging.getLogger(__name__)


def attach_models(ctx, engine, served, stream, bus) -> ModelSet:
    """Build the ModelSet of `ctx.config.models` around the already served start-up model."""
    from mlx_cluster import constrain
    from mlx_cluster.runtime.rank import read_model, serve_model

    cfg = ctx.config
    lanes = []
    for index, entry in enumerate(cfg.models):
        primary = entry.name == cfg.model.name
        lane = ModelLane(index, entry, cfg.model_copy(update={"model": entry}), pinned=primary or entry.preload)
        if primary:
            lane.served = served
            lane.stats.loads = 1  # its start-up load, as for model:
        if ctx.rank == 0:
            state = ctx.state
            if primary:
                lane.frontend, lane.tokenizer = ctx.frontend, state.tokenizer
                lane.agent, lane.limits = state.agent, state.limits
            else:
                _make_front(lane, cfg, wake=ctx.frontend._wake)  # one event: any queue wakes the engine
        lanes.append(lane)

    def serve(lane, read):
        result = serve_model(ctx, lane.config, *read, stream)
        # One set of counters for the rank, whichever model runs: status reports stay monotonic.
        result.executor.stats = served.executor.stats
        result.executor.agree_min = bus.agree_min
        if result.prefix_cache is not None:
            result.prefix_cache.agree_min = bus.agree_min
        return result

    def install(lane):  # grammar matchers are built against the tokenizer of the model that runs
        constrain.install(lane.served.loaded.tokenizer, lane.served.vocab_size)

    def loaded(lane):  # several ranks: workers tell rank 0 when this model's SSD reads are done
        if lane.served.prefix_cache is not None and ctx.world_size > 1:
            ctx.status.track_prefetches(lane.served.prefix_cache, lane.frontend)

    models = ModelSet(
        lanes,
        read=lambda lane: read_model(ctx, lane.config),
        serve=serve,
        fit=lambda lane: model_fit(lane.config, ctx.rank, ctx.world_size),
        agree_min=bus.agree_min,
        idle_unload_s=cfg.idle_unload_s,
        world_size=ctx.world_size,
        on_install=install,
        on_loaded=loaded,
    )
    engine.models = models
    if ctx.rank == 0:
        ctx.state.models = models
        ctx.frontend = models  # drain and failures reach every model's queue
    log.info(
        "serving %d models: %s (loaded at start-up: %s)",
        len(lanes),
        ", ".join(models.names()),
        ", ".join(lane.name for lane in lanes if lane.pinned),
    )
    return models


def _model_dir(model_cfg):
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import resolve_local_path

    return resolve_local_path(resolve_model_path(model_cfg.path, model_cfg.builtin_dir), model_cfg.revision)


def _make_front(lane: ModelLane, cfg, wake) -> None:
    """Rank 0: what a model's requests need before its weights load (read from its directory)."""
    from mlx_lm.utils import load_config, load_tokenizer

    from mlx_cluster.agent.formats import marker_token_ids
    from mlx_cluster.engine.frontend import Frontend
    from mlx_cluster.server.generation import Limits
    from mlx_cluster.server.turn import make_agent_setup

    entry, sched = lane.entry, cfg.scheduler
    model_dir = _model_dir(entry)
    config = load_config(model_dir)
    extra = {"trust_remote_code": True} if entry.trust_remote_code else None
    tokenizer = load_tokenizer(model_dir, extra, eos_token_ids=config.get("eos_token_id"))
    vocab_size = config.get("vocab_size") or tokenizer.vocab_size
    lane.tokenizer = tokenizer
    lane.agent = agent = make_agent_setup(entry, tokenizer, vocab_size)
    lane.limits = Limits(
        context_length=config.get("max_position_embeddings") or 4096,
        max_prompt_tokens=sched.max_prompt_tokens,
        default_max_tokens=sched.default_max_tokens,
        max_tokens_cap=sched.max_tokens_cap,
        vocab_size=vocab_size,
    )
    # The prefix cache and the exact KV budget come with the weights (Frontend.attach_cache at
    # each load); until then the configured budget (a lower bound: quantized KV fits more)
    # turns away a request that could never fit instead of queueing it for ever.
    lane.frontend = frontend = Frontend(
        tokenizer,
        max_batch_size=sched.max_batch_size,
        max_new_per_step=sched.prefill_batch_size,
        max_queue=sched.max_queue,
        max_kv_tokens=sched.max_kv_tokens,
        wake=wake,
    )
    frontend.hidden_ids -= marker_token_ids(tokenizer, (agent.tool_format, agent.reasoning))


def model_fit(lane_cfg, rank: int, world_size: int) -> tuple[int, int]:
    """(bytes needed from this rank's memory: its weights / TP from the safetensors headers plus
    the KV budget, bytes of that memory available now). A GPU is the rank's own; a host's RAM
    (CPU, Apple unified memory) is shared by its ranks, so their needs add up."""
    from mlx_lm.utils import load_config

    from mlx_cluster.cache.sizing import available_memory
    from mlx_cluster.launcher.layout import ModelFacts, make_layout, rank_plans

    model_dir = _model_dir(lane_cfg.model)
    facts = ModelFacts.of(load_config(model_dir), model_dir)
    plans = rank_plans(lane_cfg, facts, make_layout(lane_cfg, facts, world_size, 1))
    free, what = available_memory()
    mine = plans[rank]
    sharing = [mine] if what == "GPU memory" else [p for p in plans if p.host == mine.host]
    return sum(p.weight_bytes + p.kv_budget_bytes for p in sharing), free
