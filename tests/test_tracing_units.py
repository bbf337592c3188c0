"""server/tracing.py: one OpenTelemetry trace per request, off unless server.otlp_endpoint is set."""

from __future__ import annotations

import http.server
import threading
import time
from types import SimpleNamespace

import pytest

from mlx_cluster.engine.frontend import DoneEvent
from mlx_cluster.server.metrics import Metrics
from mlx_cluster.server.tracing import make_request_tracer

pytest.importorskip("opentelemetry.sdk")


def finished_stream(t0: float):
    done = DoneEvent(prompt_tokens=40, completion_tokens=10, cached_tokens=32, queued_s=0.5)
    return SimpleNamespace(
        id="cmpl-1", kind="chat", model="m", t_start=t0, t_first=t0 + 0.8, t_last=t0 + 1.7, done=done
    )


def test_tracing_is_off_without_an_endpoint():
    assert make_request_tracer(None, "c") is None


def test_a_request_becomes_a_trace_of_queue_prefill_and_decode():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    metrics = Metrics("m")
    metrics.tracer = make_request_tracer(None, "test-cluster", exporter=exporter)
    t0 = time.monotonic() - 2.0
    stream = finished_stream(t0)
    stream.n_tokens, stream.finish_reasons = 10, ["stop"]
    metrics.request_finished(stream, "ok")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "queue", "prefill", "decode"}
    root = spans["request"]
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}
    assert all(spans[n].parent.span_id == root.context.span_id for n in ("queue", "prefill", "decode"))
    assert abs((spans["queue"].end_time - spans["queue"].start_time) / 1e9 - 0.5) < 1e-3
    assert abs((spans["prefill"].end_time - spans["prefill"].start_time) / 1e9 - 0.3) < 1e-3
    assert abs((spans["decode"].end_time - spans["decode"].start_time) / 1e9 - 0.9) < 1e-3
    assert spans["prefill"].attributes["mlx_cluster.cached_tokens"] == 32
    assert root.attributes["gen_ai.usage.output_tokens"] == 10 and root.attributes["mlx_cluster.outcome"] == "ok"
    assert root.resource.attributes["service.name"] == "test-cluster"


def test_spans_reach_an_otlp_http_endpoint():
    received = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/traces"
        tracer = make_request_tracer(url, "test-cluster")
        tracer.request_finished(finished_stream(time.monotonic() - 2.0), "ok")
        assert tracer.provider.force_flush(10_000)
        assert received and received[0][0] == "/v1/traces" and b"prefill" in received[0][1]
    finally:
        server.shutdown()
