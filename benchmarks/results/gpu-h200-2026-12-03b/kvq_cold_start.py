"""Where a kv_bits:8 start-up spends its time on CUDA (in process, timestamps per stage).

Run on the device from the repository root, after make-model /tmp/mlxc-8b --preset 8b:
    PYTHONPATH=. python3 benchmarks/results/gpu-h200-2026-12-03b/kvq_cold_start.py
"""

import logging
import time

import mlx.core as mx

from mlx_cluster.engine import kv_quant
from mlx_cluster.engine.executor import Executor, warmup
from mlx_cluster.models.loader import load_model_shard

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

t = time.perf_counter()


def stamp(what):
    global t
    now = time.perf_counter()
    print(f"{what}: {now - t:.1f} s", flush=True)
    t = now


loaded = load_model_shard("/tmp/mlxc-8b", mx.distributed.init())
stamp("load")
live = kv_quant.LiveKV(8, 64)
print("strided probe:", kv_quant.attention_error(loaded.model, live))
stamp("strided probe")
live = kv_quant.LiveKV(8, 64, contiguous_reads=True)
print("whole probe:", kv_quant.attention_error(loaded.model, live))
stamp("whole probe")
print("whole probe again:", kv_quant.attention_error(loaded.model, live))
stamp("whole probe again")
kv_quant.kv_budget(65536, loaded.model, live)
stamp("kv_budget")
ex = Executor(loaded.model, vocab_size=32000, max_batch_size=64, prefill_batch_size=8, prefill_chunk=512, live_kv=live)
stamp("executor")
warmup(ex, token_id=0, prefill_tokens=256)
stamp("warmup")
warmup(ex, token_id=0, prefill_tokens=256)
stamp("warmup again")
