"""Do N ranks generate what one rank does? TP=1 against TP=N, token by token, over the served API.

    python3 benchmarks/tp_identity.py --preset tiny --ranks 2                 # CPU: ring on loopback
    python3 benchmarks/tp_identity.py --model /tmp/mlxc-8b --ranks 2 4 --backend nccl --out tp-identity.json

Each layout is started with `mlx-cluster up` (compare.py's launcher), one after the other, and
asked the same completions one at a time: greedy (temperature 0) and seeded (temperature 0.8,
top_p 0.95, one seed per prompt), each with the top two log-probabilities of every token.

Tensor parallelism sums partial products in another order than one rank does, so logits differ
in the last bits. Where the one-rank reference's best two tokens are closer than `--tie`
(log-probability), that can pick the other token: a near-tie, after which the texts diverge
legitimately. A greedy divergence anywhere else is a computation that differs, and the script
exits with status 1. Seeded runs are compared the same way and reported: one seed drives the
same draws on every rank and in every layout, so they match up to the first near-tie too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import preset_model, start_ours, stop, wait_up  # noqa: E402

PROMPTS = [
    "The cluster serves every rank the same plan, and",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a data center far away,",
    "Tensor parallelism splits each layer's weights across GPUs so that",
    "1, 2, 3, 5, 8, 13,",
    "The quick brown fox",
]


def complete(url: str, model: str, prompt: str, max_tokens: int, sampling: dict) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "logprobs": 2, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json={**body, **sampling}, timeout=600)
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    return {"tokens": lp["tokens"], "top": lp["top_logprobs"]}


def run_layout(model: str, ranks: int, workdir: Path, args) -> dict[str, list[dict]]:
    """Every prompt greedy and seeded on one cluster of `ranks` ranks."""
    proc, url = start_ours(model, ranks, workdir, max_batch=8, backend=args.backend)
    try:
        wait_up(url, proc, timeout_s=args.ready_timeout)
        out = {"greedy": [], "seeded": []}
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            out["greedy"].append(complete(url, model, prompt, args.max_tokens, {"temperature": 0}))
            seeded = {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i}
            out["seeded"].append(complete(url, model, prompt, args.max_tokens, seeded))
        return out
    finally:
        stop(proc)


def margin(top: dict[str, float]) -> float:
    """The reference's lead of its best token over the second (infinite with one candidate)."""
    best = sorted(top.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


def compare(reference: dict, other: dict, tie: float) -> dict:
    """Where `other` first leaves `reference`, and whether the reference was a near-tie there."""
    for pos, (a, b) in enumerate(zip(reference["tokens"], other["tokens"])):
        if a != b:
            lead = margin(reference["top"][pos])
            return {"match": False, "diverges_at": pos, "reference_margin": lead, "near_tie": lead < tie}
    return {"match": len(reference["tokens"]) == len(other["tokens"]), "diverges_at": None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="model directory (default: make the preset in a temp dir)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="the Ns compared with one rank")
    p.add_argument("--backend", default=None, help="cluster.backend (default: the cluster's own choice)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tie", type=float, default=0.05, help="log-probability lead below which a flip is a near-tie")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxc-tp-identity-"))
    model = preset_model(args, workdir)
    runs = {n: run_layout(model, n, workdir, args) for n in dict.fromkeys((1, *args.ranks))}
    report: dict = {"model": model, "max_tokens": args.max_tokens, "tie": args.tie, "layouts": {}}
    failed = False
    for n in args.ranks:
        if n == 1:
            continue
        layout = {}
        for mode in ("greedy", "seeded"):
            rows = [compare(ref, got, args.tie) for ref, got in zip(runs[1][mode], runs[n][mode])]
            layout[mode] = rows
            exact = sum(r["match"] for r in rows)
            ties = sum(not r["match"] and r["near_tie"] for r in rows)
            wrong = len(rows) - exact - ties
            failed |= mode == "greedy" and wrong > 0
            print(
                f"TP={n} vs TP=1, {mode}: {exact}/{len(rows)} identical, {ties} diverge at a near-tie, {wrong} otherwise"
            )
            for i, r in enumerate(rows):
                if not r["match"]:
                    print(
                        f"  prompt {i}: first differs at token {r['diverges_at']} (reference lead {r['reference_margin']:.3f})"
                    )
        report["layouts"][n] = layout
    report["verdict"] = "differs" if failed else "identical up to near-ties"
    print(report["verdict"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
