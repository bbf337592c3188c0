"""Several models (`models:`): what switching costs, and what a cold load costs, side by side.

Two clusters run at once: "single" serves builtin:tiny with `model:`; "several" serves `models:`
tiny (loaded at start-up), tiny2 (the same preset under a second name: its own copy, loaded on
first use) and big (a larger preset, loaded on first use). Rounds alternate between them:

* single: N sequential greedy completions of tiny;
* several: N sequential completions alternating tiny, tiny2, tiny, ... (both loaded by the
  warm-up), so every request switches model; and N always for tiny (same cluster, no switch);

the two interleaved request by request, so both see the same (shared, noisy) machine;

then one request for big: its cold load as the log reports it ("loaded model big in N s") and
the request's latency, then a second one (warm). Load counters are read back to show that
alternating reloads nothing.

    python benchmarks/models.py --big 1b --rounds 3 --requests 8 --out benchmarks/results/models-cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.cluster import Cluster  # noqa: E402  (the same harness the tests use)

PROMPT = "The cluster serves every rank the same plan, and"


def complete(cluster: Cluster, model: str | None, max_tokens: int) -> float:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if model is not None:
        body["model"] = model
    started = time.perf_counter()
    r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=1800)
    if r.status_code != 200:
        raise RuntimeError(f"{model}: {r.status_code} {r.text}")
    return time.perf_counter() - started


def loads(cluster: Cluster) -> dict[str, float]:
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^mlx_cluster_model_loads_total\{model="([^"]+)"\} (\S+)$', text, re.M)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--big", default="1b", help="builtin preset loaded cold (default 1b; none: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--models-dir", default="~/.cache/mlx-cluster/models")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    models_dir = Path(args.models_dir).expanduser()
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))

    # A 1b prefill on a slow CPU takes longer than the test harness's 10 s watchdog.
    slow_cpu = {"supervisor": {"collective_timeout_s": 600}}
    single = Cluster(work / "single", ranks=args.ranks, models_dir=models_dir, config=slow_cpu)
    several = Cluster(
        work / "several",
        ranks=args.ranks,
        models_dir=models_dir,
        config={
            "models": [
                {"name": "tiny", "path": "builtin:tiny", "builtin_dir": str(models_dir)},
                {"name": "tiny2", "path": "builtin:tiny", "builtin_dir": str(models_dir)},
            ]
            + (
                [{"name": "big", "path": f"builtin:{args.big}", "builtin_dir": str(models_dir)}]
                if args.big != "none"
                else []
            ),
            **slow_cpu,
        },
    )
    del several.config["model"]
    several.config_path.write_text(yaml.safe_dump(several.config))
    result: dict = {"ranks": args.ranks, "requests": args.requests, "max_tokens": args.max_tokens, "rounds": []}
    try:
        single.start(timeout_s=600)
        several.start(timeout_s=600)
        complete(single, None, args.max_tokens)  # warm both paths once
        for name in ("tiny", "tiny2"):
            complete(several, name, args.max_tokens)
        before = loads(several)
        for _ in range(args.rounds):
            one, alt, same = [], [], []
            for i in range(args.requests):  # interleaved, so all see the same machine
                one.append(complete(single, None, args.max_tokens))
                alt.append(complete(several, ("tiny", "tiny2")[i % 2], args.max_tokens))
                same.append(complete(several, "tiny", args.max_tokens))
            row = {k: statistics.median(v) for k, v in (("single_s", one), ("alternating_s", alt), ("same_s", same))}
            row["ratio"] = row["alternating_s"] / row["single_s"]
            row["same_ratio"] = row["same_s"] / row["single_s"]
            result["rounds"].append(row)
            print(json.dumps(row), flush=True)
        result["loads_before"], result["loads_after"] = before, loads(several)
        result["median_ratio"] = statistics.median(r["ratio"] for r in result["rounds"])
        result["median_same_ratio"] = statistics.median(r["same_ratio"] for r in result["rounds"])
        if args.big == "none":
            print(json.dumps(result, indent=2))
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n")
            return
        cold = complete(several, "big", 1)
        warm = complete(several, "big", 1)
        logged = re.findall(r"loaded model big in ([0-9.]+) s", several.output())
        result["big"] = {
            "preset": args.big,
            "cold_request_s": cold,
            "warm_request_s": warm,
            "logged_load_s": [float(x) for x in logged],
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        several.stop()
        single.stop()


if __name__ == "__main__":
    main()
