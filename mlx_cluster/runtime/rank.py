"""One rank of the cluster: `python -m mlx_cluster.runtime.rank`, started by the launcher.

Every rank joins the mx.distributed group, loads its shard of the model and runs the same
engine loop on an engine thread. Rank 0 also serves HTTP on the main thread (uvicorn) and
schedules. The launcher passes everything through environment variables (see
`launcher/placement.py`), never through the command line, so no secret shows up in `ps`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from mlx_cluster.config import ClusterConfig, config_from_json

log = logging.getLogger("mlx_cluster.rank")

EXIT_ENGINE_FAILED = 70
FAIL_FLUSH_S = 1.0  # rank 0 lets the HTTP thread send the error responses before exiting


class RankContext:
    """What this process is: its rank, the group, the config and rank 0's shared server state."""

    def __init__(self, config: ClusterConfig, rank: int, world_size: int, environ=os.environ):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        # The plan link's address (rank 0 listens there); the variable kept its first name.
        self.plan_link_addr = environ.get("MLX_CLUSTER_DOORBELL", "127.0.0.1:0")
        self.bus_token = environ.get("MLX_CLUSTER_BUS_TOKEN", "")
        self.status_link_addr = environ.get("MLX_CLUSTER_STATUS_LINK", "")
        self.restarts = int(environ.get("MLX_CLUSTER_RESTARTS", "0"))
        http_fd = environ.get("MLX_CLUSTER_HTTP_FD")
        self.http_fd = int(http_fd) if http_fd else None
        parent = environ.get("MLX_CLUSTER_PARENT_PID")
        self.parent_pid = int(parent) if parent else None
        self.watch_stdin = environ.get("MLX_CLUSTER_WATCH_STDIN") == "1"
        self.backend = environ.get("MLX_CLUSTER_BACKEND", config.cluster.backend)
        self.group = None
        self.layout = None  # the tensor x pipeline layout (runtime/stages.py)
        self.state = None  # ServerState on rank 0
        self.frontend = None
        self.engine = None
        self.status = None  # runtime/status_link.py RankStatus
        self.uvicorn_server = None
        self.exit_code = 0


