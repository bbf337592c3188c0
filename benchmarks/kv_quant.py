"""Quantized live KV benchmark: concurrent sequences at one KV memory budget, and TPOT at c=8.

Starts one cluster per `cache.kv_bits` value (all up at once, the same model and
`scheduler.max_kv_tokens`), then, for each:

* capacity: `--flood` requests of `--input-len` + `--output-len` tokens at once, into an
  in-process engine with the same settings: the most sequences it ran together;
* TPOT: `mlx-cluster bench` at `--concurrency`, the variants interleaved `--rounds` times so
  that a busy shared machine slows them alike; the median of each variant's mean TPOT.

    python benchmarks/kv_quant.py --model builtin:tiny --kv-bits none 8 --out results/kv_quant_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_cluster.runtime.cpu_blas import use_cpu_blas_from_env  # noqa: E402

use_cpu_blas_from_env()  # before mlx: multiply as a served rank does (cluster.cpu_blas: auto, or MLX_CLUSTER_CPU_BLAS)
from tests.cluster import Cluster  # noqa: E402  (the same harness the tests use)

BF16_HD128 = "test:llama-bf16-hd128"


def _bf16_hd128(models_dir: str) -> str:
    """A small random-weight bfloat16 llama with head_dim 128 (as 8B-class models have), built
    with mlx-lm's functions as tests/test_checkpoints.py does: 16-bit KV sizes on a CPU."""
    import dataclasses

    from mlx_cluster.models.builtin import resolve_model_path
    from tests.test_checkpoints import SPECS, build_checkpoint, silent_tokens

    out = Path(models_dir) / "llama-bf16-hd128"
    if not (out / "config.json").exists():
        tokenizer_dir = Path(resolve_model_path("builtin:tiny", models_dir))
        attn = {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 128}
        spec = dataclasses.replace(SPECS["llama"], config={**SPECS["llama"].config, **attn}, quantize=None)
        build_checkpoint(out, spec, tokenizer_dir, silent_tokens(tokenizer_dir))
    return str(out)


def _variant(name: str, args) -> tuple[int | None, int]:
    """ "none", "8", "4" or "8g128", each with optional "@VAR=VALUE,...": (kv_bits, kv_group_size)."""
    bits, _, group = name.partition("@")[0].partition("g")
    return (None if bits == "none" else int(bits)), int(group or args.kv_group_size)


def _variant_env(name: str) -> dict:
    """A variant's environment: "8@MLX_PTX_CACHE_DIR=/tmp/a,FOO=1" runs kv_bits 8 with those
    variables set (its server, and its in-process steps), so that an environment switch is A/B'd
    in the same interleaved rounds as the precisions."""
    settings = name.partition("@")[2]
    return dict(item.split("=", 1) for item in settings.split(",")) if settings else {}


