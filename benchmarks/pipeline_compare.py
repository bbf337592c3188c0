"""Tensor vs pipeline vs hybrid layouts, side by side in one run (same model, same load).

    python benchmarks/pipeline_compare.py --preset tiny --layouts T2 P2 --concurrency 8 --repeats 3
    python benchmarks/pipeline_compare.py --preset tiny --layouts T2 P3 --concurrency 8   # 3 vs 2 ranks
    NCCL_NVLS_ENABLE=0 python benchmarks/pipeline_compare.py --preset 8b --backend nccl --layouts T2 P2 T1 \
        --concurrency 1 8 32 --input-len 512 --output-len 128                           # 2 GPUs

A layout is T<n> (n ranks, all tensor), P<n> (n pipeline stages), P<n>m<k> (n stages, k decode
micro-batches: P2m1 is one forward pass at a time), T<a>xP<b> (hybrid) or auto<n> (n ranks,
parallel: auto). Layouts alternate (A, B, A, B, ...) for each concurrency so
drift on a shared machine hits all alike; prints medians and each layout's ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import bench_ours, summary_row  # noqa: E402

KEYS = ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")


def parse_layout(text: str) -> tuple[int, object]:
    """(ranks, cluster.parallel) of a layout name."""
    if m := re.fullmatch(r"T(\d+)xP(\d+)", text):
        t, p = int(m[1]), int(m[2])
        return t * p, {"tensor": t, "pipeline": p}
    if m := re.fullmatch(r"T(\d+)", text):
        return int(m[1]), None
    if m := re.fullmatch(r"P(\d+)", text):
        return int(m[1]), {"tensor": 1, "pipeline": int(m[1])}
    if m := re.fullmatch(r"P(\d+)m(\d+)", text):  # explicit decode micro-batches (P2m1: one at a time)
        return int(m[1]), {"tensor": 1, "pipeline": int(m[1]), "microbatches": int(m[2])}
    if m := re.fullmatch(r"auto(\d+)", text):
        return int(m[1]), "auto"
    raise SystemExit(f"unknown layout {text!r}: use T2, P2, P2m1, T2xP2 or auto2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="model directory (default: make the preset in a temp dir)")
    p.add_argument("--layouts", nargs="+", default=["T2", "P2"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[8])
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--backend", default=None, help="cluster.backend (nccl on NVIDIA GPUs; default ring)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxc-pp-"))
    model = args.model or str(workdir / args.preset)
    if args.model is None:
        subprocess.run(
            [sys.executable, "-m", "mlx_cluster", "make-model", model, "--preset", args.preset],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    results: dict = {"preset": args.preset, "layouts": args.layouts, "runs": []}
    for concurrency in args.concurrency:
        for repeat in range(args.repeats):
            for layout in args.layouts:
                ranks, parallel = parse_layout(layout)
                r = bench_ours(model, ranks, workdir, concurrency, args, parallel, args.backend)
                row = {"layout": layout, "concurrency": concurrency, "repeat": repeat, **summary_row(r)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for concurrency in args.concurrency:
        runs = [r for r in results["runs"] if r["concurrency"] == concurrency]
        med = {
            layout: {k: statistics.median(r[k] for r in runs if r["layout"] == layout) for k in KEYS}
            for layout in args.layouts
        }
        base = med[args.layouts[0]]
        summary.append(
            {
                "concurrency": concurrency,
                "medians": med,
                f"throughput_ratio_to_{args.layouts[0]}": {
                    layout: m["output_tok_s"] / base["output_tok_s"] for layout, m in med.items()
                },
            }
        )
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
