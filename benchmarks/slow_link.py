"""Tensor vs pipeline vs `auto` over a slow link (0.3 ms each way, 1 Gbit/s), and `auto` on loopback.

    sudo python3 benchmarks/slow_link.py --delay-ms 0.3 --repeats 3 --out benchmarks/results/slow-link-tiny-0.3ms.json
    sudo python3 benchmarks/slow_link.py --preset small --input-len 128    # a machine with fast matmuls

One command, root needed (namespaces): builds two SSH "hosts" in network namespaces joined by a
veth link with a tbf rate limit and a userspace delay line (tests/slow_link.py says how and why:
this kernel has no netem), measures the link's TCP round trip, then runs `mlx-cluster up` with
each layout of --layouts over that link and, afterwards, each of --loopback-layouts on
127.0.0.1, and loads each with `mlx-cluster bench` at the same concurrency. Layouts alternate
(T2, P2, auto2, T2, ...) so drift on a shared machine hits all alike. Prints and writes JSON:
every run, medians, each layout's throughput ratio to the first, and what `auto` chose and why.
Everything built is removed at the end (--keep keeps the temp dir with the clusters' logs), also
on Ctrl-C, SIGTERM or failure.

A layout is T2 (two ranks, all tensor), P2 (two pipeline stages) or auto2 (parallel: auto).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from compare import bench, preset_model, summary_row  # noqa: E402
from pipeline_compare import parse_layout  # noqa: E402

from tests.cluster import Cluster  # noqa: E402
from tests.slow_link import measure_rtt, slow_link_hosts, two_host_cluster  # noqa: E402

KEYS = ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")
# A prefill step of 8 prompts can take over 10 s (tests/cluster.py's watchdog) on a slow CPU,
# more in a pipeline, which does not split the compute: a longer watchdog, not a false stall.
STEP_TIMEOUT_S = 300


def loopback_cluster(workdir: Path, model: str, parallel, max_batch: int) -> Cluster:
    config = {
        "model": {"path": model},
        "scheduler": {"max_batch_size": max_batch},
        "supervisor": {"collective_timeout_s": STEP_TIMEOUT_S},
    }
    if parallel is not None:
        config["cluster"] = {"parallel": parallel}
    return Cluster(workdir, ranks=2, config=config)


def chosen_layout(output: str) -> dict:
    """The layout rank 0 logged ("layout: tensor=T x pipeline=P ...") and, for auto, why."""
    layout = re.search(r"layout: tensor=(\d+) x pipeline=(\d+)", output)
    why = re.search(r"why: (auto: [^\n]*)", output)
    return {
        "tensor": int(layout[1]) if layout else None,
        "pipeline": int(layout[2]) if layout else None,
        "why": why[1] if why else None,
    }


def run_one(cluster: Cluster, model: str, concurrency: int, args) -> dict:
    with cluster:
        result = bench(cluster.url, model, concurrency, args)
        return {**summary_row(result), "layout_chosen": chosen_layout(cluster.output())}


def medians(runs: list[dict], layouts: list[str]) -> dict:
    med = {
        layout: {k: statistics.median(r[k] for r in runs if r["layout"] == layout) for k in KEYS} for layout in layouts
    }
    base = med[layouts[0]]["output_tok_s"]
    for m in med.values():
        m[f"throughput_ratio_to_{layouts[0]}"] = round(m["output_tok_s"] / base, 3) if base else None
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="tiny: `small` takes minutes per request on a 2-core CPU")
    p.add_argument("--model", default=None, help="model directory (default: make the preset in a temp dir)")
    p.add_argument("--layouts", nargs="+", default=["T2", "P2", "auto2"], help="run over the slow link")
    p.add_argument("--loopback-layouts", nargs="*", default=["auto2"], help="run on 127.0.0.1 afterwards")
    p.add_argument("--delay-ms", type=float, default=0.3, help="added each way (a round trip gains twice this)")
    p.add_argument("--rate", default="1gbit", help="tbf rate on each end of the link")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=None, help="default: 2 x concurrency")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--out", default=None)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (model, cluster logs)")
    args = p.parse_args()
    # SIGTERM (and SIGINT, which a background job ignores) unwind through the `with` blocks,
    # which stop the clusters and remove the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.num_requests = args.num_requests or 2 * args.concurrency
    for layout in args.layouts + args.loopback_layouts:
        if parse_layout(layout)[0] != 2:
            raise SystemExit(f"{layout}: this benchmark has two hosts, use a 2-rank layout (T2, P2, auto2)")

    workdir = Path(tempfile.mkdtemp(prefix="mlxc-slowlink-"))
    try:
        model = preset_model(args, workdir)
        results: dict = {
            "preset": args.preset,
            "concurrency": args.concurrency,
            "link": {"delay_ms_each_way": args.delay_ms, "rate": args.rate},
            "runs": [],
        }
        n = 0
        with slow_link_hosts(args.delay_ms, args.rate) as link:
            results["link"]["bridge_unshaped"] = measure_rtt(link.hosts, link.hosts.ips)
            results["link"]["slow_link"] = measure_rtt(link.hosts, link.link_ips)
            print(json.dumps(results["link"]), flush=True)
            for repeat in range(args.repeats):
                for layout in args.layouts:
                    n += 1
                    cluster = two_host_cluster(
                        workdir / f"run{n}",
                        link,
                        link.link_ips,
                        parse_layout(layout)[1],
                        model={"path": model},
                        scheduler={"max_batch_size": args.max_batch},
                        supervisor={"collective_timeout_s": STEP_TIMEOUT_S},
                    )
                    row = {"where": "slow link", "layout": layout, "repeat": repeat}
                    row.update(run_one(cluster, model, args.concurrency, args))
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
        for repeat in range(args.repeats):
            for layout in args.loopback_layouts:
                n += 1
                cluster = loopback_cluster(workdir / f"run{n}", model, parse_layout(layout)[1], args.max_batch)
                row = {"where": "loopback", "layout": layout, "repeat": repeat}
                row.update(run_one(cluster, model, args.concurrency, args))
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)  # the model copy and the clusters' logs
    results["medians"] = {
        where: medians([r for r in results["runs"] if r["where"] == where], layouts)
        for where, layouts in (("slow link", args.layouts), ("loopback", args.loopback_layouts))
        if layouts
    }
    print(json.dumps(results["medians"], indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