def _file_name(variant: str) -> str:
    """A variant's name as a file name (its environment settings may hold '/' or '=')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", variant)


def peak_running(model: str, models_dir: str, kv_bits: str, args) -> tuple[int, str]:
    """How many sequences the real scheduler runs at once within the budget: an in-process
    engine (one rank, rank 0's Frontend) given `--flood` requests at once, stepped until it
    admits no more (or one finishes). HTTP polling of /metrics
    on a busy 2-core machine missed peaks; this counts them exactly."""
    import logging

    import mlx.core as mx

    from mlx_cluster.cache.testing import LocalBus, greedy, make_executor
    from mlx_cluster.config import CacheSection
    from mlx_cluster.engine.engine import Engine
    from mlx_cluster.engine.frontend import DoneEvent, Frontend, GenerationRequest
    from mlx_cluster.engine.kv_quant import kv_budget, resolve_live_kv
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import load_model_shard

    loaded = load_model_shard(resolve_model_path(model, models_dir), mx.distributed.init())
    bits, group = _variant(kv_bits, args)
    cache_cfg = CacheSection(kv_bits=bits, kv_group_size=group)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("mlx_cluster.engine.kv_quant").addHandler(handler)
    logging.getLogger("mlx_cluster.engine.kv_quant").setLevel(logging.INFO)
    live = resolve_live_kv(cache_cfg, loaded.model)  # after the handler: a fallback's warning says why
    for message in records:
        print(f"  kv_bits={kv_bits}: {message}", flush=True)
    budget = kv_budget(args.max_kv_tokens, loaded.model, live)
    ex = make_executor(loaded, None, max_batch_size=args.max_batch_size, live_kv=live)
    frontend = Frontend(
        loaded.tokenizer,
        max_batch_size=args.max_batch_size,
        max_new_per_step=8,
        max_queue=args.flood,
        max_kv_tokens=budget.tokens,
    )
    engine = Engine(ex, LocalBus(), frontend, heartbeat_s=1.0)
    done = []
    prompt = list(range(100, 100 + args.input_len))
    for i in range(args.flood):
        deliver = lambda e: done.append(e) if isinstance(e, DoneEvent) else None  # noqa: E731
        assert frontend.submit(GenerationRequest(f"r{i}", prompt, greedy(args.output_len), deliver))
    peak = still = 0
    while not done and still < 4:  # 4 steps without a new admission: the budget is full
        engine.step()
        still = still + 1 if frontend.stats.seqs_running <= peak else 0
        peak = max(peak, frontend.stats.seqs_running)
    return peak, records[-1]


def _in_process(model: str, models_dir: str, variants: list[str], args):
    """What both in-process timings start from: the model, `--concurrency` prompts of
    `--input-len` tokens, and each variant's live KV setting (None: full precision)."""
    import mlx.core as mx

    from mlx_cluster.config import CacheSection
    from mlx_cluster.engine.kv_quant import resolve_live_kv
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.fuse import fuse_projections
    from mlx_cluster.models.loader import load_model_shard

    loaded = load_model_shard(resolve_model_path(model, models_dir), mx.distributed.init())
    # Fused q/k/v and gate/up, as a served rank runs the model (runtime/rank.py read_model);
    # timings before 2026-12-03's fourth session were taken unfused.
    fuse_projections(loaded.model)
    prompts = [[100 + (i * 7 + j) % 1500 for j in range(args.input_len)] for i in range(args.concurrency)]
    lives = {}
    for name in variants:
        bits, group = _variant(name, args)
        lives[name] = resolve_live_kv(CacheSection(kv_bits=bits, kv_group_size=group), loaded.model)
    return loaded, prompts, lives


def decode_step_ms(model: str, models_dir: str, variants: list[str], args) -> dict[str, list[float]]:
    """In-process decode step time at batch `--concurrency`, contexts --input-len .. + 64: the
    executors of all variants built once, then timed in turns (`--step-rounds` x 32 steps each),
    so a busy machine slows them alike. No HTTP, no streaming: the engine's own step."""
    from mlx_cluster.cache.testing import greedy, make_executor
    from mlx_cluster.engine.plan import NewSequence, StepPlan

    loaded, prompts, lives = _in_process(model, models_dir, variants, args)
    executors = {}
    for name, live in lives.items():
        ex = make_executor(loaded, None, max_batch_size=args.concurrency, live_kv=live)
        seqs = tuple(NewSequence(i + 1, tuple(p), greedy(100_000)) for i, p in enumerate(prompts))
        ex.apply(StepPlan(step=0, new=seqs))
        while len(ex.step()) < args.concurrency:
            pass  # until every row decodes
        executors[name] = ex
    times = {name: [] for name in variants}
    for _ in range(args.step_rounds):
        for name, ex in executors.items():
            saved = dict(os.environ)
            os.environ.update(_variant_env(name))
            started = time.perf_counter()
            for _ in range(32):
                ex.step()
            os.environ.clear()
            os.environ.update(saved)
            times[name].append((time.perf_counter() - started) / 32 * 1000)
    return times


def prefill_ms(model: str, models_dir: str, variants: list[str], args) -> dict[str, list[float]]:
    """In-process prefill of `--concurrency` prompts of `--input-len` tokens at once (chunks of
    512, then one token each), the variants in turns (`--prefill-rounds`), a fresh executor per
    run: what a burst of new requests costs before any of them decodes."""
    from mlx_cluster.cache.testing import generate, make_executor

    loaded, prompts, lives = _in_process(model, models_dir, variants, args)
    times = {name: [] for name in variants}
    for _ in range(args.prefill_rounds):
        for name, live in lives.items():
            ex = make_executor(loaded, None, max_batch_size=args.concurrency, live_kv=live)
            started = time.perf_counter()
            generate(ex, prompts, 1)
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def tpot_ms(cluster: Cluster, args) -> float:
    # On a small CPU host the load generator competes with the server for cores: --client-nice
    # gives the server the first claim on them.
    cmd = ["nice", "-n", str(args.client_nice)] if args.client_nice else []
    cmd += [
        sys.executable,
        "-m",
        "mlx_cluster",
        "bench",
        cluster.url,
        "--concurrency",
        str(args.concurrency),
        "--num-requests",
        str(args.num_requests),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--json",
        "--no-progress",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        raise RuntimeError(f"bench failed ({run.returncode}): {run.stderr[-2000:]}") from None
    if report["errors"]:
        print(f"  {report['errors']} failed requests: {report['error_samples']}", flush=True)
    return report["tpot_ms"]["mean"]


def _report(result: dict, key: str, what: str, runs_by: dict[str, list[float]]) -> None:
    """Each variant's runs (ms), and its median over the first variant's, into result and stdout."""
    base = statistics.median(next(iter(runs_by.values())))
    for bits, runs in runs_by.items():
        v = result["variants"][bits]
        v[f"{key}_ms"] = runs
        v[f"{key}_ratio"] = statistics.median(runs) / base
        print(
            f"kv_bits={bits}: {what} median {statistics.median(runs):.2f} ms "
            f"({v[f'{key}_ratio']:.3f}x) runs {[round(t, 2) for t in runs]}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny", help=f"builtin:NAME, a directory, or {BF16_HD128}")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--kv-bits", nargs="+", default=["none", "8"], help="variants: none, 8, 4, or 8g128 (bits, group)")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--max-kv-tokens", type=int, default=4096)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--flood", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3, help="TPOT rounds; 0: capacity only, no servers")
    p.add_argument("--step-rounds", type=int, default=0, help="also time the in-process decode step, in turns")
    p.add_argument("--prefill-rounds", type=int, default=0, help="also time an in-process batch prefill, in turns")
    p.add_argument("--client-nice", type=int, default=0, help="run the load generator at this nice level")
    p.add_argument("--trace", help="engine traces of the TPOT servers into this folder, summarized at the end")
    # A cold CUDA start compiles the quantized kernels first (~4 min on an H200, docs/benchmarks.md).
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to become ready")
    p.add_argument("--models-dir", default=str(Path("~/.cache/mlx-cluster/models").expanduser()))
    p.add_argument("--out")
    args = p.parse_args()
    if args.model == BF16_HD128:
        args.model = _bf16_hd128(args.models_dir)

    clusters = {}
    root = Path(tempfile.mkdtemp(prefix="kv_quant_bench_"))
    result = {"args": vars(args), "variants": {b: {} for b in args.kv_bits}}
    base = args.kv_bits[0]
    # Capacity first, in this process, before any server competes for the CPU.
    for bits in args.kv_bits if args.flood else ():
        peak, line = peak_running(args.model, args.models_dir, bits, args)
        result["variants"][bits].update(startup_log=line, peak_running=peak)
        print(f"kv_bits={bits}: peak running {peak}  ({line})", flush=True)
    for bits, v in result["variants"].items() if args.flood else ():
        v["peak_running_ratio"] = v["peak_running"] / result["variants"][base]["peak_running"]
        print(f"kv_bits={bits}: peak running {v['peak_running']} ({v['peak_running_ratio']:.2f}x)", flush=True)
    if args.step_rounds:
        what = f"decode step at batch {args.concurrency}"
        _report(result, "decode_step", what, decode_step_ms(args.model, args.models_dir, args.kv_bits, args))
    if args.prefill_rounds:
        what = f"prefill of {args.concurrency} x {args.input_len} tokens"
        _report(result, "prefill", what, prefill_ms(args.model, args.models_dir, args.kv_bits, args))
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    try:
        for bits in args.kv_bits if args.rounds else ():
            kv_bits, group = _variant(bits, args)
            config = {
                "model": {"path": args.model},
                "cache": {"kv_bits": kv_bits, "kv_group_size": group},
                "scheduler": {"max_kv_tokens": args.max_kv_tokens, "max_batch_size": args.max_batch_size},
                # A loaded shared machine can stretch one step past the test harness's 10 s.
                "supervisor": {"collective_timeout_s": 300},
            }
            (root / _file_name(bits)).mkdir()
            env = {"MLX_CLUSTER_TRACE": str(Path(args.trace) / f"kv{_file_name(bits)}")} if args.trace else {}
            env.update(_variant_env(bits))
            cluster = Cluster(
                root / _file_name(bits), ranks=args.ranks, models_dir=args.models_dir, config=config, env=env
            )
            clusters[bits] = cluster.start(timeout_s=args.ready_timeout)
        for _ in range(args.rounds):
            for bits, c in clusters.items():
                result["variants"][bits].setdefault("tpot_ms", []).append(tpot_ms(c, args))
        for bits, v in result["variants"].items() if args.rounds else ():
            v["tpot_ms_median"] = statistics.median(v["tpot_ms"])
            v["tpot_ratio"] = v["tpot_ms_median"] / statistics.median(result["variants"][base]["tpot_ms"])
            print(
                f"kv_bits={bits}: TPOT c={args.concurrency} median {v['tpot_ms_median']:.2f} ms "
                f"({v['tpot_ratio']:.3f}x) runs {[round(t, 2) for t in v['tpot_ms']]}",
                flush=True,
            )
    finally:
        for c in clusters.values():
            c.stop()
    if args.trace:  # written when the engines stopped
        from trace_steps import summarize

        for bits in clusters:
            path = Path(args.trace) / f"kv{_file_name(bits)}.rank0.json"
            result["variants"][bits]["trace"] = summary = summarize(str(path))
            for kind, row in summary.items():
                print(f"kv_bits={bits} trace {kind}: {row}", flush=True)
    if args.out:  # once, after the traces (a failed round raises before this: nothing half-written)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
