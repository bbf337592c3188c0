"""What a decode step's attention costs per way of reading the live KV cache, model weights aside.

A served GPU step is host-bound: each op costs its Python graph building and its launch,
whatever its size. This times only the cache side of a step, every layer of an `8b`-shaped
shard (32 layers, 32 query and 8 KV heads of 128): the new token's keys and values written
into a batch cache already holding `--context` tokens, the layer's mask, and attention over
what the cache hands back; rounds of `--steps` steps, the ways interleaved so a shared machine
slows them alike. Each way is also checked against full precision (largest difference of the
attention outputs).

Ways: `full` (mlx-lm's BatchKVCache, fused SDPA); `q8`/`q4`: the quantized cache as served
(on a CPU mlx-lm's quantized attention over the view; on CUDA the whole allocation, a decode
step through engine/cuda_kv_attention.py's kernel, `q4` dequantized into fused SDPA);
`q8-view-deq`: the view dequantized by `mx.dequantize` then fused SDPA (`DequantizedReads`,
what a CPU prefill chunk reads).

The results in results/gpu-h200-2026-12-03e predate the kernel (their `q8` is mlx-lm's quantized
attention, which CUDA computes wrongly: docs/benchmarks.md) and also name ways whose code was
measured there and removed (the scripts beside them keep it): `q8-deq` (the whole allocation dequantized in one
compiled write-and-read per layer, then fused SDPA), `q8-deq1` (a one-kernel dequantization of
keys and values) and `q8` vs `q8-uncompiled` (the quantized write and attention `mx.compile`d).

    python benchmarks/kv_attention_ops.py --batch 8 --context 1024 --out results/kv_attention_ops.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_lm.models.base import scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from mlx_cluster.engine import kv_quant  # noqa: E402


def make_cache(way: str, padding: list[int], contiguous: bool):
    if way == "full":
        return BatchKVCache(padding)
    cache = kv_quant.BatchQuantizedKVCache(padding, 64, 4 if way.startswith("q4") else 8, contiguous)
    return kv_quant.DequantizedReads(cache) if way.endswith("-view-deq") else cache


def build(caches, x, args):
    """One step's attention for every layer, as mlx-lm's llama builds it."""
    mask = caches[0].make_mask(x.shape[3])
    outs = []
    for layer, cache in enumerate(caches):
        # New keys and values not computed from q: mlx-lm's quantized attention scales its
        # queries in place, which would change them too in the lazy graph.
        q, k = x[layer], x[layer, :, : args.kv_heads] * 0.5
        v = k
        keys, values = cache.update_and_fetch(k, v)
        outs.append(scaled_dot_product_attention(q, keys, values, cache=cache, scale=args.head_dim**-0.5, mask=mask))
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ways", nargs="+", default=["full", "q8", "q8-view-deq"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contiguous", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--out")
    args = p.parse_args()

    gpu = mx.default_device() == mx.gpu
    contiguous = args.contiguous == "yes" or (args.contiguous == "auto" and gpu)
    B, L, D = args.batch, args.layers, args.head_dim
    padding = [(i * 37) % 64 for i in range(B)]  # rows of different lengths, as a batch has
    mx.random.seed(0)
    prompt = mx.random.normal((L, B, args.heads, args.context, D)).astype(mx.bfloat16)
    step_x = mx.random.normal((L, B, args.heads, 1, D)).astype(mx.bfloat16)

    def max_diff(outs, reference):
        return max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() for a, b in zip(outs, reference))

    state, first_outs = {}, {}
    for way in args.ways:
        caches = [make_cache(way, padding, contiguous) for _ in range(L)]
        mx.eval(build(caches, prompt, args))  # the prefill
        outs = first_outs[way] = build(caches, step_x, args)
        mx.eval(outs)
        state[way] = {
            "caches": caches,
            "build_ms": [],
            "step_ms": [],
            "max_diff_vs_first": max_diff(outs, first_outs[args.ways[0]]),
        }

    for _ in range(args.rounds):
        for way in args.ways:
            caches, rec = state[way]["caches"], state[way]
            builds, totals = [], []
            for _ in range(args.steps):
                for c in caches:  # the same context every step: measure at --context, not growing
                    c.trim(1)
                t0 = time.perf_counter()
                outs = build(caches, step_x, args)
                t1 = time.perf_counter()
                mx.eval(outs)
                t2 = time.perf_counter()
                builds.append((t1 - t0) * 1e3)
                totals.append((t2 - t0) * 1e3)
            rec["build_ms"].append(statistics.median(builds))
            rec["step_ms"].append(statistics.median(totals))

    base = statistics.median(state[args.ways[0]]["step_ms"])
    result = {"args": vars(args), "device": str(mx.default_device()), "contiguous_reads": contiguous, "ways": {}}
    for way in args.ways:
        rec = state[way]
        step = statistics.median(rec["step_ms"])
        result["ways"][way] = {
            "step_ms": round(step, 3),
            "build_ms": round(statistics.median(rec["build_ms"]), 3),
            "ratio_to_first": round(step / base, 3),
            "rounds_step_ms": [round(x, 3) for x in rec["step_ms"]],
            "max_diff_vs_first": rec["max_diff_vs_first"],
        }
        print(
            f"{way:10s} step {step:8.3f} ms  build {result['ways'][way]['build_ms']:7.3f} ms  x{step / base:.3f}  "
            f"diff {rec['max_diff_vs_first']:.4f}  rounds {result['ways'][way]['rounds_step_ms']}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
