"""Side-by-side benchmark: mlx-cluster against mlx_lm.server on the same model, same run.

    python benchmarks/compare.py --preset tiny --ranks 1 --out results/tiny-1rank.json
    python benchmarks/compare.py --preset tiny --ranks 2 --out results/tiny-2rank.json

For each concurrency it starts one server, waits until it answers, runs `mlx-cluster bench`
against it, stops it, then does the same for the anchor, alternating, `--repeats` times. The
machine is shared and noisy, so what matters are the ratios of the medians, not raw numbers.
With --ranks 2 mlx-cluster runs two ring ranks via `mlx-cluster up` and the anchor runs
`mlx_lm.server` under `mlx.launch --backend ring -n 2`.

Like with like: both servers get the same seeded prompts, greedy, and no `ignore_eos` (which
`mlx_lm.server` does not honour), so each stops where the model does. Every row records the
output tokens each server reported (usage), tok/s and TPOT come from those counts, and the
summary says whether both sides generated the same number of tokens (`equal_output_tokens`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                # mlx_lm.server has no readiness probe: one request proves it can generate. Ours
                # lists its models while it loads and answers 503 `loading` until it is ready.
                r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120)
                if r.status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def start_ours(
    model: str,
    ranks: int,
    workdir: Path,
    max_batch: int,
    parallel=None,
    backend: str | None = None,
    cpu_blas: str = "auto",
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = {
        "cluster": {
            "name": f"bench-{port}",
            "run_dir": str(workdir / "runs"),
            "base_port": free_port(),
            "cpu_blas": cpu_blas,
        },
        "hosts": [{"host": "localhost", "ranks": ranks}],
        "model": {"path": model, "name": model},
        "server": {"port": port},
        "scheduler": {"max_batch_size": max_batch},
        # A fresh SSD tier per start: repeats send the same prompts, and blocks kept from an
        # earlier start would turn later repeats into cache hits the anchor cannot have.
        "cache": {"ssd": {"dir": str(workdir / f"kv-{port}")}},
    }
    if parallel is not None:  # cluster.parallel: {tensor, pipeline} or auto
        cfg["cluster"]["parallel"] = parallel
    if backend is not None:
        cfg["cluster"]["backend"] = backend
    path = workdir / f"bench-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster", "up", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def bench_ours(model: str, ranks: int, workdir: Path, concurrency: int, args, parallel=None, backend=None) -> dict:
    """Start mlx-cluster, run one load, stop it; the load generator's JSON result."""
    proc, url = start_ours(model, ranks, workdir, args.max_batch, parallel, backend)
    try:
        wait_up(url, proc)
        return bench(url, model, concurrency, args)
    finally:
        stop(proc)


def preset_model(args, workdir: Path) -> str:
    """args.model, or a fresh copy of the built-in preset args.preset made under workdir."""
    if args.model is not None:
        return args.model
    model = str(workdir / args.preset)
    subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "make-model", model, "--preset", args.preset],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return model


def summary_row(r: dict) -> dict:
    """The numbers the side-by-side scripts keep of one load-generator result."""
    return {
        "output_tok_s": r["output_throughput_tok_s"],
        "ttft_p50_ms": r["ttft_ms"]["p50"],
        "tpot_p50_ms": r["tpot_ms"]["p50"],
        "completion_tokens": r.get("total_output_tokens", 0),
        "errors": r["errors"],
    }


def anchor_env(cpu_blas: str, ranks: int) -> dict[str, str]:
    """Like with like on a Linux CPU: with `auto`, mlx_lm.server multiplies with the same OpenBLAS
    that our ranks load (cluster.cpu_blas), preloaded, one share of the cores per rank."""
    from mlx_cluster.runtime.cpu_blas import default_threads, find_openblas

    blas = find_openblas() if cpu_blas == "auto" and sys.platform.startswith("linux") else None
    if blas is None:
        return dict(os.environ)
    return {**os.environ, "LD_PRELOAD": blas, "OPENBLAS_NUM_THREADS": str(default_threads(ranks))}


