"""A whole forward by shape, with small-row products on MLX's cuBLAS path or on the
tensor-core prototype (`tc_small_matmul.py`), in turns in one process (needs a CUDA device).

The model is loaded as a served rank loads it (this project's loader, fused projections), so
widths 2-9 at batch 1 are what a speculative verify runs and batches 8-32 at width 1 what a
decode step of that many sequences runs. Also prints how far the two paths' logits are apart
and whether they pick the same greedy tokens.

    python3 benchmarks/small_matmul_forward.py /tmp/mlxc-8b [--rounds 4] [--out forward.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tc_small_matmul as small_matmul  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_cluster.models.fuse import fuse_projections  # noqa: E402
from mlx_cluster.models.loader import load_model_shard  # noqa: E402

SHAPES = [(1, 1), (1, 2), (1, 5), (1, 9), (4, 1), (8, 1), (16, 1), (32, 1), (8, 5)]  # (batch, width)


def forward_ms(model, batch: int, width: int, context: int = 512, reps: int = 10) -> float:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[5] * context] * batch), cache=cache))
    x = mx.array([[7] * width] * batch)
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            mx.eval(model(x, cache=cache))
            for c in cache:
                c.trim(width)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def agreement(model, batch: int = 1, width: int = 5) -> dict:
    """Both paths on one input: the largest logit difference, and greedy tokens equal or not."""
    x = mx.array([[11 + 13 * i for i in range(width)]] * batch)
    out = {}
    for on in (False, True):
        small_matmul._ENABLED = on
        out[on] = model(x, cache=make_prompt_cache(model)).astype(mx.float32)
    diff = mx.abs(out[True] - out[False]).max().item()
    same = bool(mx.all(out[True].argmax(-1) == out[False].argmax(-1)).item())
    scale = mx.abs(out[False]).max().item()
    return {"max_logit_diff": diff, "max_logit": scale, "same_greedy_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    loaded = load_model_shard(args.model, mx.distributed.init())
    model = loaded.model
    fuse_projections(model)
    print("switched", small_matmul.enable(model), "linears", flush=True)
    result = {"agreement_b1w5": agreement(model), "agreement_b8w1": agreement(model, 8, 1), "ms": {}}
    print(result, flush=True)
    for rnd in range(args.rounds):
        for on in (False, True) if rnd % 2 == 0 else (True, False):
            small_matmul._ENABLED = on
            name = "small_matmul" if on else "cublas"
            for b, w in SHAPES:
                result["ms"].setdefault(name, {}).setdefault(f"b{b}w{w}", []).append(round(forward_ms(model, b, w), 3))
    for name, by in result["ms"].items():
        print(f"{name:>12}: " + ", ".join(f"{k} {min(v):.2f}" for k, v in by.items()), flush=True)
    plain = min(result["ms"]["cublas"]["b1w1"])
    for name, by in result["ms"].items():
        print(f"{name:>12} / cublas b1w1: " + ", ".join(f"{k} {min(v) / plain:.2f}" for k, v in by.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
