"""The served decode step without HTTP: an in-process Engine with rank 0's Frontend (and a
prefix cache with `prefix`), 16 requests of 512 + 128 tokens kept 8 in flight, full precision
and kv_bits 8 in turns; prints each run's median decode step at batch 8 from its step trace.

    python3 benchmarks/results/kv_quant_engine_loop.py prefix|noprefix [builtin:tiny|builtin:small] [ROUNDS]
"""

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from mlx_cluster.runtime.cpu_blas import use_cpu_blas_from_env  # noqa: E402

use_cpu_blas_from_env()  # before mlx, as a rank does
import mlx.core as mx  # noqa: E402
from trace_steps import summarize  # noqa: E402

from mlx_cluster.cache.testing import LocalBus, cache_config, greedy, make_executor  # noqa: E402
from mlx_cluster.config import CacheSection  # noqa: E402
from mlx_cluster.engine.engine import Engine  # noqa: E402
from mlx_cluster.engine.frontend import DoneEvent, Frontend, GenerationRequest  # noqa: E402
from mlx_cluster.engine.kv_quant import kv_budget, resolve_live_kv  # noqa: E402
from mlx_cluster.engine.trace import StepTrace  # noqa: E402
from mlx_cluster.models.builtin import resolve_model_path  # noqa: E402
from mlx_cluster.models.fuse import fuse_projections  # noqa: E402
from mlx_cluster.models.loader import load_model_shard  # noqa: E402

PREFIX = sys.argv[1] == "prefix"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "builtin:tiny"
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
MODELS_DIR = str(Path("~/.cache/mlx-cluster/models").expanduser())

loaded = load_model_shard(resolve_model_path(MODEL, MODELS_DIR), mx.distributed.init())
fuse_projections(loaded.model)  # as a served rank runs it
out_dir = tempfile.mkdtemp()


def run(bits, rnd: int) -> None:
    live = resolve_live_kv(CacheSection(kv_bits=bits, kv_group_size=32), loaded.model)
    ex = make_executor(loaded, cache_config(None) if PREFIX else None, max_batch_size=64, live_kv=live)
    budget = kv_budget(32768, loaded.model, live).tokens
    frontend = Frontend(loaded.tokenizer, max_batch_size=64, max_new_per_step=8, max_queue=64, max_kv_tokens=budget)
    trace = StepTrace(f"{out_dir}/kv{bits}-{rnd}", 0)
    engine = Engine(ex, LocalBus(), frontend, heartbeat_s=1.0, trace=trace)
    done, sent = [], 0

    def submit() -> None:
        nonlocal sent
        prompt = [100 + (sent * 37 + j * 7) % 1500 for j in range(512)]
        deliver = lambda e: done.append(e) if isinstance(e, DoneEvent) else None  # noqa: E731
        frontend.submit(GenerationRequest(f"r{rnd}-{sent}", prompt, greedy(128), deliver))
        sent += 1

    for _ in range(8):
        submit()
    started = time.perf_counter()
    while len(done) < 16:
        before = len(done)
        engine.step()
        for _ in range(len(done) - before):
            if sent < 16:
                submit()
    wall = time.perf_counter() - started
    trace.flush()
    steps = summarize(trace.path)
    b8, admit = steps.get("decode b8", {}), steps.get("admit", {})
    print(
        f"kv{bits} round {rnd}: wall {wall:.2f} s  decode b8 median {b8.get('median_ms')} ms "
        f"({b8.get('steps')} steps)  admits {admit.get('total_ms')} ms",
        flush=True,
    )


for rnd in range(ROUNDS):
    for bits in (None, 8):
        run(bits, rnd)