def materialize_files(environ=os.environ) -> None:
    """Backends read some settings from files (MLX_HOSTFILE, MLX_IBV_DEVICES): write them here,
    on the rank's own machine, from the content the launcher shipped in MLX_CLUSTER_FILES."""
    import json
    import tempfile

    for name, content in json.loads(environ.get("MLX_CLUSTER_FILES", "{}")).items():
        fd, path = tempfile.mkstemp(prefix=f"mlx-cluster-{name.lower()}-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        environ[name] = path


def init_group(ctx: RankContext):
    import mlx.core as mx

    from mlx_cluster.launcher.placement import backend_device_error, cuda_available

    if ctx.world_size == 1:
        return mx.distributed.init()
    error = backend_device_error(ctx.backend, ctx.world_size, cuda_available())
    if error:  # remote ranks: the launcher could only check its own machine
        raise RuntimeError(error)
    group = mx.distributed.init(backend=ctx.backend, strict=True)
    if group.size() != ctx.world_size or group.rank() != ctx.rank:
        raise RuntimeError(
            f"mx.distributed gave rank {group.rank()} of {group.size()}, expected {ctx.rank} of {ctx.world_size}"
        )
    return group


def build_engine(ctx: RankContext, stream):
    """Load the shard, warm up, connect the bus; returns the Engine (runs on the engine thread).

    Everything MLX runs on one stream: collectives on two streams could interleave differently
    on different ranks, and the ranks would deadlock or sum each other's buffers.
    """
    import mlx.core as mx

    from mlx_cluster.agent.formats import marker_token_ids
    from mlx_cluster.engine.adapters import AdapterScheduler
    from mlx_cluster.engine.engine import Engine
    from mlx_cluster.engine.frontend import Frontend
    from mlx_cluster.engine.trace import StepTrace
    from mlx_cluster.runtime.bus import ControlBus, PlanLink
    from mlx_cluster.runtime.status_link import RankStatus
    from mlx_cluster.server.generation import Limits
    from mlx_cluster.server.turn import make_agent_setup

    cfg = ctx.config
    loaded, layouts = read_model(ctx, cfg)
    served = serve_model(ctx, cfg, loaded, layouts, stream)
    executor, prefix_cache, adapters = served.executor, served.prefix_cache, served.adapters
    speculator, vocab_size, budget = served.speculator, served.vocab_size, served.budget
    sched = cfg.scheduler

    host, _, port = ctx.plan_link_addr.rpartition(":")
    link = PlanLink(ctx.rank, ctx.world_size, host, int(port), ctx.bus_token, cfg.supervisor.startup_timeout_s)
    sup = cfg.supervisor
    # Per-rank reports for the dashboard travel on their own link, never on the lock-step plan link.
    ctx.status = RankStatus(
        ctx.rank, ctx.world_size, ctx.status_link_addr, ctx.bus_token, sup.heartbeat_s, sup.startup_timeout_s
    )
    link.connect()
    ctx.status.joined()
    bus = ControlBus(link, silence_timeout_s=sup.collective_timeout_s)
    if prefix_cache is not None:
        prefix_cache.agree_min = bus.agree_min
    executor.agree_min = bus.agree_min
    if speculator is not None:
        speculator.agree(bus.agree_min)
        log.info(
            "speculative decoding: a verify costs %.2f plain steps with 1 proposal, %.2f with %d (slowest rank)",
            speculator.cost.narrow,
            speculator.cost.wide,
            speculator.num_tokens,
        )
        if not speculator.pays:
            log.warning(
                "speculative decoding will not run: even a fully accepted verify costs more than it yields here"
            )

    frontend = None
    if ctx.rank == 0:
        frontend = Frontend(
            loaded.tokenizer,
            max_batch_size=sched.max_batch_size,
            max_new_per_step=sched.prefill_batch_size,
            max_queue=sched.max_queue,
            prefix_cache=prefix_cache,
            max_kv_tokens=budget.tokens,
        )
        ctx.frontend = frontend
        if adapters is not None:
            frontend.adapter_scheduler = AdapterScheduler(adapters)
        state = ctx.state
        state.adapters = adapters
        state.tokenizer = loaded.tokenizer
        state.agent = agent = make_agent_setup(cfg.model, loaded.tokenizer, vocab_size)
        # Tool-call and think markers may be special tokens; the parsers must see them in the text.
        frontend.hidden_ids -= marker_token_ids(loaded.tokenizer, (agent.tool_format, agent.reasoning))
        state.frontend = frontend
        state.prefix_cache = prefix_cache
        state.bus_stats = bus.stats
        state.speculator = speculator
        context = loaded.config.get("max_position_embeddings") or 4096
        state.limits = Limits(
            context_length=context,
            max_prompt_tokens=sched.max_prompt_tokens,
            default_max_tokens=sched.default_max_tokens,
            max_tokens_cap=sched.max_tokens_cap,
            vocab_size=vocab_size,
        )
    if prefix_cache is not None and ctx.world_size > 1:
        ctx.status.track_prefetches(prefix_cache, frontend)  # workers say when their SSD reads are done
    engine = Engine(executor, bus, frontend, heartbeat_s=sup.heartbeat_s, trace=StepTrace.from_env(ctx.rank))
    ctx.engine = engine
    if cfg.models is not None:  # several models: lanes around the one just loaded (engine/models.py)
        from mlx_cluster.runtime.model_lanes import attach_models

        attach_models(ctx, engine, served, stream, bus)
    on_report = None
    if ctx.state is not None:
        from mlx_cluster.server.status import attach_status

        on_report = attach_status(ctx.state, ctx.status.board, ctx.restarts)
    ctx.status.start(engine, on_report)
    mx.synchronize()
    return engine


def read_model(ctx: RankContext, cfg):
    """Read this rank's shard of `cfg.model` and fuse its projections: no collective runs here,
    so a rank that fails can tell the others before any of them waits in an all_sum."""
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.fuse import fuse_projections
    from mlx_cluster.models.lora import linear_layouts
    from mlx_cluster.runtime.stages import load_rank_model

    t0 = time.monotonic()
    path = resolve_model_path(cfg.model.path, cfg.model.builtin_dir)
    # All tensor parallel (the loader as before) or this rank's pipeline stage.
    loaded, ctx.layout = load_rank_model(cfg, path, ctx.group, ctx.rank)
    log.info(
        "loaded %s shard %d/%d in %.1f s (%.1f MB read)",
        cfg.model.path,
        ctx.rank,
        ctx.world_size,
        time.monotonic() - t0,
        loaded.bytes_read / 1e6,
    )
    layouts = linear_layouts(loaded.model, ctx.group, loaded.shard_specs)  # before fusion: LoRA sharding
    # One matmul for q/k/v and one for gate/up: fewer kernels per decode step (LoRA layers,
    # MoE experts and other shapes are left as they are).
    log.info("fused %d projection groups", fuse_projections(loaded.model))
    return loaded, layouts


@dataclass
class ServedModel:
    """A loaded model ready to run steps on this rank: its executor and what hangs off it."""

    loaded: object
    executor: object
    prefix_cache: object
    adapters: object
    speculator: object
    vocab_size: int
    budget: object


def serve_model(ctx: RankContext, cfg, loaded, layouts, stream) -> ServedModel:
    """Build the executor of a read model and warm it up (the model's all_sums run here)."""
    from mlx_cluster import constrain
    from mlx_cluster.engine.adapters import attach_adapters
    from mlx_cluster.engine.executor import Executor, warmup
    from mlx_cluster.engine.kv_quant import kv_budget, resolve_live_kv
    from mlx_cluster.engine.speculate import make_speculator
    from mlx_cluster.engine.verify_cost import measure_verify_cost
    from mlx_cluster.launcher.layout import microbatch_count

    vocab_size = loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size
    constrain.install(loaded.tokenizer, vocab_size)  # every rank builds grammar matchers from this
    sched = cfg.scheduler
    live_kv = resolve_live_kv(cfg.cache, loaded.model)  # quantized live KV, or None (engine/kv_quant.py)
    budget = kv_budget(sched.max_kv_tokens, loaded.model, live_kv, ctx.rank)
    # Every rank builds the same speculator (a draft model whole on each): proposals need no bus.
    speculator = make_speculator(cfg.speculative, loaded.tokenizer, vocab_size, cfg.model.builtin_dir)
    executor = Executor(
        loaded.model,
        vocab_size=vocab_size,
        max_batch_size=sched.max_batch_size,
        prefill_batch_size=sched.prefill_batch_size,
        prefill_chunk=sched.prefill_chunk_tokens,
        stream=stream,
        live_kv=live_kv,
        speculator=speculator,
        microbatches=microbatch_count(cfg, ctx.layout),
    )
    from mlx_cluster.cache import supports_prefix_cache

    # The timed prefills only inform the prefix cache's cost model: none without a prefix cache.
    started = time.monotonic()
    prefill_timing = warmup(executor, token_id=0, prefill_tokens=256 if supports_prefix_cache(loaded.model) else 0)
    # On a fresh CUDA machine this is where mlx compiles its kernels: minutes with a quantized live KV.
    log.info("warm-up: every kind of step ran once in %.1f s", time.monotonic() - started)
    if speculator is not None:
        if not cfg.speculative.verify_cost:
            # What a verify costs here decides when rows speculate (agreed across ranks once the bus is up).
            speculator.cost = measure_verify_cost(executor, speculator)
        speculator.reset_stats()
    executor.stats.__init__()
    # Attached after the warmup so its throwaway sequence stores nothing.
    executor.prefix_cache = prefix_cache = make_prefix_cache(cfg.cache, loaded, ctx.group, live_kv)
    if prefix_cache is not None and prefill_timing:
        for tokens, seconds in prefill_timing:  # what a restore must beat, from the first request on
            prefix_cache.cost.observe_prefill(tokens, seconds)
        log.info(
            "prefill measured at start: %s",
            ", ".join(f"{tokens} tokens in {seconds * 1e3:.1f} ms" for tokens, seconds in prefill_timing),
        )
    adapters = attach_adapters(executor, loaded.model, layouts, ctx.group, cfg, prefix_cache)
    return ServedModel(loaded, executor, prefix_cache, adapters, speculator, vocab_size, budget)


def make_prefix_cache(cache_cfg, loaded, group, live_kv=None):
    """The prefix cache for this rank's shard, or None when the model's cache cannot be cut into blocks."""
    from mlx_cluster.cache import PrefixCache, kv_dtype, supports_prefix_cache

    if not supports_prefix_cache(loaded.model):
        log.warning("prefix caching is off: this model's KV cache is not a plain per-layer KVCache")
        return None
    cache = PrefixCache(
        cache_cfg, fingerprint=loaded.fingerprint, dtype=kv_dtype(loaded.model), group=group, live=live_kv
    )
    cache.calibrate()
    return cache


def engine_thread_main(ctx: RankContext) -> None:
    """Everything MLX happens on this thread: MLX streams belong to the thread that made them."""
    import mlx.core as mx

    from mlx_cluster.runtime.watchdog import Watchdog

    stream = mx.new_stream(mx.default_device())
    watchdog = None
    try:
        with mx.stream(stream):
            engine = build_engine(ctx, stream)
            watchdog = Watchdog(
                engine.timer,
                ctx.config.supervisor.collective_timeout_s,
                on_fatal=lambda reason: fail_rank(ctx, reason),
                parent_pid=None,
            ).start()
            if ctx.state is not None:
                ctx.state.engine_timer = engine.timer
                ctx.state.status = "ready" if ctx.state.status == "loading" else ctx.state.status
                log.info("ready: serving %s on rank 0 of %d", ctx.config.model.served_name, ctx.world_size)
            engine.run()
            engine.executor.close()  # flushes the prefix cache's RAM tier to SSD for the next start
            stats = engine.bus.stats
            log.info(
                "stopped after %d plans, %d bus messages, %d device syncs, %d agreements, %.1f KB",
                stats.plans,
                stats.messages,
                stats.device_syncs,
                stats.agreements,
                stats.bytes / 1e3,
            )
        if ctx.state is not None:
            ctx.state.status = "stopped"
    except BaseException as e:  # any failure here ends this rank; the supervisor decides what next
        log.error("engine failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, RuntimeError))
        fail_rank(ctx, f"{type(e).__name__}: {e}")
        os._exit(EXIT_ENGINE_FAILED)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if ctx.status is not None:
            ctx.status.close()
        if ctx.uvicorn_server is not None:
            ctx.uvicorn_server.should_exit = True


def fail_rank(ctx: RankContext, reason: str) -> None:
    """End every in-flight request with an error and report not-ready, before the process exits."""
    if ctx.state is None:
        return
    ctx.state.status = "dead"
    ctx.state.detail = reason
    if ctx.frontend is not None:
        ctx.frontend.fail_all(f"the cluster stopped serving ({reason}); retry after it restarts")
    time.sleep(FAIL_FLUSH_S)


def drain(ctx: RankContext) -> None:
    """SIGTERM on rank 0: stop taking requests, let running ones finish, then stop every rank."""
    state, frontend = ctx.state, ctx.frontend
    if state.status in ("draining", "stopped", "dead"):
        return
    state.status = "draining"
    timeout_s = ctx.config.supervisor.drain_timeout_s
    log.info("draining: finishing in-flight requests for up to %.0f s", timeout_s)
    if frontend is not None:
        deadline = time.monotonic() + timeout_s
        while frontend.has_work_threadsafe() and time.monotonic() < deadline:
            time.sleep(0.05)
        if frontend.has_work_threadsafe():
            frontend.abort_all("the server is shutting down")
        frontend.request_shutdown()
    elif ctx.uvicorn_server is not None:
        ctx.uvicorn_server.should_exit = True


def serve_http(ctx: RankContext) -> None:
    """Rank 0's main thread: uvicorn with our own signal handling (SIGTERM drains)."""
    import uvicorn

    from mlx_cluster.server.app import create_app
    from mlx_cluster.server.http_protocol import H11WithHeadTimeout
    from mlx_cluster.server.metrics import Metrics

    ctx.state.metrics = Metrics(ctx.config.model.served_name)
    from mlx_cluster.server.tracing import make_request_tracer

    ctx.state.metrics.tracer = make_request_tracer(ctx.config.server.otlp_endpoint, ctx.config.cluster.name)
    app = create_app(ctx.state)
    server_cfg = ctx.config.server
    kwargs = {"fd": ctx.http_fd} if ctx.http_fd is not None else {"host": server_cfg.host, "port": server_cfg.port}
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        http=H11WithHeadTimeout,  # uvicorn's h11, plus a deadline on each request head
        h11_max_incomplete_event_size=64 * 1024,
        **kwargs,
    )

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # keep ours (below): SIGTERM drains instead of cutting requests off
            yield

    server = Server(config)
    ctx.uvicorn_server = server

    def on_term(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=drain, args=(ctx,), name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    server.run()


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("MLX_CLUSTER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from mlx_cluster.engine.memory import fix_mmap_threshold

    fix_mmap_threshold()  # large MLX arrays are unmapped when freed, not left to fragment the heap
    from mlx_cluster.runtime.cpu_blas import use_cpu_blas_from_env

    # First of all, before anything imports mlx (parsing the config does, through mlx-lm): it
    # decides what mlx's cblas_sgemm binds to for the life of this process.
    log.info(use_cpu_blas_from_env())
    config = config_from_json(os.environ["MLX_CLUSTER_CONFIG"])
    rank = int(os.environ.get("MLX_RANK", "0"))
    world_size = int(os.environ.get("MLX_CLUSTER_WORLD_SIZE", "1"))
    ctx = RankContext(config, rank, world_size)

    from mlx_cluster.runtime.watchdog import Watchdog

    # Orphan protection from the first moment: exits if the launcher vanishes (or its SSH link).
    Watchdog(
        timer=_NeverBusy, timeout_s=1e9, on_fatal=lambda _: None, parent_pid=ctx.parent_pid, watch_stdin=ctx.watch_stdin
    ).start()
    materialize_files()
    ctx.group = init_group(ctx)
    log.info("rank %d of %d joined the %s group", rank, world_size, ctx.backend if world_size > 1 else "local")

    if rank == 0:
        from mlx_cluster.server.app import ServerState
        from mlx_cluster.server.auth import load_api_keys

        ctx.state = ServerState(
            config=config,
            world_size=world_size,
            api_keys=load_api_keys(config.server.api_key_file),
            wedged_after_s=config.server.wedged_after_s,
        )
        thread = threading.Thread(target=engine_thread_main, args=(ctx,), name="engine", daemon=True)
        ctx.state.engine_alive = thread.is_alive
        thread.start()
        serve_http(ctx)
        thread.join(timeout=10)
        sys.exit(0 if ctx.state.status == "stopped" else 1)
    else:
        # Workers follow rank 0's plans; SIGTERM alone must not cut a collective short.
        signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: waiting for rank 0's shutdown plan"))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine_thread_main(ctx)
        sys.exit(0)


class _NeverBusy:
    busy_since = 0.0
    phase = "idle"


if __name__ == "__main__":
    main()
