"""Constrained vs free decoding, side by side on one cluster: TPOT at a given concurrency.

Every request streams exactly --output-len tokens: free requests use ignore_eos, constrained
ones a JSON schema that cannot be complete before that (an array of at least 200 short
strings), so both sides decode the same number of tokens. Rounds alternate free and
constrained to spread the machine's noise over both.

    python benchmarks/constrained.py --ranks 1 --concurrency 8 --rounds 3 --out benchmarks/results/constrained-tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Cluster  # noqa: E402  (the same harness the tests use)

LONG_JSON = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 200, "items": {"type": "string", "maxLength": 8}}},
    "required": ["items"],
    "additionalProperties": False,
}
KINDS = {
    "free": {"ignore_eos": True},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG_JSON}}},
}


def one_request(url: str, extra: dict, output_len: int, seed: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": f"Request {seed}: list some words."}],
        "max_tokens": output_len,
        "seed": seed,
        "stream": True,
        **extra,
    }
    times = []
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            # One chunk per engine token event; the first chunk only carries the role.
            if line.startswith("data: {") and '"role":"assistant"' not in line:
                times.append(time.perf_counter())
    return {
        "ttft_s": times[0] - start,
        "tpot_s": (times[-1] - times[0]) / max(len(times) - 1, 1),
        "chunks": len(times),
    }


def round_of(url: str, kind: str, concurrency: int, output_len: int, seed0: int) -> list[dict]:
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one_request, url, KINDS[kind], output_len, seed0 + i) for i in range(concurrency)]
        return [f.result() for f in futures]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlx-cluster-constrained-"))
    cluster = Cluster(
        work,
        ranks=args.ranks,
        models_dir=Path("~/.cache/mlx-cluster/models").expanduser(),
        config={"model": {"path": f"builtin:{args.preset}"}, "scheduler": {"max_batch_size": max(8, args.concurrency)}},
    )
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with cluster:
        round_of(cluster.url, "json_schema", 2, 8, 0)  # warm up both paths (llguidance's tokenizer view, compile)
        round_of(cluster.url, "free", 2, 8, 0)
        for r in range(args.rounds):
            for kind in KINDS:
                results[kind] += round_of(cluster.url, kind, args.concurrency, args.output_len, 1000 * r)
    summary = {}
    for kind, rows in results.items():
        tpots = [row["tpot_s"] * 1e3 for row in rows]
        summary[kind] = {
            "requests": len(rows),
            "tpot_ms_p50": round(statistics.median(tpots), 2),
            "tpot_ms_mean": round(statistics.fmean(tpots), 2),
            "ttft_ms_p50": round(statistics.median(row["ttft_s"] * 1e3 for row in rows), 1),
        }
    summary["tpot_ratio_p50"] = round(summary["json_schema"]["tpot_ms_p50"] / summary["free"]["tpot_ms_p50"], 3)
    report = {
        "preset": args.preset,
        "ranks": args.ranks,
        "concurrency": args.concurrency,
        "output_len": args.output_len,
        **summary,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
