"""Optional OpenTelemetry traces: one trace per request, exported over OTLP/HTTP.

Off unless `server.otlp_endpoint` is set, and then only with the `otel` extra installed
(`pip install 'mlx-cluster[otel]'`). The spans are written when a request ends, from the
timestamps its stream already keeps (arrival, admission, first and last token), so nothing
runs on the engine thread or per token:

    request (the whole request; attributes: kind, model, tokens, cached tokens, outcome)
      ├─ queue    arrival → admission
      ├─ prefill  admission → first token (attribute: prompt tokens restored from the prefix cache)
      └─ decode   first token → last token
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class RequestTracer:
    def __init__(self, tracer, provider=None):
        self.tracer, self.provider = tracer, provider
        # Streams keep monotonic times; spans need wall-clock nanoseconds.
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self.offset_ns

    def request_finished(self, stream, outcome: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        end = time.monotonic()
        done = stream.done
        root = self.tracer.start_span(
            "request",
            start_time=self._ns(stream.t_start),
            attributes={
                "mlx_cluster.request_id": stream.id,
                "mlx_cluster.kind": stream.kind,
                "gen_ai.request.model": stream.model,
            },
        )
        root.set_attribute("mlx_cluster.outcome", outcome)
        if outcome != "ok":
            root.set_status(Status(StatusCode.ERROR, outcome))
        try:
            from opentelemetry import trace

            context = trace.set_span_in_context(root)
            admitted = stream.t_start + done.queued_s if done is not None else None
            if admitted is not None:
                self._child("queue", stream.t_start, admitted, context)
            if admitted is not None and stream.t_first is not None:
                prefill = self._child("prefill", admitted, stream.t_first, context, end_span=False)
                prefill.set_attribute("mlx_cluster.cached_tokens", done.cached_tokens)
                prefill.set_attribute("gen_ai.usage.input_tokens", done.prompt_tokens)
                prefill.end(end_time=self._ns(stream.t_first))
            if stream.t_first is not None and stream.t_last is not None:
                self._child("decode", stream.t_first, stream.t_last, context)
            if done is not None:
                root.set_attribute("gen_ai.usage.input_tokens", done.prompt_tokens)
                root.set_attribute("gen_ai.usage.output_tokens", done.completion_tokens)
                root.set_attribute("mlx_cluster.cached_tokens", done.cached_tokens)
        finally:
            root.end(end_time=self._ns(end))

    def _child(self, name: str, start: float, end: float, context, end_span: bool = True):
        span = self.tracer.start_span(name, context=context, start_time=self._ns(start))
        if end_span:
            span.end(end_time=self._ns(end))
        return span


def make_request_tracer(endpoint: str | None, service_name: str, exporter=None) -> RequestTracer | None:
    """A tracer exporting to `endpoint` (OTLP/HTTP, e.g. http://collector:4318/v1/traces), or None
    when tracing is off. `exporter` replaces the OTLP exporter (tests)."""
    if not endpoint and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning(
            "server.otlp_endpoint is set but OpenTelemetry is not installed: no traces "
            "(pip install 'mlx-cluster[otel]')"
        )
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("tracing: each request is exported as an OpenTelemetry trace to %s", endpoint)
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return RequestTracer(provider.get_tracer("mlx_cluster"), provider)
