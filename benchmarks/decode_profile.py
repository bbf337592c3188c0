"""Where does one batched decode step spend its time? Host graph build, kernel launch, or device?

    python benchmarks/decode_profile.py /tmp/mlxc-8b [--batch 1 32] [--prompt-len 512]

For each batch size it fills mlx-lm's BatchGenerator with prompts (equal lengths, then
unequal ones, which left-pad the batched KV cache), then times decode steps the way the
generator runs them (build step k+1, launch it, then wait for step k), splitting each step
into: Python graph build, launch (async_eval encodes the kernels on the calling thread),
and the wait for the previous step's tokens. A step whose wait is near zero is host-bound.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from mlx_cluster.models.fuse import fuse_projections
from mlx_cluster.models.loader import load_model_shard


def ms(values) -> float:
    return round(statistics.median(values) * 1e3, 3)


def profile(model, stream, batch: int, lengths: list[int], steps: int) -> dict:
    gen = BatchGenerator(
        model, completion_batch_size=batch, prefill_batch_size=batch, prefill_step_size=1024, stream=stream
    )
    rng = random.Random(0)
    vocab = model.args.vocab_size
    gen.insert([[rng.randrange(100, vocab) for _ in range(n)] for n in lengths], max_tokens=[10_000] * batch)
    while len(gen._generation_batch) < batch:
        gen.next()
    g = gen._generation_batch
    cache, tokens = g.prompt_cache, g._next_tokens
    mx.eval(tokens)
    build, launch, wait, total = [], [], [], []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        logits = model(tokens[:, None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nxt = mx.argmax(logprobs, axis=-1)
        t1 = time.perf_counter()
        mx.async_eval(nxt, logprobs)
        t2 = time.perf_counter()
        mx.eval(tokens)
        tokens.tolist()
        t3 = time.perf_counter()
        tokens = nxt
        if i >= 5:
            build.append(t1 - t0)
            launch.append(t2 - t1)
            wait.append(t3 - t2)
            total.append(t3 - t0)
    mx.eval(tokens)
    gen.close()
    return {
        "batch": batch,
        "lengths": f"{min(lengths)}-{max(lengths)}",
        "step_ms": ms(total),
        "build_ms": ms(build),
        "launch_ms": ms(launch),
        "wait_ms": ms(wait),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate matmuls")
    args = p.parse_args()
    stream = mx.new_stream(mx.default_device())
    with mx.stream(stream):
        model = load_model_shard(args.model, mx.distributed.init()).model
        if not args.no_fuse:
            print({"fused_groups": fuse_projections(model)})
        for batch in args.batch:
            n = args.prompt_len
            print(profile(model, stream, batch, [n] * batch, args.steps), flush=True)
            if batch > 1:
                unequal = [n // 2 + (n * i) // batch for i in range(batch)]
                print(profile(model, stream, batch, unequal, args.steps), flush=True)


if __name__ == "__main__":
    main()
