"""Prefill and decode apart, with and without 8-bit live KV: mlx-lm's model and this project's
quantized cache directly (no engine, no HTTP), three variants in turns:

  none        mlx-lm's KVCache, fused SDPA
  q8          BatchQuantizedKVCache (8 bits, whole-allocation reads as on CUDA), mlx-lm's
              quantized attention (two quantized products and a softmax)
  q8-dequant  the same cache, dequantized per layer into the fused SDPA kernel

Run on the device from the repository root, after make-model /tmp/mlxc-8b --preset 8b:
    PYTHONPATH=. python3 benchmarks/results/gpu-h200-2026-12-03c/kvq_parts.py /tmp/mlxc-8b [GROUP_SIZE]
"""

import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache

from mlx_cluster.engine.kv_quant import BatchQuantizedKVCache

model, _ = load(sys.argv[1])
GROUP = int(sys.argv[2]) if len(sys.argv) > 2 else 64
LAYERS = len(model.layers)
VOCAB = model.args.vocab_size
mlx_lm_attention = llama.scaled_dot_product_attention


def dequantized_attention(queries, keys, values, cache, scale, mask, sinks=None):
    if hasattr(cache, "bits") and isinstance(keys, tuple):
        k = mx.dequantize(*keys, group_size=cache.group_size, bits=cache.bits).astype(queries.dtype)
        v = mx.dequantize(*values, group_size=cache.group_size, bits=cache.bits).astype(queries.dtype)
        return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask)
    return mlx_lm_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


def caches(kind: str, batch: int) -> list:
    if kind == "none":
        return [KVCache() for _ in range(LAYERS)]
    return [BatchQuantizedKVCache([0] * batch, GROUP, 8, contiguous_reads=True) for _ in range(LAYERS)]


def prefill(kind: str, batch: int = 1, tokens: int = 1024, chunk: int = 512):
    cache = caches(kind, batch)
    x = mx.array([[(i * 7 + 3) % (VOCAB - 10) + 10 for i in range(tokens)]] * batch)
    mx.synchronize()
    t0 = time.perf_counter()
    for s in range(0, tokens, chunk):
        mx.eval(model(x[:, s : s + chunk], cache=cache))
    mx.synchronize()
    return (time.perf_counter() - t0) * 1e3, cache


def decode(kind: str, batch: int = 8, context: int = 1024, steps: int = 32) -> float:
    _, cache = prefill(kind, batch, context)
    y = mx.array([[5]] * batch)
    mx.eval(model(y, cache=cache))
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        y = model(y, cache=cache)[:, -1:, :].argmax(-1)
        mx.async_eval(y)
    mx.eval(y)
    mx.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


for rnd in range(2):
    for name in ("none", "q8", "q8-dequant"):
        llama.scaled_dot_product_attention = dequantized_attention if name == "q8-dequant" else mlx_lm_attention
        kind = "none" if name == "none" else "q8"
        one, _ = prefill(kind, 1)
        eight, _ = prefill(kind, 8)
        step = decode(kind)
        print(
            f"round {rnd} {name:>11}: prefill 1x1024 {one:7.1f} ms  prefill 8x1024 {eight:7.1f} ms  "
            f"decode step b8 ctx1024 {step:6.2f} ms",
            flush=True,
        )
