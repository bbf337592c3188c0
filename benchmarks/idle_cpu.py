"""CPU used by each rank of an idle cluster, and bus device syncs per plan under load (0 expected).

python benchmarks/idle_cpu.py --ranks 2 --seconds 20
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Cluster  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20)
    args = p.parse_args()
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="mlxc-idle-")), ranks=args.ranks, name="idle-bench").start()
    try:
        time.sleep(3)  # let start-up work settle
        pids = cluster.rank_pids()
        before = [cpu_seconds(p) for p in pids]
        time.sleep(args.seconds)
        after = [cpu_seconds(p) for p in pids]
        idle = {f"rank{i}": round(100 * (a - b) / args.seconds, 2) for i, (a, b) in enumerate(zip(after, before))}
        metrics = lambda: cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 200, "ignore_eos": True})  # noqa: E731
        text0 = __import__("httpx").get(cluster.url + "/metrics").text
        metrics()
        text1 = __import__("httpx").get(cluster.url + "/metrics").text

        def value(text, name):
            return float(text.split(name + '{model_name="builtin:tiny",rank="0"} ')[1].split()[0])

        plans = value(text1, "mlx_cluster_bus_plans_total") - value(text0, "mlx_cluster_bus_plans_total")
        syncs = value(text1, "mlx_cluster_bus_device_syncs_total") - value(text0, "mlx_cluster_bus_device_syncs_total")
        print(
            json.dumps(
                {
                    "idle_cpu_percent_of_one_core": idle,
                    "seconds": args.seconds,
                    # tests/cluster.py's setting, not the default (1 s): it sets the idle wake-ups
                    "heartbeat_s": cluster.config["supervisor"]["heartbeat_s"],
                    "plans_during_one_200_token_request": plans,
                    "bus_device_syncs_per_plan": round(syncs / plans, 3),
                },
                indent=2,
            )
        )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
