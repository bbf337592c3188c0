"""Where a speculative step's time goes, single stream, next to a plain step (issue 11).

Runs greedy generation of repetitive prompts with n-gram speculation off and on through the
engine's executor in process, and splits each mode's wall time into:

  build     host time inside the model's forward call (building the graph; nothing waits)
  wait      host time inside mx.eval (MLX encodes and launches kernels, then the device finishes)
  propose / rollback / emit   the speculative step's own bookkeeping
  spec step the whole Speculator.step (None when it lets a plain step run), verify step its verify

A plain step overlaps the next step's build with the device (mlx-lm's async pipelining), so
its "wait" hides build; a verify step is synchronous, so its build and other are added to the
device time. Then, for the same single sequence, a synchronous forward of each width W (what a
verify of W - 1 proposals runs), split into build and eval. --cprofile adds the top functions
by own time (it slows Python-heavy steps, so the timings above are taken without it).

    python3 benchmarks/spec_profile.py --model /tmp/mlxc-8b --max-tokens 256 --out /tmp/res/spec_profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_cluster.runtime.cpu_blas import use_cpu_blas_from_env  # noqa: E402

use_cpu_blas_from_env()  # before mlx: multiply as a served rank does (cluster.cpu_blas: auto, or MLX_CLUSTER_CPU_BLAS)

import mlx.core as mx  # noqa: E402

from mlx_cluster.cache.testing import generate, make_executor, new_sequences  # noqa: E402
from mlx_cluster.config import SpeculativeSection  # noqa: E402
from mlx_cluster.engine import speculate  # noqa: E402
from mlx_cluster.engine.plan import StepPlan  # noqa: E402
from mlx_cluster.engine.speculate import Speculator, make_speculator  # noqa: E402
from mlx_cluster.engine.verify_cost import VerifyCost, measure_verify_cost  # noqa: E402


class Clock:
    """Accumulates host time spent in wrapped callables, by label (a label's outermost call only)."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.durations: dict[str, list[float]] = {}
        self._inside: set[str] = set()

    def wrap(self, label, fn):
        def timed(*a, **kw):
            if label in self._inside:
                return fn(*a, **kw)
            self._inside.add(label)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._inside.discard(label)
                dt = time.perf_counter() - t0
                self.spent[label] = self.spent.get(label, 0.0) + dt
                self.durations.setdefault(label, []).append(dt)
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--models-dir", default="~/.cache/mlx-cluster/models")
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--widths", type=int, nargs="*", default=[1, 2, 3, 5, 8])
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--free-form", action="store_true", help="random-token prompts instead of repetitive ones")
    ap.add_argument(
        "--cost", type=float, nargs=2, default=None, help="what-if: verify cost (1 proposal, K), not measured"
    )
    ap.add_argument("--max-backoff", type=int, default=None, help="what-if: speculate.MAX_BACKOFF_STEPS")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import load_model_shard

    loaded = load_model_shard(resolve_model_path(args.model, args.models_dir), mx.distributed.init())
    vocab = loaded.config.get("vocab_size")
    section = SpeculativeSection(method="ngram", num_tokens=args.num_tokens)
    speculator = make_speculator(section, loaded.tokenizer, vocab, args.models_dir)
    prompts = [[17 + 13 * i] * 48 for i in range(args.prompts)]
    if args.free_form:  # random tokens, as speculative.py's free-form workload
        rng = random.Random(0)
        prompts = [[rng.randrange(16, min(vocab, 2048)) for _ in range(48)] for _ in range(args.prompts)]
    lines = [f"model {args.model}, device {mx.default_device()}, n-gram K={args.num_tokens}"]

    clock = Clock()
    model = loaded.model
    model_call = type(model).__call__
    type(model).__call__ = clock.wrap("build", model_call)  # every forward, plain or verify
    mx.eval = clock.wrap("wait", mx.eval)
    Speculator.verify = clock.wrap("verify step", Speculator.verify)
    Speculator.step = clock.wrap("spec step", Speculator.step)
    Speculator._rollback = staticmethod(clock.wrap("rollback", Speculator._rollback))
    Speculator._emit = staticmethod(clock.wrap("emit", Speculator._emit))
    speculator.proposer.propose = clock.wrap("propose", speculator.proposer.propose)
    if args.cost:  # what-ifs for the back-off rule
        speculator.cost = VerifyCost(*args.cost, args.num_tokens)
    else:  # as a served rank does at start-up
        speculator.cost = measure_verify_cost(
            make_executor(loaded, None, max_batch_size=1, speculator=speculator), speculator
        )
    c = speculator.cost
    lines.append(f"a verify step costs {c.narrow:.2f} plain steps (1 proposal) .. {c.wide:.2f} ({c.num_tokens})")
    if args.max_backoff is not None:
        speculate.MAX_BACKOFF_STEPS = args.max_backoff

    # Why a row did not verify on a step: sitting out a back-off, or its known tokens promised
    # nothing (no suffix recurs), or the lookup after the wait found nothing.
    rows: Counter = Counter()
    due, hopeful = Speculator._due, speculator.proposer.hopeful

    def counted_due(batch, i, state):
        if state.wait > 0:
            rows["sitting out a back-off"] += 1
        return due(batch, i, state)

    def counted_hopeful(uid, tokens):
        ok = hopeful(uid, tokens)
        rows["asked: promising" if ok else "asked: nothing recurs"] += 1
        return ok

    Speculator._due = staticmethod(counted_due)
    speculator.proposer.hopeful = counted_hopeful

    for mode in ("off", "on"):
        ex = make_executor(loaded, None, max_batch_size=1, speculator=speculator if mode == "on" else None)
        for p in prompts:  # compile every shape the measured run will meet (each verify width)
            generate(ex, [p], args.max_tokens)
        clock.spent.clear(), clock.calls.clear(), clock.durations.clear(), rows.clear()
        speculator.reset_stats()
        profiler = cProfile.Profile() if args.cprofile else None
        steps0 = ex.stats.steps
        t0 = time.perf_counter()
        tokens = 0
        if profiler:
            profiler.enable()
        for p in prompts:
            [r] = generate(ex, [p], args.max_tokens)
            tokens += len(r.tokens)
        if profiler:
            profiler.disable()
        steps = ex.stats.steps - steps0
        wall = time.perf_counter() - t0
        per = {k: 1e3 * v / tokens for k, v in clock.spent.items()}
        s = speculator.stats
        lines.append(
            f"\n== speculation {mode}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s, "
            f"{1e3 * wall / tokens:.2f} ms/token, {steps} steps ({1e3 * wall / steps:.2f} ms/step)"
        )
        lines.append(
            "   per token (ms): " + ", ".join(f"{k} {v:.2f} ({clock.calls[k]} calls)" for k, v in sorted(per.items()))
        )
        for label, ds in sorted(clock.durations.items()):
            ds = sorted(ds)
            lines.append(
                f"   {label} per call (ms): p10 {1e3 * ds[len(ds) // 10]:.2f}  p50 {1e3 * ds[len(ds) // 2]:.2f}  "
                f"p90 {1e3 * ds[9 * len(ds) // 10]:.2f}  max {1e3 * ds[-1]:.2f}"
            )
        if mode == "on":
            lines.append(
                f"   verify steps {s.spec_steps}, accepted per verify {s.mean_acceptance_length:.2f}, "
                f"acceptance {s.acceptance_rate:.2f}"
            )
            lines.append("   row-steps: " + ", ".join(f"{k} {v}" for k, v in sorted(rows.items())))
        if profiler:
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
            lines.append(buf.getvalue())
    if args.widths:
        lines += width_costs(loaded, prompts[0], args.widths)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def width_costs(loaded, prompt: list[int], widths: list[int], repeats: int = 20) -> list[str]:
    """Median host build and eval time of one synchronous forward of each width, one sequence,
    on the served batch's cache (a BatchKVCache after a prefill), trimmed back after each."""
    ex = make_executor(loaded, None, max_batch_size=1)
    ex.apply(StepPlan(step=0, new=tuple(new_sequences(ex, [prompt * 8], max_tokens=10_000))))
    for _ in range(4):
        ex.step()
    batch = ex.generator._generation_batch
    mx.eval(batch._next_tokens)
    model, caches = loaded.model, batch.prompt_cache
    lines = ["\n== one synchronous forward of width W (what a verify of W-1 proposals runs), median ms"]
    for w in widths:
        x = mx.array([[prompt[0]] * w], dtype=mx.uint32)
        builds, evals = [], []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            logits = model(x, cache=caches)
            t1 = time.perf_counter()
            mx.eval(logits)
            t2 = time.perf_counter()
            for c in caches:
                c.trim(w)
            if i >= 3:  # the first ones compile and allocate
                builds.append(t1 - t0)
                evals.append(t2 - t1)
        b, e = sorted(builds)[len(builds) // 2], sorted(evals)[len(evals) // 2]
        lines.append(f"   W={w}: build {1e3 * b:.2f}  eval {1e3 * e:.2f}  total {1e3 * (b + e):.2f}")
    ex.close()
    return lines


if __name__ == "__main__":
    main()
