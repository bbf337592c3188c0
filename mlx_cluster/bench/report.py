"""Turn per-request results into the benchmark report (a JSON-ready dict) and a table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from mlx_cluster.bench.loadgen import RequestResult

MAX_ERROR_SAMPLES = 5
LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as
    numpy.percentile's default does; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def stats_ms(seconds: Iterable[float]) -> dict[str, float | None]:
    """mean/p50/p90/p99 in milliseconds of a list of durations in seconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "mean": sum(ms) / len(ms) if ms else None,
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


def error_samples(results: Iterable[RequestResult], limit: int = MAX_ERROR_SAMPLES) -> list[str]:
    """The first `limit` distinct error messages, in request order."""
    samples: list[str] = []
    for r in results:
        if r.error and r.error not in samples:
            samples.append(r.error)
            if len(samples) == limit:
                break
    return samples


def summarize(
    results: list[RequestResult],
    duration_s: float,
    warmup_results: list[RequestResult] | None = None,
    meta: dict | None = None,
) -> dict:
    """The report as a dict with stable snake_case keys (see cli.py for the list).

    Throughputs and latencies count successful requests only; token totals come from the
    servers' usage chunks, so the prompt-token figures are None when no usage was sent.
    """
    ok = [r for r in results if r.success]
    duration = max(duration_s, 1e-9)  # avoid dividing by zero on an instant, empty run
    output_tokens = sum(r.output_tokens for r in ok)
    with_usage = [r for r in ok if r.prompt_tokens is not None]
    input_tokens = sum(r.prompt_tokens for r in with_usage) if with_usage else None
    # Servers that never report cached tokens give "unknown", not a misleading 0 %.
    cached_known = any(r.cached_tokens is not None for r in with_usage)
    cached_tokens = sum(r.cached_tokens or 0 for r in with_usage) if cached_known else None

    report = dict(meta or {})
    report.update(
        {
            "duration_s": duration_s,
            "completed": len(ok),
            "errors": len(results) - len(ok),
            "warmup_errors": sum(not r.success for r in warmup_results or []),
            "error_samples": error_samples([*(warmup_results or []), *results]),
            "request_throughput_req_s": len(ok) / duration,
            "output_throughput_tok_s": output_tokens / duration,
            "total_token_throughput_tok_s": ((input_tokens or 0) + output_tokens) / duration,
            "total_input_tokens": input_tokens,
            "total_output_tokens": output_tokens,
            "mean_prompt_tokens": input_tokens / len(with_usage) if with_usage else None,
            "mean_output_tokens": output_tokens / len(ok) if ok else None,
            "total_cached_tokens": cached_tokens,
            "cached_token_ratio": cached_tokens / input_tokens if cached_tokens is not None and input_tokens else None,
            "ttft_ms": stats_ms(r.ttft_s for r in ok if r.ttft_s is not None),
            "tpot_ms": stats_ms(r.tpot_s for r in ok if r.tpot_s is not None),
            "itl_ms": stats_ms(gap for r in ok for gap in r.itl_s),
            "e2e_ms": stats_ms(r.e2e_s for r in ok if r.e2e_s is not None),
        }
    )
    return report


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_table(report: dict) -> str:
    """A human-readable, aligned rendering of `report` (as returned by summarize)."""
    width = 60
    rate = report.get("request_rate")
    ratio = report.get("cached_token_ratio")
    rows = [
        ("Model", report.get("model")),
        ("Endpoint", report.get("endpoint")),
        ("Workload", report.get("workload")),
        (
            "Input / prefix / output len",
            f"{report.get('input_len')} / {report.get('prefix_len')} / {report.get('output_len')}",
        ),
        ("Concurrency", report.get("concurrency")),
        ("Request rate (req/s)", "inf" if rate is None else _fmt(float(rate))),
        ("Successful requests", f"{report['completed']} of {report.get('num_requests', '?')}"),
        ("Errors", report["errors"]),
        ("Duration (s)", _fmt(report["duration_s"])),
        ("Request throughput (req/s)", _fmt(report["request_throughput_req_s"])),
        ("Output token throughput (tok/s)", _fmt(report["output_throughput_tok_s"])),
        ("Total token throughput (tok/s)", _fmt(report["total_token_throughput_tok_s"])),
        ("Total output tokens", _fmt(report["total_output_tokens"])),
        ("Mean prompt tokens", _fmt(report["mean_prompt_tokens"], 1)),
        ("Cached token ratio", "n/a" if ratio is None else f"{ratio:.1%}"),
    ]
    lines = [" mlx-cluster bench ".center(width, "=")]
    lines += [f"{label + ':':<36}{_fmt(value):>24}" for label, value in rows]
    lines.append(" Latency (ms) ".center(width, "-"))
    lines.append(f"{'':<20}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for key, label in LATENCY_METRICS:
        s = report[key]
        lines.append(f"{label:<20}" + "".join(f"{_fmt(s[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    if report["error_samples"]:
        lines.append(" Errors (first few) ".center(width, "-"))
        lines += [f"- {' '.join(msg.split())[:200]}" for msg in report["error_samples"]]  # one line each
    lines.append("=" * width)
    return "\n".join(lines)
