"""Per-request memory growth of the engine, in one process (no HTTP, no second rank).

Drives an Engine (Frontend + Executor on a one-rank local bus) the way the soak does: three
requests at a time, prompt lengths varying, some sharing long prefixes (prefix cache, SSD
tier), some repetitive (n-gram speculation), some JSON-constrained (llguidance), logprobs on
some. After a warm-up it reports, per request: RSS, the Python heap (tracemalloc), glibc's
heap (mallinfo2), MLX's active memory, and the largest tracemalloc differences by traceback.

    python benchmarks/leak_probe.py --requests 1500 --warmup 300 --features spec,cache,grammar
    python benchmarks/leak_probe.py ... --no-reclaim   # as before engine/memory.py
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def malloc_kb() -> dict:
    m = _libc.mallinfo2()
    return {"arena_kb": m.arena // 1024, "mmap_kb": m.hblkhd // 1024, "in_use_kb": m.uordblks // 1024}


def snapshot(n_requests: int) -> dict:
    import mlx.core as mx

    from mlx_cluster.engine.memory import rss_kb

    gc.collect()
    cur, _ = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    return {
        "requests": n_requests,
        "rss_kb": rss_kb(),
        "py_heap_kb": cur // 1024,
        "mlx_active_kb": mx.get_active_memory() // 1024,
        **malloc_kb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--features", default="spec,cache,grammar,logprobs")
    ap.add_argument("--tracemalloc", type=int, default=0, help="frames per traceback (0: off)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-reclaim", action="store_true", help="the engine keeps freed memory when idle (as before)")
    args = ap.parse_args()
    feats = set(args.features.split(",")) - {""}

    from mlx_cluster import constrain
    from mlx_cluster.cache.testing import cache_config, load_tiny, make_engine
    from mlx_cluster.config import SpeculativeSection
    from mlx_cluster.constrain import Answer, ConstraintSpec, GrammarCompiler
    from mlx_cluster.engine.frontend import DoneEvent, ErrorEvent, GenerationRequest
    from mlx_cluster.engine.plan import SamplingParams
    from mlx_cluster.engine.speculate import make_speculator

    work = Path(tempfile.mkdtemp(prefix="leak-probe-"))
    loaded = load_tiny(work / "models")
    vocab = loaded.config["vocab_size"]
    constrain.install(loaded.tokenizer, vocab)
    cfg = None
    if "cache" in feats:
        cfg = cache_config(work / "kv", block_size=16, ram_gb=0.0005, ssd={"policy": "write_through", "max_gb": 0.01})
    speculator = None
    if "spec" in feats:
        section = SpeculativeSection(method="ngram", num_tokens=4)
        speculator = make_speculator(section, loaded.tokenizer, vocab, str(work / "models"))
    engine = make_engine(loaded, cfg, max_batch_size=8, prefill_chunk=128, speculator=speculator)
    if args.no_reclaim:
        engine.reclaimer = None
    grammar = ""
    if "grammar" in feats:
        schema = {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }
        grammar = GrammarCompiler(loaded.tokenizer, vocab).compile(ConstraintSpec(answer=Answer("json", schema)))

    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(16, vocab) for _ in range(200)] for _ in range(3)]
    ids = iter(range(1 << 30))

    def request() -> GenerationRequest:
        kind = rng.choice(["plain", "plain", "long", "spec", "json"])
        short = [rng.randrange(16, vocab) for _ in range(rng.randint(3, 30))]
        prompt = short
        if kind == "long" and "cache" in feats:
            prompt = rng.choice(prefixes) + short
        if kind == "spec":
            prompt = short[:6] * 6
        params = SamplingParams(
            max_tokens=rng.randint(4, 40), seed=0, temperature=0.0, logprobs="logprobs" in feats and rng.random() < 0.5
        )
        g = grammar if kind == "json" else ""
        return GenerationRequest(f"r{next(ids)}", prompt, params, lambda e: None, grammar=g)

    def run_wave(k: int = 3) -> None:
        events = [[] for _ in range(k)]
        for i in range(k):
            req = request()
            req.deliver = events[i].append
            assert engine.frontend.submit(req)
        for _ in range(100_000):
            if all(e and isinstance(e[-1], (DoneEvent, ErrorEvent)) for e in events):
                return
            engine.step()
        raise TimeoutError

    def idle_point() -> None:
        """As the soak measures: load paused, the engine idle (heartbeat plans) for a while."""
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            engine.step()
            time.sleep(0.1)

    done = 0
    t0 = time.monotonic()
    while done < args.warmup:
        run_wave()
        done += 3
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    idle_point()
    gc.collect()
    types0 = Counter(type(o).__name__ for o in gc.get_objects())
    snap0 = tracemalloc.take_snapshot() if args.tracemalloc else None
    base = snapshot(done)
    print(json.dumps({"warm": base, "warmup_s": round(time.monotonic() - t0, 1)}), flush=True)
    series = [base]
    while done < args.warmup + args.requests:
        run_wave()
        done += 3
        if (done - args.warmup) % args.every < 3:
            idle_point()
            s = snapshot(done)
            series.append(s)
            per = {k: round((s[k] - base[k]) * 1024 / max(1, done - base["requests"]), 1) for k in s if k != "requests"}
            print(json.dumps({**s, "bytes_per_request": per}), flush=True)
    gc.collect()
    types1 = Counter(type(o).__name__ for o in gc.get_objects())
    grew = {t: types1[t] - types0.get(t, 0) for t in types1 if types1[t] - types0.get(t, 0) > 20}
    print("gc object types that grew:", json.dumps(dict(sorted(grew.items(), key=lambda x: -x[1])[:25])))
    if snap0 is not None:
        snap1 = tracemalloc.take_snapshot()
        for stat in snap1.compare_to(snap0, "traceback")[:15]:
            print(f"{stat.size_diff / 1024:+.1f} KB {stat.count_diff:+d} blocks")
            for line in stat.traceback.format()[-2 * args.tracemalloc :]:
                print("   ", line)
    engine.executor.close()


if __name__ == "__main__":
    main()
