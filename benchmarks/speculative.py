"""Speculative decoding, single stream: tok/s with speculation off and on, side by side.

The engine's executor in process (no HTTP, no bus), greedy, one sequence at a time, the runs
of each mode interleaved (alternating which goes first) and the best of them kept, so a shared
machine slows both alike. Two workloads:

  repetitive  prompts of one token repeated: random-weight models then fall into loops, the
              way real models repeat code, lists and quoted text (n-gram lookup's use case)
  free-form   random-token prompts: no repeats, proposals are rare and mostly rejected
              (dynamic K must back off so speculation costs little)

Every speculative output is checked against the plain greedy output (identical token ids).

    python3 benchmarks/speculative.py --model builtin:tiny --out benchmarks/results/spec-cpu.json
    python3 benchmarks/speculative.py --model /tmp/mlxc-8b --max-tokens 256   # one GPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_cluster.runtime.cpu_blas import use_cpu_blas_from_env  # noqa: E402

use_cpu_blas_from_env()  # before mlx: multiply as a served rank does (cluster.cpu_blas: auto, or MLX_CLUSTER_CPU_BLAS)

import mlx.core as mx  # noqa: E402

from mlx_cluster.cache.testing import generate, make_executor  # noqa: E402
from mlx_cluster.config import SpeculativeSection  # noqa: E402
from mlx_cluster.engine.speculate import make_speculator  # noqa: E402
from mlx_cluster.engine.verify_cost import measure_verify_cost  # noqa: E402


def workloads(vocab: int, n: int, seed: int) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)
    low = 16  # skip control tokens
    return {
        "repetitive": [[rng.randrange(low, vocab)] * 48 for _ in range(n)],
        "free-form": [[rng.randrange(low, vocab) for _ in range(48)] for _ in range(n)],
    }


def forward_costs(model, widths=(1, 2, 3, 5), context: int = 64, reps: int = 10) -> dict[int, float]:
    """What a verify forward costs against a plain one: where matmuls are compute-bound (a CPU
    with a reference BLAS) a width-W forward costs about W plain ones, and speculation has
    little to gain; where they are bandwidth-bound (a GPU at batch 1) it costs about one."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[5] * context]), cache=cache))
    best = {}
    for _ in range(3):
        for w in widths:
            x = mx.array([[7] * w])
            t0 = time.perf_counter()
            for _ in range(reps):
                mx.eval(model(x, cache=cache))
                for c in cache:
                    c.trim(w)
            best[w] = min(best.get(w, 1e9), time.perf_counter() - t0)
    return {w: round(best[w] / best[1], 2) for w in widths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--models-dir", default="~/.cache/mlx-cluster/models")
    ap.add_argument("--method", default="ngram", choices=["ngram", "draft"])
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per workload")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import load_model_shard

    loaded = load_model_shard(resolve_model_path(args.model, args.models_dir), mx.distributed.init())
    vocab = loaded.config.get("vocab_size")
    section = SpeculativeSection(method=args.method, num_tokens=args.num_tokens, draft_model=args.draft_model)
    speculator = make_speculator(section, loaded.tokenizer, vocab, args.models_dir)
    executors = {"off": make_executor(loaded, None, max_batch_size=1), "on": None}
    executors["on"] = make_executor(loaded, None, max_batch_size=1, speculator=speculator)
    loads = workloads(min(vocab, 2048), args.prompts, args.seed)

    for ex in executors.values():  # warm up compiles (both widths)
        generate(ex, [loads["repetitive"][0]], 16)

    results: dict = {"forward_cost_by_width": forward_costs(loaded.model)}
    print("forward time of width W / width 1:", results["forward_cost_by_width"], flush=True)
    speculator.cost = cost = measure_verify_cost(executors["on"], speculator)  # as a served rank does
    results["verify_cost_in_plain_steps"] = {"1": round(cost.narrow, 2), str(cost.num_tokens): round(cost.wide, 2)}
    print(f"a verify step costs {cost.narrow:.2f} plain steps (1 proposal) .. {cost.wide:.2f} ({cost.num_tokens})")
    for name, prompts in loads.items():
        times = {"off": [], "on": []}
        tokens = {"off": 0, "on": 0}
        texts: dict[str, list] = {}
        reference = [r.tokens for r in generate(executors["off"], prompts[:1], args.max_tokens)]
        speculator.reset_stats()
        identical = True
        for rep in range(args.repeats):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                outs, decode_s = [], 0.0
                for p in prompts:  # decode time only: from the first token (prefill excluded) to the last
                    t0 = time.perf_counter()
                    [r] = generate(executors[mode], [p], args.max_tokens)
                    decode_s += time.perf_counter() - t0 - r.ttft_s
                    outs.append(r.tokens)
                times[mode].append(decode_s)
                tokens[mode] = sum(len(o) - 1 for o in outs)
                texts[mode] = outs
            identical &= texts["on"] == texts["off"]
        # The best of the repeats: on a shared machine, other work only ever adds time.
        rate = {m: tokens[m] / min(times[m]) for m in times}
        s = speculator.stats
        results[name] = {
            "tok_s_off": round(rate["off"], 1),
            "tok_s_on": round(rate["on"], 1),
            "ratio": round(rate["on"] / rate["off"], 3),
            "identical_greedy_tokens": identical and bool(reference),
            "acceptance_rate": round(s.acceptance_rate, 3),
            "mean_acceptance_length": round(s.mean_acceptance_length, 2),
            "draft_tokens": s.num_draft_tokens,
        }
        print(
            f"{name:>11}: off {rate['off']:7.1f} tok/s  {args.method} {rate['on']:7.1f} tok/s  "
            f"x{rate['on'] / rate['off']:.2f}  acceptance {s.acceptance_rate:.2f}  "
            f"mean accepted length {s.mean_acceptance_length:.2f}  identical {identical}",
            flush=True,
        )
    report = {
        "model": args.model,
        "method": args.method,
        "num_tokens": args.num_tokens,
        "max_tokens": args.max_tokens,
        "prompts": args.prompts,
        "repeats": args.repeats,
        "device": str(mx.default_device()),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
