"""Several models in one cluster (`models:` in cluster.yaml): load on first use, unload when idle.

Each configured model is a `ModelLane`: on every rank its own `Executor` while it is loaded
(its own batch, prefix cache namespace, digest); on rank 0 also its own `Frontend` (its own
bounded queue), tokenizer, chat/agent setup and limits, which exist from start-up so requests
can be validated and queued before the weights are in memory.

One engine step runs one lane. Rank 0 chooses it (round robin over the loaded lanes that have
work, so two busy models take turns step by step) and writes its index in the plan, together
with the loads and unloads every rank must do first (`ModelOp`): every rank changes what it
holds at the same step, and the sampled tokens of each lane are checked with that lane's own
digest. A load is one step that blocks the loop for the load time: it is announced in the plan,
never done on the side, because the model's warm-up runs all_sums every rank must join.

A load is two halves with one agreement between them: every rank checks the model fits (weights
from the safetensors headers, divided by the tensor size, plus the KV budget, against the
memory available now) and reads its shard (no collective), then the ranks agree on the least
free memory, the largest need, and whether each read succeeded; only if all can does every
rank warm up and serve it. So a model that does not fit, or a path missing on one host, is a
clear error for that model's requests, never a split cluster.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mlx_cluster.engine.plan import FLAG_IDLE, FLAG_SHUTDOWN, MODEL_LOAD, MODEL_UNLOAD, ModelOp, StepPlan

log = logging.getLogger(__name__)

_MB = 1 << 20
_INT32_MAX = (1 << 31) - 1


def check_models_config(cfg):
    """Validate `models:` / `idle_unload_s`; return the model loaded at start-up (None without models:)."""
    if cfg.models is None:
        if cfg.idle_unload_s is not None:
            raise ValueError("idle_unload_s only applies to several models: list them under models: or remove it")
        return None
    if "model" in cfg.model_fields_set:
        raise ValueError(
            "give either model: (one model) or models: (several), not both; "
            "move model: into models: as an entry {name: ..., path: ...}"
        )
    if not cfg.models:
        raise ValueError("models: must list at least one model, e.g. [{name: tiny, path: builtin:tiny}]")
    names = [m.name for m in cfg.models]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"models: the name {name!r} is used twice; each model needs its own name")
    if cfg.adapters or any(m.adapter_path for m in cfg.models):
        raise ValueError(
            "adapters: / models[].adapter_path: LoRA adapters are not supported with models: yet; "
            "serve adapters with a single model:"
        )
    if cfg.speculative is not None:
        raise ValueError("speculative: is not supported with models: yet; remove it or serve a single model:")
    parallel = cfg.cluster.parallel
    if parallel == "auto" or (parallel is not None and (parallel.pipeline or 1) > 1):
        raise ValueError(
            "cluster.parallel: models: runs every model tensor parallel over all ranks; "
            "remove cluster.parallel or set {pipeline: 1}"
        )
    return next((m for m in cfg.models if m.preload), cfg.models[0])


@dataclass
class LaneStats:
    """Per model: plain counters for /metrics and /v1/models."""

    loads: int = 0
    unloads: int = 0
    refusals: int = 0  # loads refused (does not fit, or a rank could not read it)
    last_load_s: float = 0.0


@dataclass
class ModelLane:
    """One configured model: what every rank holds of it, and (rank 0) what serves its requests."""

    index: int
    entry: object  # config.ModelEntry
    config: object  # the ClusterConfig with model: set to this entry (what loading reads)
    pinned: bool  # loaded at start-up and never unloaded
    served: object | None = None  # runtime/rank.py ServedModel while loaded
    # rank 0 only
    frontend: object | None = None
    tokenizer: object | None = None
    agent: object | None = None
    limits: object | None = None
    last_used: float = field(default_factory=time.monotonic)
    need_bytes: int = 0  # rank 0's estimate: weights / TP + KV budget
    stats: LaneStats = field(default_factory=LaneStats)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def loaded(self) -> bool:
        return self.served is not None

    @property
    def executor(self):
        return self.served.executor if self.served is not None else None

    def has_work(self) -> bool:
        return self.frontend is not None and self.frontend.has_work


class ModelSet:
    """Every rank's lanes; rank 0 also decides which lane runs and what loads or unloads.

    `read(lane)` reads this rank's shard (no collective; raises on failure), `serve(lane, read)`
    warms it up and returns a ServedModel, `fit(lane)` is (bytes needed, bytes available here),
    `agree_min` is the control bus's element-wise minimum over ranks.
    """

    def __init__(
        self,
        lanes: list[ModelLane],
        *,
        read: Callable,
        serve: Callable,
        fit: Callable,
        agree_min: Callable[[list[int]], list[int]],
        idle_unload_s: float | None,
        world_size: int = 1,
        on_install: Callable | None = None,
        on_loaded: Callable | None = None,
    ):
        self.lanes = lanes
        self._read, self._serve, self._fit = read, serve, fit
        self.agree_min = agree_min
        self.idle_unload_s = idle_unload_s
        self.world_size = world_size
        self.on_install = on_install  # (lane) -> None: point per-tokenizer state at the lane that runs
        self.on_loaded = on_loaded  # (lane) -> None: after a load, once its frontend has its cache
        self._installed = next(i for i, lane in enumerate(lanes) if lane.loaded)
        self._last_run = self._installed
        self.loading: str | None = None  # the model loading right now (read by the HTTP thread)
        self.loading_since = 0.0

    # ---- lookups (any thread) ---------------------------------------------------------------
    def lane(self, name: str) -> ModelLane | None:
        return next((lane for lane in self.lanes if lane.name == name), None)

    def names(self) -> list[str]:
        return [lane.name for lane in self.lanes]

    def loaded_count(self) -> int:
        return sum(lane.loaded for lane in self.lanes)

    # ---- rank 0: what this step does ---------------------------------------------------------
    def next_plan(self, step: int) -> tuple[StepPlan, ModelLane]:
        """This step's plan (model ops + the running lane's own plan) and the lane that runs it."""
        now = time.monotonic()
        for lane in self.lanes:
            lane.frontend.drain_inbox()
            if lane.has_work():
                lane.last_used = now
        ops = self._model_ops(now)
        unloading = {op.model for op in ops if op.kind == MODEL_UNLOAD}
        lane = self._next_lane(unloading)
        plan = lane.frontend.next_plan(step, lane.executor.digest)
        flags = plan.flags
        others_busy = any(other.has_work() for other in self.lanes if other is not lane)
        if others_busy or any(op.kind == MODEL_LOAD for op in ops):
            # Idle and shutdown speak for the whole cluster, not for the lane that ran.
            flags &= ~(FLAG_IDLE | FLAG_SHUTDOWN)
        return dataclasses.replace(plan, flags=flags, model=lane.index, model_ops=tuple(ops)), lane

    def _next_lane(self, unloading: set[int]) -> ModelLane:
        """Round robin over loaded lanes with work; else the one that ran last (an idle plan)."""
        n = len(self.lanes)
        for k in range(1, n + 1):
            lane = self.lanes[(self._last_run + k) % n]
            if lane.loaded and lane.index not in unloading and lane.has_work():
                self._last_run = lane.index
                return lane
        last = self.lanes[self._last_run]
        if last.loaded and last.index not in unloading:
            return last
        self._last_run = next(lane.index for lane in self.lanes if lane.pinned)
        return self.lanes[self._last_run]

    def _model_ops(self, now: float) -> list[ModelOp]:
        ops: list[ModelOp] = []
        want = [lane for lane in self.lanes if not lane.loaded and (lane.has_work() or lane.pinned)]
        if want:
            lane = min(want, key=lambda w: (not w.pinned, w.last_used))  # one load per step
            ops += [ModelOp(MODEL_UNLOAD, v.index) for v in self._make_room(lane)]
            ops.append(ModelOp(MODEL_LOAD, lane.index))
        if self.idle_unload_s is not None:
            touched = {op.model for op in ops}
            for lane in self.lanes:
                idle_s = now - lane.last_used
                idle = lane.loaded and not lane.pinned and not lane.has_work()
                if idle and idle_s >= self.idle_unload_s and lane.index not in touched:
                    log.info("model %s idle for %.0f s: unloading it", lane.name, idle_s)
                    ops.append(ModelOp(MODEL_UNLOAD, lane.index))
        return ops

    def _make_room(self, lane: ModelLane) -> list[ModelLane]:
        """Memory pressure: the idle loaded models (least recently used first) to unload so
        `lane` fits on rank 0; the load itself checks again on every rank after they are gone."""
        try:
            need, free = self._fit(lane)
        except Exception:  # e.g. its directory is gone: the load reports it, on every rank alike
            return []
        lane.need_bytes = need
        victims = []
        idle = [v for v in self.lanes if v.loaded and not v.pinned and not v.has_work()]
        for victim in sorted(idle, key=lambda v: v.last_used):
            if need <= free:
                break
            victims.append(victim)
            free += victim.need_bytes
        if need > free:
            return []  # unloading would not make room: keep them; the load is refused with the numbers
        for victim in victims:
            log.info("memory pressure: unloading idle model %s to load %s", victim.name, lane.name)
        return victims

    # ---- every rank: run the model ops, then pick the step's executor -------------------------
    def apply(self, plan: StepPlan):
        """Unload and load as the plan says (same order on every rank); the executor to run."""
        for op in plan.model_ops:
            if not 0 <= op.model < len(self.lanes):
                raise ValueError(f"step {plan.step}: model op for model {op.model}, only {len(self.lanes)} configured")
            lane = self.lanes[op.model]
            if op.kind == MODEL_UNLOAD:
                self._unload(lane)
            else:
                self._load(lane)
        lane = self.lanes[plan.model] if 0 <= plan.model < len(self.lanes) else None
        if lane is None or not lane.loaded:
            raise ValueError(f"step {plan.step}: the plan runs model {plan.model}, which is not loaded here")
        if lane.index != self._installed and self.on_install is not None:
            self.on_install(lane)
        self._installed = lane.index
        return lane.executor

    def _unload(self, lane: ModelLane) -> None:
        if not lane.loaded:
            return
        import mlx.core as mx

        assert not lane.executor.active, f"unloading model {lane.name} with running sequences"
        served, lane.served = lane.served, None
        served.executor.close()  # flushes its prefix cache's RAM tier to SSD
        if lane.frontend is not None:
            lane.frontend.detach_cache()
        del served
        gc.collect()
        mx.clear_cache()
        lane.stats.unloads += 1
        log.info("unloaded model %s", lane.name)

    def _load(self, lane: ModelLane) -> None:
        if lane.loaded:
            return
        started = time.monotonic()
        self.loading, self.loading_since = lane.name, started
        try:
            read, error, need_mb, free_mb = None, None, 0, _INT32_MAX
            try:  # a path missing here, unreadable weights: the agreement below tells the others
                need, free = self._fit(lane)
                free_mb, need_mb = min(free // _MB, _INT32_MAX), min(need // _MB, _INT32_MAX)
                if need_mb <= free_mb:
                    read = self._read(lane)
            except Exception as e:
                log.exception("could not read model %s", lane.name)
                error = f"{type(e).__name__}: {e}"
            least_free_mb, neg_need_mb, all_read = self.agree_min([free_mb, -need_mb, int(read is not None)])
            if -neg_need_mb > least_free_mb:
                self._refuse(
                    lane,
                    f"model {lane.name!r} does not fit: it needs {-neg_need_mb / 1024:.2f} GiB (its weights split "
                    f"over {self.world_size} ranks plus a KV budget of scheduler.max_kv_tokens tokens, added up for "
                    f"ranks that share a host's memory) but the tightest rank has {least_free_mb / 1024:.2f} GiB "
                    f"available ({self.loaded_count()} model(s) loaded); unload a model, lower "
                    "scheduler.max_kv_tokens or add ranks",
                )
                return
            if not all_read:
                why = error or "another rank could not read it (see that rank's log)"
                self._refuse(lane, f"model {lane.name!r} could not be loaded: {why}")
                return
            served = self._serve(lane, read)
            lane.served = served
            self._installed = lane.index  # serving it installed its tokenizer for grammars
            if lane.frontend is not None:
                lane.frontend.attach_cache(served.prefix_cache, served.budget.tokens)
            if self.on_loaded is not None:
                self.on_loaded(lane)
            lane.stats.loads += 1
            lane.stats.last_load_s = time.monotonic() - started
            lane.last_used = time.monotonic()
            log.info("loaded model %s in %.2f s", lane.name, lane.stats.last_load_s)
        finally:
            self.loading = None

    def _refuse(self, lane: ModelLane, message: str) -> None:
        lane.stats.refusals += 1
        log.error("%s", message)
        if lane.frontend is not None:
            lane.frontend.fail_all(message, 503, "model_not_loaded")
        if lane.pinned:
            raise RuntimeError(message)  # the start-up model must load, as with model:

    # ---- rank 0: the front door, for drain and failures (duck-types Frontend's) --------------
    def has_work_threadsafe(self) -> bool:
        return any(lane.frontend.has_work_threadsafe() for lane in self.lanes)

    def abort_all(self, message: str) -> None:
        for lane in self.lanes:
            lane.frontend.abort_all(message)

    def request_shutdown(self) -> None:
        for lane in self.lanes:
            lane.frontend.request_shutdown()

    def fail_all(self, message: str, status: int = 503) -> None:
        for lane in self.lanes:
            lane.frontend.fail_all(message, status)
