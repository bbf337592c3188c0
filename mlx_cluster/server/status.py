"""`GET /admin/status`: the whole cluster in one JSON document, and the dashboard that reads it.

Rank 0 builds it from what it already has (its ServerState, its Prometheus metrics) and from
the status board of runtime/status_link.py (every rank's latest report). A short history of
throughput and latency is sampled once per heartbeat, on rank 0's status reporter thread, so a
freshly opened dashboard draws the last minutes at once and costs the engine nothing.

The dashboard (server/dashboard/) is static HTML, CSS and JavaScript shipped in the package:
no CDN, no build step. The page itself is public (it holds no data); everything it shows comes
from /admin/status and the /v1 API, which the API key protects as usual.
"""

from __future__ import annotations

import os
import time
from collections import deque
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import Gauge

from mlx_cluster.server.protocol import APIError

HISTORY_S = 600  # the dashboard's charts cover the last ten minutes
MAX_RUNNING_LISTED = 64
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}


class ClusterStatus:
    """Rank 0's view of every rank plus a rolling history; lives on ServerState.cluster_status."""

    def __init__(self, state, board, restarts: int, clock=time.monotonic):
        self.state = state
        self.board = board
        self.restarts = restarts
        self.clock = clock
        self.history: deque[dict] = deque(maxlen=max(30, int(HISTORY_S / max(board.heartbeat_s, 0.1))))
        self._last_totals: dict | None = None

    # ---- history, sampled on rank 0's reporter thread ------------------------------------
    def _totals(self) -> dict:
        metrics = self.state.metrics
        frontend = self.state.frontend
        totals = {"t": self.clock(), "gen": 0, "prompt": 0}
        if frontend is not None:
            totals["gen"] = frontend.stats.generation_tokens_total
            totals["prompt"] = frontend.stats.prompt_tokens_total
        if metrics is not None:
            for key, hist in (("ttft", metrics.ttft), ("tpot", metrics.tpot)):
                s, c = _histogram_sum_count(hist)
                totals[key + "_sum"], totals[key + "_count"] = s, c
            totals["cache_hits"] = _counter_total(metrics.cache_hits)
            totals["cache_queries"] = _counter_total(metrics.cache_queries)
        return totals

    def sample(self, _report: dict | None = None) -> None:
        now = self._totals()
        last, self._last_totals = self._last_totals, now
        if last is None:
            return
        dt = now["t"] - last["t"]
        if dt <= 0:
            return

        def delta(key):
            return now.get(key, 0) - last.get(key, 0)

        def mean(key):
            count = delta(key + "_count")
            return round(delta(key + "_sum") / count, 5) if count > 0 else None

        frontend = self.state.frontend
        queries = delta("cache_queries")
        self.history.append(
            {
                "t": round(time.time(), 2),
                "gen_tok_s": round(delta("gen") / dt, 2),
                "prompt_tok_s": round(delta("prompt") / dt, 2),
                "ttft_s": mean("ttft"),
                "tpot_s": mean("tpot"),
                "running": frontend.stats.requests_running if frontend is not None else 0,
                "waiting": frontend.queue_depth if frontend is not None else 0,
                "cache_hit_rate": round(delta("cache_hits") / queries, 4) if queries > 0 else None,
            }
        )

    # ---- /metrics: per-rank series ----------------------------------------------------------
    def scrape(self, metrics) -> None:
        metrics.ranks.update(metrics, self.board.snapshot())


