"""What an open dashboard costs: decode throughput at c=8 with the page open vs closed, side by side.

One cluster; rounds alternate "closed" (nobody reads /admin/status) and "open" (the page's load:
GET /admin/status every 2 s, as app.js polls, or a real headless Chromium on the dashboard with
--open-with chromium). Each round is one `mlx-cluster bench` run. The status reports themselves
flow in both (they are always on); what "open" adds is building and serving the status document.

    python benchmarks/dashboard_cost.py --ranks 2 --rounds 3 --out benchmarks/results/dashboard-cost-tiny.json
    # on a GPU host, a bigger model:
    python benchmarks/dashboard_cost.py --ranks 2 --preset 1b --rounds 3 --out benchmarks/results/dashboard-cost-1b.json

Running Chromium on the serving machine charges the browser's own CPU to the server; on a real
deployment the page runs on the operator's machine, so `poll` is the default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.cluster import Cluster  # noqa: E402  (the same harness the tests use)

POLL_S = 2.0  # app.js's POLL_MS


class Poller:
    """What an open dashboard asks of the server: /admin/status every POLL_S."""

    def __init__(self, url: str):
        self.url, self.stop_event, self.polls = url, threading.Event(), 0

    def __enter__(self):
        def run():
            with httpx.Client(timeout=10) as client:
                while not self.stop_event.is_set():
                    client.get(self.url + "/admin/status").raise_for_status()
                    self.polls += 1
                    self.stop_event.wait(POLL_S)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


class ChromiumPage:
    """The dashboard open in a real headless Chromium (selenium + Debian's chromium-driver)."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        self.driver.get(self.url + "/")
        return self

    def __exit__(self, *exc):
        self.driver.quit()


def bench(url: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mlx_cluster", "bench", url, "--endpoint", "completions"]
    cmd += ["--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests)]
    cmd += ["--input-len", "128", "--output-len", str(args.output_len), "--warmup", "0", "--no-progress"]
    cmd += ["--json", "--output", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--open-with", choices=("poll", "chromium"), default="poll")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlx-cluster-dashboard-cost-"))
    cluster = Cluster(
        work,
        ranks=args.ranks,
        models_dir=Path("~/.cache/mlx-cluster/models").expanduser(),
        config={
            "model": {"path": f"builtin:{args.preset}"},
            "scheduler": {"max_batch_size": max(8, args.concurrency)},
            # The defaults, not the tests' short ones: a shared 2-core machine can take >10 s for a first prefill.
            "supervisor": {"heartbeat_s": 1.0, "collective_timeout_s": 120},
        },
    )
    rows: dict[str, list[dict]] = {"closed": [], "open": []}
    with cluster:
        bench(cluster.url, argparse.Namespace(**{**vars(args), "num_requests": 8}), work / "warmup.json")
        for r in range(args.rounds):
            for side in ("closed", "open") if r % 2 == 0 else ("open", "closed"):  # ABBA: spread drift over both
                out = work / f"{side}-{r}.json"
                if side == "open":
                    opener = ChromiumPage if args.open_with == "chromium" else Poller
                    with opener(cluster.url):
                        rows[side].append(bench(cluster.url, args, out))
                else:
                    rows[side].append(bench(cluster.url, args, out))
    summary = {}
    for side, reports in rows.items():
        tok_s = [rep["output_throughput_tok_s"] for rep in reports]
        summary[side] = {
            "output_tok_s_each": [round(x, 2) for x in tok_s],
            "output_tok_s_mean": round(statistics.fmean(tok_s), 2),
            "tpot_ms_p50_each": [round(rep["tpot_ms"]["p50"], 2) for rep in reports],
            "errors": sum(rep["errors"] for rep in reports),
        }
    summary["open_over_closed"] = round(
        summary["open"]["output_tok_s_mean"] / summary["closed"]["output_tok_s_mean"], 4
    )
    report = {
        "preset": args.preset,
        "ranks": args.ranks,
        "concurrency": args.concurrency,
        "num_requests": args.num_requests,
        "output_len": args.output_len,
        "open_with": args.open_with,
        **summary,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
