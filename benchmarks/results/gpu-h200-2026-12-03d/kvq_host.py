"""A decode step at batch 8, context 1,024, on the fused `8b` (as a served rank runs it): the
Python graph build, `async_eval` and the whole step apart, for mlx-lm's BatchKVCache against
this project's BatchQuantizedKVCache (whole-allocation reads, as on CUDA), with rows of equal
length and with left padding. Only the full-precision half ran before the device time ran out.

    PYTHONPATH=. python3 benchmarks/results/gpu-h200-2026-12-03d/kvq_host.py /tmp/mlxc-8b
"""

import sys
import time

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from mlx_cluster.engine.kv_quant import BatchQuantizedKVCache
from mlx_cluster.models.fuse import fuse_projections
from mlx_cluster.models.loader import load_model_shard

loaded = load_model_shard(sys.argv[1], mx.distributed.init())
model = loaded.model
fuse_projections(model)
LAYERS = len(model.layers)


def caches(kind: str, padding: list[int]) -> list:
    if kind == "none":
        return [BatchKVCache(padding) for _ in range(LAYERS)]
    return [BatchQuantizedKVCache(padding, 64, 8, contiguous_reads=True) for _ in range(LAYERS)]


def run(kind: str, padding: list[int], steps: int = 32) -> tuple[float, float, float]:
    cache = caches(kind, padding)
    x = mx.array([[(i * 7 + 3) % 30000 + 10 for i in range(1024)]] * 8)
    for s in range(0, 1024, 512):
        mx.eval(model(x[:, s : s + 512], cache=cache))
    y = model(mx.array([[5]] * 8), cache=cache)[:, -1:, :].argmax(-1)
    mx.eval(y)
    build = launch = 0.0
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        a = time.perf_counter()
        y = model(y, cache=cache)[:, -1:, :].argmax(-1)
        b = time.perf_counter()
        mx.async_eval(y)
        build += b - a
        launch += time.perf_counter() - b
    mx.eval(y)
    mx.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3, build / steps * 1e3, launch / steps * 1e3


for rnd in range(2):
    for kind in ("none", "q8"):
        for padding in ([0] * 8, [0, 30, 60, 90, 120, 150, 180, 210]):
            total, b, e = run(kind, padding)
            print(
                f"round {rnd} {kind:>4} pad {max(padding):3d}: step {total:6.2f} ms  build {b:5.2f}  async_eval {e:5.2f}",
                flush=True,
            )