class RankGauges:
    """Per-rank series on rank 0's /metrics, filled from the status reports at scrape time."""

    def __init__(self, metrics):
        r, L, P = metrics.registry, ["model_name", "rank"], "mlx_cluster_rank_"
        self.up = Gauge(P + "up", "1 while the rank's status reports arrive in time, else 0.", L, registry=r)
        self.age = Gauge(P + "report_age_seconds", "Age of the rank's latest status report.", L, registry=r)
        self.mem_active = Gauge(P + "memory_active_bytes", "MLX memory in use on the rank.", L, registry=r)
        self.mem_peak = Gauge(P + "memory_peak_bytes", "Peak MLX memory on the rank since it started.", L, registry=r)
        self.tokens = Gauge(P + "generation_tokens_total", "Tokens the rank's engine has sampled.", L, registry=r)
        self.phase = Gauge(
            P + "phase_seconds_total",
            "Seconds the rank's engine spent per phase (bus = waiting on the plan link, model = the step "
            "with its collectives).",
            L + ["phase"],
            registry=r,
        )
        self.log_errors = Gauge(
            P + "log_records_total", "Warnings and errors the rank logged.", L + ["level"], registry=r
        )
        self.ssd_bytes = Gauge(P + "prefix_cache_ssd_bytes", "Bytes in the rank's SSD tier.", L, registry=r)
        self.ssd_errors = Gauge(P + "prefix_cache_ssd_errors_total", "SSD tier I/O errors on the rank.", L, registry=r)
        self.cache = RankCacheGauges(r, L, P + "prefix_cache_")

    def update(self, metrics, ranks: list[dict]) -> None:
        m = metrics.model_name
        for r in ranks:
            rank = str(r["rank"])
            self.up.labels(m, rank).set(1 if r["up"] else 0)
            if r.get("age_s") is None:
                continue
            self.age.labels(m, rank).set(r["age_s"])
            self.mem_active.labels(m, rank).set(r.get("mem_active", 0))
            self.mem_peak.labels(m, rank).set(r.get("mem_peak", 0))
            self.tokens.labels(m, rank).set(r.get("gen_tokens", 0))
            for phase, seconds in (r.get("phase_s") or {}).items():
                self.phase.labels(m, rank, str(phase)).set(seconds)
            for level, n in (r.get("errors") or {}).items():
                self.log_errors.labels(m, rank, str(level)).set(n)
            ssd = (r.get("cache") or {}).get("ssd")
            if isinstance(ssd, dict):
                self.ssd_bytes.labels(m, rank).set(ssd.get("bytes", 0))
                self.ssd_errors.labels(m, rank).set(ssd.get("errors", 0))
            if isinstance(r.get("cache"), dict):
                self.cache.update(m, rank, r["cache"])
            if r["rank"] != 0:  # rank 0's own are set from its live objects by Metrics.render
                metrics.step_time.labels(m, rank).set(r.get("step_s", 0.0))
                bus = r.get("bus") or {}
                metrics.bus_bytes.labels(m, rank).set(bus.get("bytes", 0))
                metrics.bus_messages.labels(m, rank).set(bus.get("messages", 0))
                metrics.bus_plans.labels(m, rank).set(bus.get("plans", 0))
                metrics.bus_device_syncs.labels(m, rank).set(bus.get("device_syncs", 0))


class RankCacheGauges:
    """Every rank's prefix-cache tiers, from the `cache` section of its status reports."""

    # (series, figure in the report's tier dict, help); the tier label says which tier.
    TIER_FIGURES = (
        ("blocks", "blocks", "KV blocks the tier holds."),
        ("bytes", "bytes", "Bytes the tier holds."),
        ("capacity_bytes", "capacity_bytes", "The tier's byte budget."),
        ("hits_total", "hits", "Blocks restored from the tier."),
        ("misses_total", "misses", "Blocks looked up in the tier and not found."),
        ("evictions_total", "evictions", "Blocks evicted from the tier."),
    )
    SSD_FIGURES = (
        ("read_bytes_total", "read_bytes", "Bytes read (and verified) from the SSD tier."),
        ("read_seconds_total", "read_s", "Seconds spent reading and verifying SSD tier files (reader thread)."),
        ("write_bytes_total", "write_bytes", "Bytes written to the SSD tier."),
        ("prefetched_total", "prefetched", "Blocks read ahead from SSD for queued requests."),
        ("prefetch_adopted_total", "prefetch_adopted", "Prefetched blocks a restore used."),
        ("prefetch_wasted_total", "prefetch_wasted", "Prefetched blocks dropped unused."),
        ("dropped_writes_total", "dropped_writes", "SSD writes dropped because the write queue was full."),
        ("corrupt_total", "corrupt", "SSD tier files that failed verification (deleted)."),
    )
    COSTS = ("prefill_block_s", "memory_block_s", "staged_block_s", "ssd_block_s")

    def __init__(self, registry, labels: list[str], prefix: str):
        self.tier = {
            key: Gauge(prefix + name, doc, labels + ["tier"], registry=registry) for name, key, doc in self.TIER_FIGURES
        }
        self.ssd = {
            key: Gauge(prefix + "ssd_" + name, doc, labels, registry=registry) for name, key, doc in self.SSD_FIGURES
        }
        self.restored = Gauge(
            prefix + "restored_tokens_total", "Prompt tokens restored on the rank.", labels, registry=registry
        )
        self.cost = Gauge(
            prefix + "cost_seconds",
            "The rank's measured cost of one block: prefill_block_s (recompute), memory_block_s (restore from "
            "memory on the device), staged_block_s (restore a block read from SSD: host to device), ssd_block_s "
            "(read and verify from SSD). See docs/architecture.md, prefix cache costs.",
            labels + ["figure"],
            registry=registry,
        )

    def update(self, model: str, rank: str, cache: dict) -> None:
        for tier in ("ram", "ssd"):
            figures = cache.get(tier)
            if isinstance(figures, dict):
                for key, gauge in self.tier.items():
                    gauge.labels(model, rank, tier).set(figures.get(key) or 0)
        ssd = cache.get("ssd")
        if isinstance(ssd, dict):
            for key, gauge in self.ssd.items():
                gauge.labels(model, rank).set(ssd.get(key) or 0)
        self.restored.labels(model, rank).set(cache.get("restored_tokens") or 0)
        cost = cache.get("cost") or {}
        for figure in self.COSTS:
            if cost.get(figure) is not None:
                self.cost.labels(model, rank, figure).set(cost[figure])


