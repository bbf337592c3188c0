"""`mlx-cluster bench URL`: an OpenAI streaming load generator (in the spirit of `vllm bench serve`).

It sends `--warmup` unmeasured requests, then `--num-requests` measured ones with at most
`--concurrency` in flight (optionally arriving as a Poisson process at `--request-rate`),
all streaming with `stream_options.include_usage`, and reports throughput, TTFT, TPOT, ITL
and end-to-end latency percentiles, prompt tokens and the prefix-cache hit ratio.

Prompt lengths are approximate (one word of a fixed list is about one token; see
workload.py); the report's prompt-token figures come from the server's usage chunks.

JSON report keys (--json / --output): url, model, endpoint, workload, num_requests,
concurrency, request_rate (null = unlimited), input_len, prefix_len, output_len, ignore_eos,
temperature, seed, warmup, duration_s, completed, errors, warmup_errors, error_samples,
request_throughput_req_s, output_throughput_tok_s, total_token_throughput_tok_s,
total_input_tokens, total_output_tokens, mean_prompt_tokens, mean_output_tokens,
total_cached_tokens, cached_token_ratio, and ttft_ms, tpot_ms, itl_ms, e2e_ms, each
{"mean", "p50", "p90", "p99"}. Figures the server did not provide are null.

Exit status: 0 when at least one measured request succeeded and none failed, 1 otherwise
(including an unreachable server or no model to benchmark), 2 for invalid options.

This module is imported by `mlx-cluster --help`, so it imports only the standard library at
module level; httpx and the rest load inside run().
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys

API_KEY_ENV = ("MLX_CLUSTER_API_KEY", "OPENAI_API_KEY")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_positive_float.__name__ = "float"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add every bench option to the `bench` subparser."""
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--model", default=None, help="model id (default: the first id from GET /v1/models)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"bearer token (default: ${API_KEY_ENV[0]}, then ${API_KEY_ENV[1]}, else none)",
    )
    p.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="chat: POST /v1/chat/completions; completions: POST /v1/completions (default chat)",
    )
    p.add_argument("--concurrency", type=_int_at_least(1), default=1, help="max requests in flight (default 1)")
    p.add_argument("--num-requests", type=_int_at_least(1), default=32, help="measured requests (default 32)")
    p.add_argument(
        "--input-len",
        type=_int_at_least(1),
        default=128,
        help="approx. prompt tokens: words of a fixed list, about one token each (default 128)",
    )
    p.add_argument("--output-len", type=_int_at_least(1), default=64, help="max_tokens per request (default 64)")
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos: true (requests may then stop before --output-len)",
    )
    p.add_argument(
        "--workload",
        choices=("random", "shared-prefix"),
        default="random",
        help="random: independent prompts; shared-prefix: a common --prefix-len prefix + random suffix",
    )
    p.add_argument(
        "--prefix-len",
        type=_int_at_least(0),
        default=1024,
        help="approx. tokens of the common prefix for --workload shared-prefix (default 1024)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times (default 0)")
    p.add_argument("--warmup", type=_int_at_least(0), default=2, help="unmeasured requests sent first (default 2)")
    p.add_argument(
        "--request-rate",
        type=_positive_float,
        default=math.inf,
        help="mean requests/s, Poisson arrivals (default inf: as fast as --concurrency allows)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds allowed per request (default 300)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of a table")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON report to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def api_base(url: str) -> str:
    """Normalise a server URL to its OpenAI API base, ending in /v1.

    "http://h:8000", "http://h:8000/" and "http://h:8000/v1/" all give "http://h:8000/v1";
    a bare "h:8000" is taken as http.
    """
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def resolve_api_key(explicit: str | None) -> str | None:
    """--api-key, else the first of API_KEY_ENV that is set and non-empty."""
    if explicit:
        return explicit
    return next((os.environ[name] for name in API_KEY_ENV if os.environ.get(name)), None)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; print and return the exit status (0 or 1)."""
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    import json
    import random

    from mlx_cluster.bench.loadgen import Target, first_model, make_client, run_phase
    from mlx_cluster.bench.progress import Progress
    from mlx_cluster.bench.report import format_table, summarize
    from mlx_cluster.bench.workload import make_prompts

    base = api_base(args.url)
    # Warmup prompts are taken from the end so that the measured prompts depend only on the
    # seed, not on --warmup.
    prompts = make_prompts(args.workload, args.num_requests + args.warmup, args.input_len, args.prefix_len, args.seed)
    measured, warmup = prompts[: args.num_requests], prompts[args.num_requests :]
    show_progress = False if args.no_progress else None  # None: only when stderr is a TTY

    async with make_client(args.concurrency, resolve_api_key(args.api_key), args.timeout) as client:
        model = args.model
        if not model:
            try:
                model = await asyncio.wait_for(first_model(client, base), args.timeout)
            except Exception as e:
                print(f"mlx-cluster bench: cannot list models at {base}: {type(e).__name__}: {e}", file=sys.stderr)
                return 1
        target = Target(base, model, args.endpoint, args.output_len, args.temperature, args.ignore_eos, args.timeout)
        print(f"mlx-cluster bench: {model} at {target.url}", file=sys.stderr)

        warmup_results = []
        if warmup:
            progress = Progress("warmup", len(warmup), enabled=show_progress)
            warmup_results, _ = await run_phase(
                client, target, warmup, args.concurrency, on_done=lambda r: progress.update(r.success)
            )
            progress.close()

        progress = Progress("bench", len(measured), enabled=show_progress)
        results, duration = await run_phase(
            client,
            target,
            measured,
            args.concurrency,
            request_rate=args.request_rate,
            rng=random.Random(args.seed),  # reproducible arrival times
            on_done=lambda r: progress.update(r.success),
        )
        progress.close()

    meta = {
        "url": base,
        "model": model,
        "endpoint": args.endpoint,
        "workload": args.workload,
        "num_requests": args.num_requests,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else None,  # JSON has no inf
        "input_len": args.input_len,
        "prefix_len": args.prefix_len if args.workload == "shared-prefix" else 0,
        "output_len": args.output_len,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "warmup": args.warmup,
    }
    report = summarize(results, duration, warmup_results, meta)
    text = json.dumps(report, indent=2)
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            print(f"mlx-cluster bench: cannot write {args.output}: {e}", file=sys.stderr)
            return 1
    print(text if args.json else format_table(report))
    return 0 if report["completed"] >= 1 and report["errors"] == 0 else 1
