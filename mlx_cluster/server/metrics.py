"""Prometheus metrics: the one place that maps the core's plain stats onto metric names.

Names follow vLLM's (`vllm:` becomes `mlx_cluster_`), with the same histogram buckets, so
vLLM dashboards adapt by renaming. Gauges are read from the engine's stats at scrape time;
latency histograms are fed per request by the HTTP side.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's bucket lists, so its dashboards and alerts carry over unchanged.
# fmt: off
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
# fmt: on
P = "mlx_cluster_"


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        L = ["model_name"]
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch.", L, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be scheduled.", L, registry=r)
        self.kv_usage = Gauge(
            P + "kv_cache_usage_perc",
            "Fraction of the live KV budget (scheduler.max_kv_tokens) reserved by running sequences (0-1).",
            L,
            registry=r,
        )
        self.ranks_up = Gauge(P + "ranks_up", "Ranks of the group that are serving.", L, registry=r)
        self.step_time = Gauge(
            P + "engine_step_seconds", "Duration of the last engine step on this rank.", L + ["rank"], registry=r
        )
        self.bus_bytes = Gauge(
            P + "bus_bytes_total", "Bytes moved through the control bus by this rank.", L + ["rank"], registry=r
        )
        self.bus_plans = Gauge(
            P + "bus_plans_total", "Step plans published or received by this rank.", L + ["rank"], registry=r
        )
        self.bus_messages = Gauge(
            P + "bus_messages_total", "Frames sent or received on the plan link by this rank.", L + ["rank"], registry=r
        )
        self.bus_device_syncs = Gauge(
            P + "bus_device_syncs_total",
            "Control bus operations that waited on the device (zero by design: plans travel over TCP).",
            L + ["rank"],
            registry=r,
        )
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed.", L, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", L, registry=r)
        self.success = Counter(
            P + "request_success", "Requests finished, by finish reason.", L + ["finished_reason"], registry=r
        )
        self.failures = Counter(
            P + "request_failure", "Requests ended by an error or an abort.", L + ["reason"], registry=r
        )
        self.preemptions = Counter(
            P + "num_preemptions", "Sequences preempted (none: admission waits for room).", L, registry=r
        )
        self.cache_queries = Counter(
            P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", L, registry=r
        )
        self.cache_hits = Counter(P + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", L, registry=r)
        self.cache_tier = {  # per tier of rank 0's prefix cache, read from its stats at scrape time
            key: Gauge(P + "prefix_cache_" + name, doc, L + ["tier"], registry=r)
            for key, name, doc in (
                ("blocks", "blocks", "KV blocks held by a prefix-cache tier."),
                ("bytes", "bytes", "Bytes held by a prefix-cache tier."),
                ("hits", "tier_hits_total", "KV blocks restored from a prefix-cache tier."),
                ("misses", "tier_misses_total", "KV blocks looked up in a prefix-cache tier and not found there."),
                ("evictions", "evictions_total", "KV blocks evicted from a prefix-cache tier."),
            )
        }
        self.cache_ssd = {
            key: Gauge(P + "prefix_cache_ssd_" + key + suffix, doc, L, registry=r)
            for key, suffix, doc in (
                ("read_bytes", "_total", "Bytes read from the SSD tier."),
                ("write_bytes", "_total", "Bytes written to the SSD tier."),
                ("errors", "_total", "SSD tier I/O errors."),
                ("corrupt", "_total", "SSD tier files that failed verification (deleted)."),
                ("dropped_writes", "_total", "SSD tier writes dropped because the write queue was full."),
                ("disabled", "", "1 when the SSD tier disabled itself after an error."),
            )
        }
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Time to first token.", L, buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            P + "time_per_output_token_seconds",
            "Mean time per output token of a request.",
            L,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds", "Time between consecutive tokens.", L, buckets=TPOT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds", "End-to-end request latency.", L, buckets=REQUEST_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Time a request waited before running.",
            L,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.spec = {  # speculative decoding, vLLM's spec_decode names, from rank 0's speculator
            key: Gauge(P + "spec_decode_" + key, doc, L, registry=r)
            for key, doc in (
                ("num_drafts_total", "Row verifications with at least one proposed token."),
                ("num_draft_tokens_total", "Proposed (draft) tokens verified by the target model."),
                ("num_accepted_tokens_total", "Proposed tokens the target model accepted."),
                ("acceptance_rate", "Accepted / proposed tokens since start (0-1)."),
                ("mean_acceptance_length", "Tokens emitted per row verification: 1 + accepted / drafts."),
            )
        }
        self.cache_extra = None  # set by the prefix cache: a callable adding its own samples
        from mlx_cluster.server.status import RankGauges

        self.tracer = None  # set when server.otlp_endpoint is (server/tracing.py)
        self.ranks = RankGauges(self)  # every rank's figures from its status reports (server/status.py)

    # ---- per request (HTTP side, asyncio thread) ---------------------------------------
    def request_started(self, prompt_len: int) -> None:
        pass  # prompt tokens are counted when the request finishes, with the cache's view

    def token_event(self, stream, event) -> None:
        now = time.monotonic()
        if stream.t_first is None:
            stream.t_first = now
            self.ttft.labels(self.model_name).observe(now - stream.t_start)
        else:
            self.itl.labels(self.model_name).observe(now - stream.t_last)
        stream.t_last = now
        stream.n_tokens = getattr(stream, "n_tokens", 0) + len(event.token_ids)
        if event.finish_reason is not None:
            stream.finish_reasons = [*getattr(stream, "finish_reasons", []), event.finish_reason]

    def request_finished(self, stream, outcome: str) -> None:
        if getattr(stream, "counted", False):
            return
        stream.counted = True
        if self.tracer is not None:  # server/tracing.py: one OpenTelemetry trace per request
            self.tracer.request_finished(stream, outcome)
        m = self.model_name
        now = time.monotonic()
        if outcome != "ok":
            self.failures.labels(m, outcome).inc()
            return
        done = stream.done
        self.prompt_tokens.labels(m).inc(done.prompt_tokens)
        self.generation_tokens.labels(m).inc(done.completion_tokens)
        self.cache_queries.labels(m).inc(done.prompt_tokens)
        self.cache_hits.labels(m).inc(done.cached_tokens)
        self.queue_time.labels(m).observe(done.queued_s)
        self.e2e.labels(m).observe(now - stream.t_start)
        n = getattr(stream, "n_tokens", 0)
        if n > 1:
            self.tpot.labels(m).observe((stream.t_last - stream.t_first) / (n - 1))
        for reason in getattr(stream, "finish_reasons", []) or ["stop"]:
            self.success.labels(m, reason).inc()

    # ---- scrape --------------------------------------------------------------------------
    def render(self, state) -> tuple[bytes, str]:
        m = self.model_name
        frontend = state.frontend
        if frontend is not None:
            self.running.labels(m).set(frontend.stats.requests_running)
            self.waiting.labels(m).set(frontend.queue_depth)
            # Live KV reserved by running sequences, as vLLM reports it; the prefix cache's
            # own RAM tier has its own gauges (prefix_cache_bytes{tier="ram"}).
            self.kv_usage.labels(m).set(frontend.kv_usage())
        cache = getattr(state, "prefix_cache", None)
        if cache is not None:
            self._cache_samples(cache.stats())
        self.ranks_up.labels(m).set(state.world_size if state.status in ("ready", "draining") else 0)
        timer = state.engine_timer
        if timer is not None:
            self.step_time.labels(m, "0").set(timer.last_step_s)
        bus = getattr(state, "bus_stats", None)
        if bus is not None:
            self.bus_bytes.labels(m, "0").set(bus.bytes)
            self.bus_messages.labels(m, "0").set(bus.messages)
            self.bus_device_syncs.labels(m, "0").set(bus.device_syncs)
            self.bus_plans.labels(m, "0").set(bus.plans)
        speculator = getattr(state, "speculator", None)
        if speculator is not None:
            s = speculator.stats
            values = (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens)
            values += (s.acceptance_rate, s.mean_acceptance_length)
            for gauge, value in zip(self.spec.values(), values):
                gauge.labels(m).set(value)
        models = getattr(state, "models", None)
        if models is not None:  # several models: loads, unloads, what is loaded (server/model_routes.py)
            if getattr(self, "model_metrics", None) is None:
                from mlx_cluster.server.model_routes import ModelMetrics

                self.model_metrics = ModelMetrics(self.registry)
            self.model_metrics.scrape(models)
        cluster_status = getattr(state, "cluster_status", None)
        if cluster_status is not None:  # every rank's figures, from their status reports
            cluster_status.scrape(self)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _cache_samples(self, stats) -> None:
        m = self.model_name
        tiers = {"ram": stats.ram, "ssd": stats.ssd}
        for tier, s in tiers.items():
            if s is not None:
                for key, gauge in self.cache_tier.items():
                    gauge.labels(m, tier).set(getattr(s, key))
        if stats.ssd is not None:
            for key, gauge in self.cache_ssd.items():
                gauge.labels(m).set(float(getattr(stats.ssd, key)))