def _histogram_sum_count(hist) -> tuple[float, float]:
    s = c = 0.0
    for family in hist.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                s += sample.value
            elif sample.name.endswith("_count"):
                c += sample.value
    return s, c


def _counter_total(counter) -> float:
    return sum(s.value for f in counter.collect() for s in f.samples if s.name.endswith("_total"))


def attach_status(state, board, restarts: int):
    """Rank 0: hang the cluster status on the server state; returns what to call with each of
    rank 0's own reports (it samples the history)."""
    state.cluster_status = status = ClusterStatus(state, board, restarts)
    return status.sample


# ---- the document -------------------------------------------------------------------------
def running_requests(frontend, now: float) -> list[dict]:
    """Requests the frontend holds, newest last (read from the HTTP thread: a copy under the GIL)."""
    if frontend is None:
        return []
    out = []
    for request in list(frontend._requests.values())[-MAX_RUNNING_LISTED:]:
        req = request.req
        admitted = request.admitted_at
        running_s = now - admitted if admitted is not None else 0.0
        out.append(
            {
                "id": req.request_id,
                "state": "running" if admitted is not None else "waiting",
                "prompt_tokens": len(req.prompt),
                "generated_tokens": request.completion_tokens,
                "n": req.n,
                "age_s": round(now - req.arrival, 2),
                "tok_s": round(request.completion_tokens / running_s, 2) if running_s > 0 else 0.0,
            }
        )
    return out


def status_report(state, history_since: float | None = None) -> dict:
    from mlx_cluster.server.app import health_report

    cfg = state.config
    cs = state.cluster_status
    if cs is not None:
        ranks = cs.board.snapshot()
    else:  # still loading: no report from anyone yet
        ranks = [{"rank": r, "up": False, "state": "unknown", "age_s": None} for r in range(state.world_size)]
    for r in ranks:
        r.pop("t", None)
    metrics = state.metrics
    errors = {}
    if metrics is not None:
        for family in metrics.failures.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    errors[s.labels.get("reason", "?")] = int(s.value)
    cache = state.prefix_cache.stats().to_dict() if state.prefix_cache is not None else None
    return {
        "object": "cluster.status",
        "cluster": {
            "name": cfg.cluster.name,
            "backend": os.environ.get("MLX_CLUSTER_BACKEND", cfg.cluster.backend),
            "world_size": state.world_size,
            "parallel": f"tensor parallel across {state.world_size} rank(s)",
            "model": state.model_name,
            "state": state.status,
            "detail": state.detail,
            "restarts": cs.restarts if cs is not None else 0,
            "uptime_s": round(time.time() - state.started_at, 1),
            "heartbeat_s": cs.board.heartbeat_s if cs is not None else cfg.supervisor.heartbeat_s,
            "api_key_required": bool(state.api_keys),
        },
        "health": health_report(state),
        "ranks": ranks,
        "requests": running_requests(state.frontend, time.monotonic()),
        "history": _history(cs, history_since),
        "errors": errors,
        "prefix_cache": cache,
        "limits": {
            "max_batch_size": cfg.scheduler.max_batch_size,
            "max_queue": cfg.scheduler.max_queue,
            "context_length": state.limits.context_length if state.limits is not None else None,
        },
    }


def _history(cs, since: float | None) -> list[dict]:
    """The whole history, or only the points after `since` (what a polling page has not seen yet)."""
    if cs is None:
        return []
    points = list(cs.history)
    if since is None:
        return points
    return [p for p in points if p["t"] > since]


def dashboard_asset(name: str) -> bytes:
    return resources.files("mlx_cluster.server").joinpath("dashboard", name).read_bytes()


def status_router(state) -> APIRouter:
    router = APIRouter()

    @router.get("/admin/status")
    async def admin_status(history_since: float | None = None):
        """The cluster, every rank, live requests and the last minutes' throughput and latency
        (`history_since`: only the history points after that unix time)."""
        # JSONResponse directly: FastAPI's jsonable_encoder would walk the document in Python.
        return JSONResponse(status_report(state, history_since))

    @router.get("/", include_in_schema=False)
    @router.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return HTMLResponse(dashboard_asset("index.html"), headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_file(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no route GET /dashboard/{name}", code="not_found")
        return Response(dashboard_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    return router
