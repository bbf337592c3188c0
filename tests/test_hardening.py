"""Attacks on rank 0 and the cluster: auth, limits, drain, metrics, rogue peers, secrets."""

import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, pid_alive

KEYS = ("sk-first-key-123", "sk-second-key-456")
ENV_KEY = "sk-env-key-789"


@pytest.fixture(scope="module")
def secured(tmp_path_factory, models_dir):
    workdir = tmp_path_factory.mktemp("secured")
    key_file = workdir / "keys"
    key_file.write_text(f"# API keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    cluster = Cluster(
        workdir,
        ranks=2,
        models_dir=models_dir,
        env={"MLX_CLUSTER_API_KEY": ENV_KEY},
        config={
            "server": {
                "api_key_file": str(key_file),
                "cors_origins": ["https://app.example"],
                "max_request_bytes": 4096,
            },
            "scheduler": {"max_batch_size": 2, "max_queue": 2},
        },
    )
    cluster.start()
    yield cluster
    cluster.stop()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


BODY = {"prompt": "hello", "max_tokens": 2, "temperature": 0}


def test_v1_and_admin_need_a_valid_key(secured):
    for path in ("/v1/models", "/admin/cache"):
        for headers in ({}, auth("wrong"), {"Authorization": "Basic abc"}, auth(KEYS[0] + "x")):
            r = httpx.get(secured.url + path, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
    r = secured.post("/v1/completions", BODY)
    assert r.status_code == 401
    for key in (*KEYS, ENV_KEY):  # every key from the file and the environment works
        assert httpx.get(secured.url + "/v1/models", headers=auth(key), timeout=10).status_code == 200


def test_probes_and_metrics_stay_open(secured):
    for path in ("/livez", "/readyz", "/health", "/metrics"):
        assert httpx.get(secured.url + path, timeout=10).status_code == 200, path


def test_keys_never_on_a_command_line_or_in_logs(secured):
    r = secured.post("/v1/completions", BODY, headers=auth(KEYS[1]))
    assert r.status_code == 200
    for pid in secured.rank_pids() + [secured.proc.pid]:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        for key in (*KEYS, ENV_KEY):
            assert key.encode() not in cmdline
    # Only rank 0 serves HTTP, so only rank 0's environment holds the key.
    worker_env = Path(f"/proc/{secured.rank_pids()[1]}/environ").read_bytes()
    assert ENV_KEY.encode() not in worker_env
    logs = secured.output() + "".join(p.read_text() for p in (secured.workdir / "runs").rglob("*.log"))
    for key in (*KEYS, ENV_KEY):
        assert key not in logs


def test_body_too_large_is_413_also_when_chunked(secured):
    big = {"prompt": "x" * 10000, "max_tokens": 1}
    r = secured.post("/v1/completions", big, headers=auth(KEYS[0]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(
        secured.url + "/v1/completions",
        content=chunks(),
        timeout=30,
        headers={**auth(KEYS[0]), "Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_cors_preflight(secured):
    r = httpx.options(
        secured.url + "/v1/chat/completions",
        timeout=10,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(
        secured.url + "/v1/chat/completions",
        timeout=10,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_queue_full_is_429_with_retry_after(secured):
    long = {"prompt": "hi", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    results = []

    def send():
        results.append(secured.post("/v1/completions", long, headers=auth(KEYS[0])).status_code)

    def health():
        return httpx.get(secured.url + "/health", timeout=5).json()

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads[:2]:  # fill the batch (max_batch_size 2) ...
        t.start()
    secured.wait_for(lambda: health()["running_requests"] == 2, 30, "two running requests")
    for t in threads[2:]:  # ... then the queue (max_queue 2)
        t.start()
    secured.wait_for(lambda: health()["queue_depth"] == 2, 30, "two waiting requests")
    r = secured.post("/v1/completions", BODY, headers=auth(KEYS[0]))
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"]
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    for t in threads:
        t.join(120)
    assert results == [200] * 4  # everything admitted before the queue filled is served


def test_metrics_use_vllm_names(secured):
    secured.post("/v1/completions", BODY, headers=auth(KEYS[0]))
    text = httpx.get(secured.url + "/metrics", timeout=10).text
    for name in (
        "mlx_cluster_num_requests_running",
        "mlx_cluster_num_requests_waiting",
        "mlx_cluster_kv_cache_usage_perc",
        "mlx_cluster_prompt_tokens_total",
        "mlx_cluster_generation_tokens_total",
        "mlx_cluster_request_success_total",
        "mlx_cluster_time_to_first_token_seconds_bucket",
        "mlx_cluster_time_per_output_token_seconds_bucket",
        "mlx_cluster_inter_token_latency_seconds_bucket",
        "mlx_cluster_e2e_request_latency_seconds_bucket",
        "mlx_cluster_request_queue_time_seconds_bucket",
        "mlx_cluster_prefix_cache_queries_total",
        "mlx_cluster_prefix_cache_hits_total",
        "mlx_cluster_ranks_up",
        "mlx_cluster_bus_bytes_total",
        "mlx_cluster_engine_step_seconds",
        "mlx_cluster_num_preemptions_total",
    ):
        assert name in text, name
    assert 'model_name="builtin:tiny"' in text
    assert 'mlx_cluster_ranks_up{model_name="builtin:tiny"} 2.0' in text
    # vLLM's TTFT buckets
    assert 'le="0.001"' in text and 'le="2560.0"' in text


def test_random_cancellations_leave_nothing_behind(secured):
    rng = random.Random(7)

    def one(i):
        body = {
            "prompt": f"request {i}",
            "max_tokens": rng.randint(5, 80),
            "temperature": 0.5,
            "seed": i,
            "stream": rng.random() < 0.5,
            "ignore_eos": True,
        }
        try:
            if body["stream"]:
                with httpx.stream(
                    "POST", secured.url + "/v1/completions", json=body, headers=auth(KEYS[0]), timeout=60
                ) as r:
                    for n, _ in enumerate(r.iter_lines()):
                        if n > rng.randint(1, 20):
                            break  # walk away mid-stream
            else:
                httpx.post(
                    secured.url + "/v1/completions", json=body, headers=auth(KEYS[0]), timeout=rng.choice([0.3, 60])
                )
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    def drained():
        h = httpx.get(secured.url + "/health", timeout=5).json()
        m = httpx.get(secured.url + "/metrics", timeout=5).text
        return (
            h["running_sequences"] == 0
            and h["queue_depth"] == 0
            and 'mlx_cluster_num_requests_running{model_name="builtin:tiny"} 0.0' in m
            and 'mlx_cluster_kv_cache_usage_perc{model_name="builtin:tiny"} 0.0' in m
        )

    secured.wait_for(drained, 30, "running, waiting and KV usage to return to zero")
    assert secured.post("/v1/completions", BODY, headers=auth(KEYS[0])).status_code == 200


def test_rogue_tcp_clients_on_cluster_ports_change_nothing(secured):
    pids = secured.rank_pids()
    base = secured.config["cluster"]["base_port"]
    rng = random.Random(1)
    for port in range(base, base + 3):  # two ring ports and the bus doorbell
        for _ in range(5):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
                    s.sendall(b"__import__('os').system('touch /tmp/mlxc-pwned')\n")
                    time.sleep(0.05)
            except OSError:
                pass
    time.sleep(1)
    assert all(pid_alive(p) for p in pids) and secured.rank_pids() == pids
    assert not os.path.exists("/tmp/mlxc-pwned")
    r = secured.post("/v1/completions", BODY, headers=auth(KEYS[0]))
    assert r.status_code == 200


def test_non_loopback_without_key_is_refused(tmp_path, models_dir):
    cluster = Cluster(
        tmp_path,
        ranks=1,
        models_dir=models_dir,
        config={"server": {"host": "0.0.0.0"}},
        env={"MLX_CLUSTER_API_KEY": ""},
    )
    cluster.start(wait=False)
    assert cluster.proc.wait(60) == 2
    assert "no API key is set" in cluster.output() and "allow_insecure" in cluster.output()


def test_sigterm_drains(tmp_path, models_dir):
    cluster = Cluster(tmp_path, ranks=2, models_dir=models_dir, config={"supervisor": {"drain_timeout_s": 20}}).start()
    pids = cluster.rank_pids()
    result = {}

    def in_flight():
        r = cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 200, "temperature": 0, "ignore_eos": True})
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(0.5)
    os.kill(pids[0], signal.SIGTERM)  # what an orchestrator does to rank 0
    deadline = time.monotonic() + 3
    ready = None
    while time.monotonic() < deadline:
        ready = cluster.readyz()
        if ready == 503:
            break
    assert ready == 503, "readyz must fail at once when draining"
    r = cluster.post("/v1/completions", BODY)
    assert r.status_code == 503 and r.headers.get("retry-after")
    assert r.json()["error"]["code"] == "shutting_down"
    t.join(60)
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 200
    cluster.wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "every rank to exit")
    cluster.proc.wait(30)
    assert cluster.proc.returncode == 0
    state = cluster.state()
    assert state["status"] == "stopped" and state["restarts"] == 0
    assert all(r["exit_code"] in (0, None) for r in state["ranks"]), json.dumps(state)


def test_kv_pressure_is_503_with_retry_after(tmp_path, models_dir):
    cluster = Cluster(
        tmp_path,
        ranks=1,
        models_dir=models_dir,
        config={"scheduler": {"max_kv_tokens": 400, "max_batch_size": 8, "max_queue": 16}},
    ).start()
    try:
        r = cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 500})
        assert r.status_code == 400 and "KV budget" in r.json()["error"]["message"]
        long = {"prompt": "hello", "max_tokens": 180, "temperature": 0, "ignore_eos": True}
        codes = []
        threads = [
            threading.Thread(target=lambda: codes.append(cluster.post("/v1/completions", long).status_code))
            for _ in range(3)
        ]  # two fit the budget, the third waits for room
        for t in threads:
            t.start()
            time.sleep(0.3)
        r = cluster.post("/v1/completions", long)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "kv_cache_full" and r.headers["retry-after"]
        metrics = httpx.get(cluster.url + "/metrics", timeout=5).text
        usage = float(metrics.split('mlx_cluster_kv_cache_usage_perc{model_name="builtin:tiny"} ')[1].split()[0])
        assert 0.8 < usage <= 1.0
        for t in threads:
            t.join(120)
        assert codes == [200, 200, 200]
        assert cluster.post("/v1/completions", long).status_code == 200  # room again
    finally:
        cluster.stop()


def test_per_request_timeout(tmp_path, models_dir):
    cluster = Cluster(tmp_path, ranks=1, models_dir=models_dir, config={"server": {"request_timeout_s": 1}}).start()
    try:
        long = {"prompt": "x", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        r = cluster.post("/v1/completions", long)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", cluster.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout" and lines[-1] == "data: [DONE]"
        # The timed-out sequences were aborted: the engine is free again.
        cluster.wait_for(lambda: httpx.get(cluster.url + "/health").json()["running_sequences"] == 0, 10, "abort")
        assert cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        cluster.stop()
