"""Several models (`models:`) on the HTTP side: routing by `model`, /v1/models entries, metrics.

A request is served by a view of the server state for its model: the same state with that
model's frontend (its own queue), tokenizer, chat/agent setup, limits and name, so every API
surface below works unchanged whichever model a request names.
"""

from __future__ import annotations

import copy

from prometheus_client import Gauge

from mlx_cluster.server.protocol import APIError


def model_view(state, model: str | None):
    """The state a request for `model` runs with (the start-up model when it names none); 404 otherwise."""
    models = state.models
    lane = models.lane(model) if model is not None else next(x for x in models.lanes if x.pinned)
    if lane is None:
        names = ", ".join(repr(n) for n in models.names())
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {names}",
            param="model",
            code="model_not_found",
        )
    view = copy.copy(state)
    view.config = lane.config  # model_name is this model's
    view.frontend, view.tokenizer, view.agent, view.limits = lane.frontend, lane.tokenizer, lane.agent, lane.limits
    view.prefix_cache = lane.frontend.prefix_cache
    view.adapters = view.speculator = None
    return view


def model_cards(state) -> list[dict]:
    """/v1/models entries: every configured model, loaded or not."""
    created = int(state.started_at)
    return [
        {
            "id": lane.name,
            "object": "model",
            "created": created,
            "owned_by": "mlx-cluster",
            "root": lane.entry.path,
            "loaded": lane.loaded,
            "loading": state.models.loading == lane.name,
        }
        for lane in state.models.lanes
    ]


def models_health(state) -> dict:
    """/health's per-model part: loaded or not, waiting and running requests."""
    return {
        lane.name: {
            "loaded": lane.loaded,
            "queue_depth": lane.frontend.queue_depth,
            "running_requests": lane.frontend.stats.requests_running,
            "loads": lane.stats.loads,
        }
        for lane in state.models.lanes
    }


class ModelMetrics:
    """mlx_cluster_model_loads_total{model}, ..._unloads_total, ..._load_seconds, mlx_cluster_models_loaded."""

    def __init__(self, registry):
        p, label = "mlx_cluster_", ["model"]
        self.loads = Gauge(p + "model_loads_total", "Times each model was loaded.", label, registry=registry)
        self.unloads = Gauge(p + "model_unloads_total", "Times each model was unloaded.", label, registry=registry)
        self.refusals = Gauge(
            p + "model_load_refusals_total", "Loads refused (does not fit, or unreadable).", label, registry=registry
        )
        self.load_s = Gauge(p + "model_load_seconds", "Duration of each model's last load.", label, registry=registry)
        self.loaded = Gauge(p + "models_loaded", "Models loaded now.", registry=registry)
        self.waiting = Gauge(
            p + "model_requests_waiting", "Requests waiting, per model (also for a load).", label, registry=registry
        )

    def scrape(self, models) -> None:
        for lane in models.lanes:
            s = lane.stats
            self.loads.labels(lane.name).set(s.loads)
            self.unloads.labels(lane.name).set(s.unloads)
            self.refusals.labels(lane.name).set(s.refusals)
            self.load_s.labels(lane.name).set(s.last_load_s)
            self.waiting.labels(lane.name).set(lane.frontend.queue_depth)
        self.loaded.set(models.loaded_count())
