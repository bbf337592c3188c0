"""Replay the speculator's choices on recorded greedy text, to tune them without a GPU (issue 11).

Which steps verify, how many proposals each row makes and how many are accepted depend only
on the tokens a model produces and on the rules in engine/speculate.py, not on timing. So one
short device run records a model's plain greedy continuations (`dump`), and the rules are then
replayed on the host against that text (`replay`): the real `Speculator` decides every step;
acceptance is the recorded next tokens. Each step is priced in plain decode steps:

  plain     1 (pipelined: the next step's graph is built while this one runs)
  drained   a plain step that starts with nothing in flight (after a verify, or after waiting
            for the pending token and finding nothing): the `drained` figure of the dump
  verify    VerifyCost.of(k), as measured by `measure_verify_cost` on the device

so `tokens / cost` is the modelled speed-up over speculation off. A dump also records the
model's acceptance-free facts: which prompt, which continuation. (Greedy text from a width-W
forward can differ from plain text in bf16; the replay assumes it does not.)

    python3 benchmarks/spec_replay.py dump --model /tmp/mlxc-8b --max-tokens 512 --out tokens-8b.json
    python3 benchmarks/spec_replay.py replay tokens-8b.json
    python3 benchmarks/spec_replay.py replay tokens-8b.json --num-tokens 8 --max-backoff 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def dump(args) -> None:
    from speculative import workloads  # noqa: I001  (first: it picks the CPU BLAS, before mlx loads)
    import mlx.core as mx

    from mlx_cluster.cache.testing import generate, make_executor
    from mlx_cluster.engine.speculate import NgramProposer, Speculator
    from mlx_cluster.engine.verify_cost import measure_verify_cost
    from mlx_cluster.models.builtin import resolve_model_path
    from mlx_cluster.models.loader import load_model_shard

    loaded = load_model_shard(resolve_model_path(args.model, args.models_dir), mx.distributed.init())
    vocab = loaded.config.get("vocab_size")
    prompts = workloads(min(vocab, 2048), args.prompts, args.seed)  # as speculative.py
    prompts["profile"] = [[17 + 13 * i] * 48 for i in range(2)]  # spec_profile.py's prompts
    ex = make_executor(loaded, None, max_batch_size=1)
    out = {"model": args.model, "device": str(mx.default_device()), "workloads": {}}
    for name, ps in prompts.items():
        out["workloads"][name] = [[p, generate(ex, [p], args.max_tokens)[0].tokens] for p in ps]
    speculator = Speculator(NgramProposer(2, 4), args.num_tokens, 1)
    ex = make_executor(loaded, None, max_batch_size=1, speculator=speculator)
    costs = [measure_verify_cost(ex, speculator) for _ in range(3)]
    out["verify_cost"] = [[c.narrow, c.wide, c.num_tokens] for c in costs]
    out["drained"] = drained_step(ex)
    Path(args.out).write_text(json.dumps(out))
    print(f"{args.out}: verify cost {out['verify_cost']}, drained step {out['drained']:.2f}")


def drained_step(ex, repeats: int = 8) -> float:
    """A plain step that waits for the last one first (nothing in flight), in pipelined steps."""
    from mlx_cluster.engine.plan import NewSequence, SamplingParams, StepPlan

    params = SamplingParams(max_tokens=1 << 16, seed=0, temperature=0.0)
    ex.apply(StepPlan(step=0, new=(NewSequence(seq_id=1 << 40, prompt=(5,) * 32, params=params),)))
    batch = ex.generator._generation_batch
    batch.speculator = None
    for _ in range(3):
        ex.step()
    timings = {}
    for mode in ("pipelined", "drained", "pipelined"):
        started = time.perf_counter()
        for _ in range(repeats):
            if mode == "drained":
                batch._next_tokens.tolist()
            ex.step()
        timings.setdefault(mode, []).append((time.perf_counter() - started) / repeats)
    ex.apply(StepPlan(step=0, drop=(1 << 40,)))
    return min(timings["drained"]) / min(timings["pipelined"])


class _Row:
    constraint = None


class ReplayBatch:
    """The parts of a DecodeBatch the Speculator reads, for one row whose text is known."""

    def __init__(self, stream: list[int], start: int):
        self.stream = stream  # prompt + recorded continuation
        self.uids, self.prompt_cache = [1], []
        self.samplers, self.logits_processors = [_Row()], [None]
        self.at = start  # tokens in the KV cache; stream[at] is the pending token
        self.tokens = [stream[:start]]
        self.max_tokens, self._num_tokens = [len(stream) - start], [0]
        self.waits = 0

    @property
    def _next_tokens(self):
        self.waits += 1
        pending = self.stream[self.at]
        return type("Pending", (), {"tolist": lambda _self: [pending]})()

    def advance(self, n: int) -> None:
        self.at += n
        self._num_tokens[0] += n
        self.tokens = [self.stream[: self.at]]


def replay_one(speculator, prompt: list[int], output: list[int], drained: float, true_cost) -> dict:
    from mlx_cluster.engine.speculate import Speculator

    stream = prompt + output
    batch = ReplayBatch(stream, len(prompt))
    counts = {"plain": 0, "drained": 0, "verify": 0, "tokens": 0, "cost": 0.0}
    restart = True  # the first step has nothing in flight
    while batch.at < len(stream) - 1:
        waits = batch.waits
        chosen = Speculator.choose(speculator, batch)
        if chosen is None:
            kind = "drained" if restart or batch.waits > waits else "plain"
            counts[kind] += 1
            counts["cost"] += drained if kind == "drained" else 1.0
            batch.advance(1)
            counts["tokens"] += 1
            restart = False
            continue
        last, [p] = chosen
        truth = stream[batch.at + 1 : batch.at + 1 + len(p)]
        a = 0
        while a < len(p) and a < len(truth) and p[a] == truth[a]:
            a += 1
        speculator.account(batch.uids, [p], [a])
        counts["verify"] += 1
        counts["cost"] += true_cost.of(len(p))
        batch.advance(a + 1)
        counts["tokens"] += a + 1
        restart = True
    speculator._forget(set())
    return counts


def replay(args) -> None:
    from mlx_cluster.engine import speculate
    from mlx_cluster.engine.speculate import NgramProposer, Speculator
    from mlx_cluster.engine.verify_cost import VerifyCost

    data = json.loads(Path(args.tokens).read_text())
    measured = data["verify_cost"]
    narrow = sorted(c[0] for c in measured)[len(measured) // 2]
    wide = sorted(c[1] for c in measured)[len(measured) // 2]
    if args.cost:
        narrow, wide = args.cost
    true_cost = VerifyCost(narrow, wide, measured[0][2])
    drained = args.drained or data["drained"]
    if args.max_backoff is not None:
        speculate.MAX_BACKOFF_STEPS = args.max_backoff
    believed = VerifyCost(*(args.believe or (narrow, wide)), args.num_tokens)
    print(
        f"{data['model']} on {data['device']}: verify costs {narrow:.2f} (1 proposal) .. {wide:.2f} "
        f"({measured[0][2]}) plain steps, a drained step {drained:.2f}; replaying K={args.num_tokens}, "
        f"believed cost {believed.narrow:.2f} .. {believed.wide:.2f}, back-off up to {speculate.MAX_BACKOFF_STEPS}"
    )
    for name, pairs in data["workloads"].items():
        total = {"plain": 0, "drained": 0, "verify": 0, "tokens": 0, "cost": 0.0}
        for prompt, output in pairs:
            speculator = Speculator(NgramProposer(args.lookup_min, args.lookup_max), args.num_tokens, 1, believed)
            for k, v in replay_one(speculator, prompt, output, drained, true_cost).items():
                total[k] += v
        steps = total["plain"] + total["drained"] + total["verify"]
        print(
            f"  {name:10s} {total['tokens']} tokens in {steps} steps ({total['plain']} plain, {total['drained']} "
            f"drained, {total['verify']} verify): modelled {total['tokens'] / total['cost']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="record plain greedy text and the measured costs (on the device)")
    d.add_argument("--model", default="builtin:tiny")
    d.add_argument("--models-dir", default="~/.cache/mlx-cluster/models")
    d.add_argument("--max-tokens", type=int, default=512)
    d.add_argument("--prompts", type=int, default=4, help="prompts per workload of speculative.py")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-tokens", type=int, default=4, help="K of the measured verify cost")
    d.add_argument("--out", required=True)
    r = sub.add_parser("replay", help="replay the speculator's rules on a dump")
    r.add_argument("tokens")
    r.add_argument("--num-tokens", type=int, default=4)
    r.add_argument("--lookup-min", type=int, default=2)
    r.add_argument("--lookup-max", type=int, default=4)
    r.add_argument("--max-backoff", type=int, default=None)
    r.add_argument("--cost", type=float, nargs=2, default=None, help="true verify cost (1 proposal, K)")
    r.add_argument("--believe", type=float, nargs=2, default=None, help="cost the speculator decides by")
    r.add_argument("--drained", type=float, default=None)
    args = ap.parse_args()
    dump(args) if args.command == "dump" else replay(args)


if __name__ == "__main__":
    main()