def start_anchor(model: str, ranks: int, workdir: Path, cpu_blas: str = "auto") -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port)]
    if ranks > 1:
        cmd = [
            "mlx.launch",
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            str(ranks),
            "-p",
            str(free_port()),
            "--",
            *server,
        ]
    else:
        cmd = server
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=anchor_env(cpu_blas, ranks),
    )
    return proc, f"http://127.0.0.1:{port}"


def bench(url: str, model: str, concurrency: int, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "mlx_cluster",
        "bench",
        url,
        "--model",
        model,
        "--json",
        "--no-progress",
        "--concurrency",
        str(concurrency),
        "--num-requests",
        str(args.num_requests or 4 * concurrency),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--warmup",
        "2",
        "--seed",
        "0",
        # Not sent to either server: mlx_lm.server ignores it, so sending it to ours alone
        # would make ours generate more. Greedy + same prompts: both stop at the same EOS.
        "--no-ignore-eos",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="model directory (default: make the preset in a temp dir)")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument(
        "--cpu-blas",
        default="auto",
        choices=["auto", "bundled"],
        help="CPU matmuls of both servers: auto = the system's OpenBLAS where there is one, bundled = mlx's own",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mlxc-bench-"))
    model = args.model
    if model is None:
        model = str(workdir / args.preset)
        subprocess.run(
            [sys.executable, "-m", "mlx_cluster", "make-model", model, "--preset", args.preset],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    results: dict = {"preset": args.preset, "ranks": args.ranks, "model": model, "cpu_blas": args.cpu_blas, "runs": []}
    for concurrency in args.concurrency:
        for repeat in range(args.repeats):
            for name in ("mlx-cluster", "mlx_lm.server"):
                if name == "mlx-cluster":
                    proc, url = start_ours(model, args.ranks, workdir, args.max_batch, cpu_blas=args.cpu_blas)
                else:
                    proc, url = start_anchor(model, args.ranks, workdir, args.cpu_blas)
                try:
                    wait_up(url, proc)
                    # mlx_lm.server serves its --model as "default_model".
                    served = model if name == "mlx-cluster" else "default_model"
                    r = bench(url, served, concurrency, args)
                finally:
                    stop(proc)
                row = {
                    "server": name,
                    "concurrency": concurrency,
                    "repeat": repeat,
                    "output_tok_s": r["output_throughput_tok_s"],
                    "ttft_p50_ms": r["ttft_ms"]["p50"],
                    "tpot_p50_ms": r["tpot_ms"]["p50"],
                    "itl_p50_ms": r["itl_ms"]["p50"],
                    "errors": r["errors"],
                    "completed": r["completed"],
                    "total_output_tokens": r["total_output_tokens"],
                    "mean_output_tokens": r["mean_output_tokens"],
                }
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    summary = []
    for concurrency in args.concurrency:
        med = {}
        for name in ("mlx-cluster", "mlx_lm.server"):
            rows = [r for r in results["runs"] if r["server"] == name and r["concurrency"] == concurrency]
            med[name] = {
                k: statistics.median(r[k] for r in rows) for k in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")
            }
        ours, anchor = med["mlx-cluster"], med["mlx_lm.server"]
        tokens = {
            name: [
                r["total_output_tokens"]
                for r in results["runs"]
                if r["server"] == name and r["concurrency"] == concurrency
            ]
            for name in ("mlx-cluster", "mlx_lm.server")
        }
        summary.append(
            {
                "concurrency": concurrency,
                "ours": ours,
                "anchor": anchor,
                "output_tokens": tokens,  # per repeat, as each server reported them
                "equal_output_tokens": tokens["mlx-cluster"] == tokens["mlx_lm.server"],
                "throughput_ratio": ours["output_tok_s"] / anchor["output_tok_s"],
                "ttft_ratio": ours["ttft_p50_ms"] / anchor["ttft_p50_ms"],
                "tpot_ratio": ours["tpot_p50_ms"] / anchor["tpot_p50_ms"],
            }
        )
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if not all(s["equal_output_tokens"] for s in summary):
        print("warning: the servers generated different numbers of tokens; compare rates, not totals", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
