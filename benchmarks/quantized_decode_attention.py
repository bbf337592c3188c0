"""The CUDA decode attention over an 8-bit live cache (mlx_cluster/engine/cuda_kv_attention.py)
checked against float32 attention and mlx-lm's quantized attention, then timed against the latter:
32 layers of an `8b` shard's decode attention at batch 8, in turns.

    python benchmarks/quantized_decode_attention.py --out qda.json   # on a CUDA machine

2026-12-03, one H200 (results/gpu-h200-2026-12-03e/quantized-decode-attention.json): largest
error 0.006-0.011 over five shapes for the kernel, 2.57 for mlx-lm's (outputs up to 2.8);
32 layers 1.61 ms against 2.96 ms, Python building 0.30 against 0.81 ms.
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
from mlx_cluster.engine.cuda_kv_attention import attend, decode_case, fits, float32_attention  # noqa: E402


def _case(batch: int, heads: int, kv_heads: int, context: int, room: int, group: int, dtype, seed: int):
    case = decode_case(batch, heads, kv_heads, context, room, group, dtype, seed)
    mx.eval(case)
    return case


def check(args) -> list[dict]:
    """Each shape's largest error against float32 attention over the same dequantized cache,
    for this kernel (and on the first shape for mlx-lm's quantized attention)."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as mlx_lm_attention

    rows = []
    for batch, heads, kv_heads, context, room, group, dtype in (
        (8, 32, 8, 1025, 255, 64, mx.bfloat16),  # an `8b` shard's decode (mlx's kernels for it are in the PTX cache)
        (1, 32, 8, 7, 249, 64, mx.bfloat16),
        (3, 16, 2, 300, 0, 32, mx.float16),
        (2, 8, 8, 513, 255, 128, mx.bfloat16),
        (4, 28, 4, 200, 56, 64, mx.bfloat16),
    ):
        first = not rows
        q, kq, vq, mask = _case(batch, heads, kv_heads, context, room, group, dtype, seed=batch + heads)
        scale = 128**-0.5
        assert fits(q, kq, mask, group, 8)
        ref = float32_attention(q, kq, vq, mask, group)
        ours = attend(q, kq, vq, scale, mask, group)
        row = {
            "shape": [batch, heads, kv_heads, context, room, group, str(dtype)],
            "reference_max": mx.abs(ref).max().item(),
            "kernel_max_err": mx.abs(ours.astype(mx.float32) - ref).max().item(),
        }
        if first:  # mlx's quantized kernels compile per shape on a fresh machine: the first shape only
            theirs = mlx_lm_attention(q * 1, kq, vq, scale=scale, mask=mask, group_size=group, bits=8)
            row["mlx_lm_max_err"] = mx.abs(theirs.astype(mx.float32) - ref).max().item()
        print(row, flush=True)
        rows.append(row)
    return rows


def timing(args) -> dict:
    """One decode step's attention for every layer (cache writes aside), kernel against mlx-lm's
    quantized attention, in turns: build (Python) and build + evaluate, median per round. Each
    way copies its queries first (`q * 1`): mlx-lm's scales them in place."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as mlx_lm_attention

    layers = [_case(args.batch, 32, 8, args.context, 255, 64, mx.bfloat16, seed=i) for i in range(args.layers)]
    scale = 128**-0.5
    ways = {
        "mlx_lm": lambda q, k, v, m: mlx_lm_attention(q * 1, k, v, scale=scale, mask=m, group_size=64, bits=8),
        "kernel": lambda q, k, v, m: attend(q * 1, k, v, scale, m, 64),  # the same extra op as mlx_lm's
    }
    times = {name: {"build_ms": [], "step_ms": []} for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            builds, steps = [], []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                outs = [fn(*layer) for layer in layers]
                t1 = time.perf_counter()
                mx.eval(outs)
                t2 = time.perf_counter()
                builds.append((t1 - t0) * 1e3)
                steps.append((t2 - t0) * 1e3)
            times[name]["build_ms"].append(statistics.median(builds))
            times[name]["step_ms"].append(statistics.median(steps))
    for name, t in times.items():
        print(
            f"{name:8s} step {statistics.median(t['step_ms']):.3f} ms  build {statistics.median(t['build_ms']):.3f} ms  "
            f"rounds {[round(x, 3) for x in t['step_ms']]}",
            flush=True,
        )
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1025)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    result = {"check": check(args), "timing": timing(args)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
