"""Do more ranks pay? mlx-cluster with 1 rank against N ranks, same model, same run.

    python benchmarks/tp_scaling.py --preset tiny --ranks 2 --concurrency 1 8 --repeats 3 \
        --out benchmarks/results/tp-scaling-tiny.json
    # several GPUs (one rank per GPU, NCCL): the dense and the MoE preset, TP 1 / 2 / 4
    python benchmarks/tp_scaling.py --preset 8b --ranks 2 4 --backend nccl --concurrency 1 8 32 --out tp-8b.json
    python benchmarks/tp_scaling.py --preset 30b-a3b --ranks 2 4 --backend nccl --concurrency 1 8 32 --out tp-moe.json

Alternates the layouts (1, N, .., 1, N, ..) for each concurrency, so drift on a shared
machine hits all alike; reports the medians and the ratios N-ranks / 1-rank (TPOT below 1 and
throughput above 1 mean the extra ranks pay). `--ranks 1` times one rank alone. Reuses
compare.py's launcher and load generator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import bench_ours, preset_model, summary_row  # noqa: E402

KEYS = ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms", "completion_tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="model directory (default: make the preset in a temp dir)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="the Ns to compare against one rank")
    p.add_argument("--backend", default=None, help="cluster.backend (default: the cluster's own choice)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxc-tp-"))
    model = preset_model(args, workdir)
    layouts = tuple(dict.fromkeys((1, *args.ranks)))
    results: dict = {"preset": args.preset, "ranks": args.ranks, "model": model, "runs": []}
    for concurrency in args.concurrency:
        for repeat in range(args.repeats):
            for ranks in layouts:
                r = bench_ours(model, ranks, workdir, concurrency, args, backend=args.backend)
                row = {"ranks": ranks, "concurrency": concurrency, "repeat": repeat, **summary_row(r)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for concurrency in args.concurrency:
        med = {
            ranks: {
                k: statistics.median(
                    r[k] for r in results["runs"] if r["ranks"] == ranks and r["concurrency"] == concurrency
                )
                for k in KEYS
            }
            for ranks in layouts
        }
        one = med[1]
        row = {"concurrency": concurrency, "one_rank": one}
        for ranks in layouts[1:]:
            many = med[ranks]
            row[f"{ranks}_ranks"] = many
            # one N: the keys earlier result files have; several: each ratio keyed by its N
            suffix = "" if len(layouts) == 2 else f"_{ranks}"
            row["tpot_ratio" + suffix] = many["tpot_p50_ms"] / one["tpot_p50_ms"]
            row["throughput_ratio" + suffix] = many["output_tok_s"] / one["output_tok_s"]
            row["ttft_ratio" + suffix] = many["ttft_p50_ms"] / one["ttft_p50_ms"]
        summary.append(row)
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
