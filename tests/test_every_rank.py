"""What rank 0 decides must happen on every rank: a client's disconnect aborts the sequence on
the worker too, and /admin/cache/clear and /admin/cache/warmup change the worker's cache. The
worker has no HTTP, so its side is read the way an operator reads it: `mlx-cluster logs
--rank 1` and its own SSD directory."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from datetime import datetime

import httpx
import pytest

from mlx_cluster.runtime.cpu_blas import default_threads, find_openblas
from tests.cluster import REPO, Cluster

pytestmark = pytest.mark.slow

DROPPED = re.compile(
    r"^\[rank(\d)\] (\S+ \S+) INFO mlx_cluster\.engine\.executor: dropped (\d+) running sequence\(s\) "
    r"at step (\d+) \((\d+) tokens generated on this rank so far\)$",
    re.M,
)
LONG = 4000  # tokens a disconnected request asks for: ~a minute of decoding on this machine


@pytest.fixture(scope="module")
def pair(tmp_path_factory, models_dir):
    """A two-rank ring cluster whose SSD tier writes every block at once (write_through)."""
    workdir = tmp_path_factory.mktemp("every-rank")
    cluster = Cluster(workdir, ranks=2, models_dir=models_dir, config={"cache": {"ssd": {"policy": "write_through"}}})
    with cluster:
        yield cluster


def drops(cluster: Cluster, rank: int) -> list[tuple[datetime, int, int, int]]:
    """(time, sequences, step, tokens generated so far) of every drop rank `rank` logged."""
    return [
        (datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f"), int(n), int(step), int(total))
        for r, ts, n, step, total in DROPPED.findall(cluster.logs(rank=rank))
        if int(r) == rank
    ]


def greedy(cluster: Cluster, prompt: str, max_tokens: int = 16) -> str:
    r = cluster.post(
        "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == max_tokens
    return r.json()["choices"][0]["text"]


def test_a_disconnect_aborts_the_sequence_on_every_rank_within_a_few_steps(pair):
    # Runs first in the module: rank 1's cumulative token count is then all successful requests.
    assert drops(pair, 1) == [], "another test dropped sequences on this cluster first"
    before_text = greedy(pair, "lock-step check")
    pids = pair.rank_pids()
    generated_before = pair.metric("mlx_cluster_generation_tokens_total")  # equal on both ranks

    body = {"prompt": "walk away", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    received = 0
    with httpx.stream("POST", pair.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            received += line.startswith("data: {")
            if received == 8:
                break
        left_at = datetime.now()
    # Leaving the `with` closed the connection: the server must notice and abort on every rank.
    pair.wait_for(lambda: drops(pair, 1), 10, "rank 1 to log the drop")
    (when1, n1, step1, total1), *_ = drops(pair, 1)
    (when0, n0, step0, total0), *_ = drops(pair, 0)
    assert (n1, step1, total1) == (n0, step0, total0) == (1, step0, total0), "the ranks dropped at different steps"
    on_rank1 = total1 - int(generated_before)  # tokens rank 1 generated for the abandoned sequence
    # "A few steps": one token per step for a single sequence. What the client read, plus the
    # tokens in flight while the disconnect is noticed, never anything near LONG.
    assert received <= on_rank1 <= received + 40, (received, on_rank1)
    assert (when1 - left_at).total_seconds() < 3.0, (left_at, when1)

    # The group is still in lock-step: same greedy text as before (every plan carries rank
    # 0's token digest, so a diverged worker would have ended this request with a 503).
    assert greedy(pair, "lock-step check") == before_text
    assert pair.rank_pids() == pids and pair.restarts() == 0
    assert "DivergenceError" not in pair.output()


def ssd_blocks(cluster: Cluster, rank: int) -> set[str]:
    return {p.name for p in (cluster.workdir / "kv").glob(f"v*/*/tp2/rank{rank}/*.safetensors")}


def test_warmup_and_clear_reach_every_rank(pair):
    prompt = "A warm system prompt that several requests will share. " * 8
    r = pair.post("/admin/cache/warmup", {"prompt": prompt})
    assert r.status_code == 200, r.text
    warm = r.json()
    assert warm["object"] == "cache.warmup" and warm["cached_tokens"] >= 16 * 4, warm
    blocks = warm["cached_tokens"] // 16

    # Rank 1 stored the same blocks (its own KV shard of them) in its own SSD directory.
    pair.wait_for(
        lambda: len(ssd_blocks(pair, 1)) >= blocks and ssd_blocks(pair, 1) == ssd_blocks(pair, 0),
        15,
        "rank 1 to write the warmed blocks",
    )
    # The next request restores them on both ranks (a restore takes the minimum over ranks).
    r = pair.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == warm["cached_tokens"]

    cleared_before = pair.logs(rank=1).count("prefix cache cleared on rank 1")
    r = pair.post("/admin/cache/clear", {})
    assert r.status_code == 200 and r.json() == {"object": "cache.clear", "cleared": True, "ranks": 2}
    pair.wait_for(lambda: not ssd_blocks(pair, 1), 15, "rank 1's SSD tier to be emptied")
    assert not ssd_blocks(pair, 0)
    assert pair.logs(rank=1).count("prefix cache cleared on rank 1") == cleared_before + 1
    r = pair.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_logs_command_shows_each_rank_and_follows(pair):
    both = pair.logs()
    assert "[rank0]" in both and "[rank1]" in both
    one = pair.logs(rank=1)
    assert "rank 1 of 2 joined the ring group" in one
    # Two ranks share this host's cores: with an OpenBLAS here, each rank gets half of them.
    blas = find_openblas()
    assert (f"CPU matmuls: {blas} ({default_threads(2)} thread" if blas else "CPU matmuls: mlx's bundled") in one
    assert all(line.startswith("[rank1] ") for line in one.splitlines())
    assert len(pair.logs(rank=0, lines=3).splitlines()) == 3

    follow = subprocess.Popen(
        [sys.executable, "-m", "mlx_cluster", "logs", str(pair.config_path), "--rank", "1", "-n", "1", "-f"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=pair.env,
    )
    try:
        # The last line comes first; once it is here, `-f` follows from exactly where it ended.
        assert follow.stdout.readline().startswith("[rank1] ")
        assert pair.post("/admin/cache/clear", {}).status_code == 200
        line = follow.stdout.readline()  # blocks until rank 1 logs something new
        assert line.startswith("[rank1] ") and "prefix cache cleared on rank 1" in line, line
    finally:
        follow.send_signal(signal.SIGINT)
        try:
            assert follow.wait(30) == 0  # 10 s ran out once on the 2-core machine under a soak
        finally:
            if follow.poll() is None:
                follow.kill()
            follow.stdout.close()


def test_logs_for_an_unknown_cluster_fail(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cluster: {{name: never-started, run_dir: {tmp_path / 'runs'}}}\nhosts: [{{host: localhost}}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "logs", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=30
    )
    assert out.returncode == 1 and "no logs for cluster 'never-started'" in out.stderr
