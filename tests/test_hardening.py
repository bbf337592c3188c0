"""Attacks on rank 0 and the cluster: auth, limits, drain, metrics, rogue peers, secrets."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, pid_alive

pytestmark = pytest.mark.slow

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
    with cluster:
        yield cluster


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


DROPPED = re.compile(r"dropped (\d+) running sequence\(s\) at step (\d+)")


def drop_lines(cluster, rank: int) -> list[tuple[int, int]]:
    """(sequences, step) of each drop rank `rank` logged (engine/executor.py), in order."""
    return [(int(n), int(step)) for n, step in DROPPED.findall(cluster.logs(rank=rank))]


def test_random_cancellations_are_real_aborts_and_leave_nothing_behind(secured):
    """Clients that walk away ask for 2,000 tokens (about a minute here), so only an abort can
    end their requests this soon; the others must get every token they asked for. The queue is
    small (max_queue 2), so a 429 is retried as a client would, after Retry-After."""
    rng = random.Random(7)
    aborts_before = secured.metric("mlx_cluster_request_failure_total", reason="abort")
    drops_before = {rank: len(drop_lines(secured, rank)) for rank in (0, 1)}
    plans = []
    for i in range(12):
        walk, stream = rng.random() < 0.5, rng.random() < 0.5
        plans.append((i, walk, stream, 2000 if walk else rng.randint(3, 24), rng.randint(1, 20)))
    outcomes: dict[int, tuple] = {}

    def one(i, walk, stream, max_tokens, lines_before_leaving):
        body = {"prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0.5, "seed": i}
        body.update(stream=stream, ignore_eos=True)
        url, headers = secured.url + "/v1/completions", auth(KEYS[0])
        try:
            while True:
                if stream:
                    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
                        if r.status_code == 429:
                            time.sleep(float(r.headers["retry-after"]) / 4)
                            continue
                        data = []
                        for line in r.iter_lines():
                            data += [line] if line.startswith("data: ") else []
                            if walk and len(data) == lines_before_leaving:
                                outcomes[i] = ("walked", r.status_code)
                                return  # leaving the `with` closes the connection mid-stream
                        tokens = sum(1 for d in data if d.startswith("data: {"))
                        outcomes[i] = ("finished", r.status_code, tokens, data[-1])
                        return
                try:
                    r = httpx.post(url, json=body, headers=headers, timeout=0.3 if walk else 60)
                except httpx.ReadTimeout:
                    outcomes[i] = ("walked", None) if walk else ("timed out",)
                    return
                if r.status_code == 429:
                    time.sleep(float(r.headers["retry-after"]) / 4)
                    continue
                usage = r.json().get("usage", {})
                outcomes[i] = ("finished", r.status_code, usage.get("completion_tokens"), None)
                return
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            outcomes[i] = ("raised", repr(e))

    threads = [threading.Thread(target=one, args=p) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    walkers = 0
    for i, walk, stream, max_tokens, _ in plans:
        if walk:
            walkers += 1
            assert outcomes[i][0] == "walked", (i, outcomes[i])
            assert outcomes[i][1] in ((200,) if stream else (None,)), (i, outcomes[i])
        else:
            done = ("finished", 200, max_tokens, "data: [DONE]" if stream else None)
            assert outcomes[i] == done, (i, outcomes[i])

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
    # Every walk-away was an abort, none a natural finish (a finish counts as a success).
    assert secured.metric("mlx_cluster_request_failure_total", reason="abort") - aborts_before == walkers
    # Sequences that were running when their client left (every streaming walker read tokens)
    # left the batch on rank 1 at the same steps as on rank 0.
    new = {rank: drop_lines(secured, rank)[drops_before[rank] :] for rank in (0, 1)}
    assert new[1] == new[0]
    stream_walkers = sum(1 for _, walk, stream, _, _ in plans if walk and stream)
    assert stream_walkers <= sum(n for n, _ in new[1]) <= walkers
    assert secured.post("/v1/completions", BODY, headers=auth(KEYS[0])).status_code == 200


def recv_until_closed(sock: socket.socket, timeout_s: float = 15) -> bytes:
    """Everything the peer sends until it closes; a reset counts as closed. Raises TimeoutError
    when the peer has not closed within timeout_s (whatever it sent meanwhile): a rogue client
    must never be left hanging on."""
    deadline = time.monotonic() + timeout_s
    data = b""
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"still open after {timeout_s} s")
    except ConnectionResetError:
        return data


PWNED = "/tmp/mlxc-pwned"
HTTP_GARBAGE = [
    bytes(random.Random(1).getrandbits(8) for _ in range(4096)),
    f"__import__('os').system('touch {PWNED}')\r\n\r\n".encode(),
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 200_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(500),  # a TLS ClientHello on plain HTTP
]


def test_rogue_bytes_on_the_http_port_are_answered_and_change_nothing(secured):
    """The HTTP port is what really listens for strangers once the group runs (the ring ports and
    the plan link stop listening after the group has joined: see the next test)."""
    pids, restarts = secured.rank_pids(), secured.restarts()
    for payload in HTTP_GARBAGE:
        with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as s:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server gave up on an oversized header before reading it all
            reply = recv_until_closed(s)
        # Answered with a 4xx and closed, or closed without a word (a request head that never
        # ends is cut off after HEAD_TIMEOUT_S); never a hang, never a 5xx.
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:200]
    assert not os.path.exists(PWNED)
    assert secured.rank_pids() == pids and all(pid_alive(p) for p in pids) and secured.restarts() == restarts
    assert secured.post("/v1/completions", BODY, headers=auth(KEYS[0])).status_code == 200
    assert "Traceback" not in secured.output()


def test_non_loopback_without_key_is_refused(tmp_path, models_dir):
    cluster = Cluster(
        tmp_path,
        ranks=1,
        models_dir=models_dir,
        config={"server": {"host": "0.0.0.0"}},
        env={"MLX_CLUSTER_API_KEY": ""},
    )
    try:
        cluster.start(wait=False)
        assert cluster.proc.wait(60) == 2
        assert "no API key is set" in cluster.output() and "allow_insecure" in cluster.output()
    finally:
        cluster.stop()


def running_requests(cluster) -> int:
    return httpx.get(cluster.url + "/health", timeout=5).json()["running_requests"]


def test_sigterm_drains(tmp_path, models_dir):
    cluster = Cluster(tmp_path, ranks=2, models_dir=models_dir, config={"supervisor": {"drain_timeout_s": 20}})
    with cluster:
        pids = cluster.rank_pids()
        result = {}

        def in_flight():
            r = cluster.post(
                "/v1/completions", {"prompt": "x", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
            )
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=in_flight)
        t.start()
        cluster.wait_for(lambda: running_requests(cluster) == 1, 30, "the request to run")
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
    )
    with cluster:
        r = cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 500})
        assert r.status_code == 400 and "KV budget" in r.json()["error"]["message"]
        long = {"prompt": "hello", "max_tokens": 180, "temperature": 0, "ignore_eos": True}
        codes = []
        threads = [
            threading.Thread(target=lambda: codes.append(cluster.post("/v1/completions", long).status_code))
            for _ in range(3)
        ]  # two fit the budget, the third waits for room
        for t in threads[:2]:
            t.start()
        cluster.wait_for(lambda: running_requests(cluster) == 2, 30, "two running requests")
        threads[2].start()
        cluster.wait_for(lambda: httpx.get(cluster.url + "/health").json()["queue_depth"] == 1, 30, "one waiting")
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


def test_per_request_timeout(tmp_path, models_dir):
    cluster = Cluster(tmp_path, ranks=1, models_dir=models_dir, config={"server": {"request_timeout_s": 1}})
    with cluster:
        long = {"prompt": "x", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        r = cluster.post("/v1/completions", long)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", cluster.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout" and lines[-1] == "data: [DONE]"
        # The timed-out sequences were aborted: the engine is free again.
        cluster.wait_for(lambda: httpx.get(cluster.url + "/health").json()["running_sequences"] == 0, 10, "abort")
        assert cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


class Stranger(threading.Thread):
    """Dials a port every millisecond while it runs; on each connection it gets, it sends the
    next payload and (with `wait`) waits for the other side to close. `closed` records, per
    connection, whether it was closed on us (True) or left hanging for 15 s (False)."""

    def __init__(self, port: int, payloads: list[bytes], max_connections: int = 1_000, wait: bool = True):
        super().__init__(daemon=True)
        self.port, self.payloads, self.max_connections, self.wait = port, payloads, max_connections, wait
        self.closed: list[bool] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set() and len(self.closed) < self.max_connections:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            except OSError:
                time.sleep(0.001)
                continue
            with sock:
                payload = self.payloads[len(self.closed) % len(self.payloads)]
                try:
                    sock.sendall(payload)
                    if not self.wait:
                        self.closed.append(True)  # we hang up ourselves
                        continue
                    if len(payload) < 8:
                        sock.shutdown(socket.SHUT_WR)  # hang up in the middle of a handshake
                    recv_until_closed(sock)
                    self.closed.append(True)
                except (ConnectionResetError, BrokenPipeError):
                    self.closed.append(True)
                except TimeoutError:
                    self.closed.append(False)

    def stop(self) -> Stranger:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "a stranger's connection was left hanging"
        return self


PLAN_LINK_GARBAGE = [
    bytes(random.Random(2).getrandbits(8) for _ in range(64)),
    struct.pack("<I", 1) + b"0" * 32,  # rank 1's hello with a wrong token of the right length
    struct.pack("<I", 0) + b"0" * 32,  # a rank that never dials
    struct.pack("<I", 1) + b"x",  # a short hello, then EOF
]


def plan_link_rejections(cluster) -> int:
    return cluster.logs(rank=0).count("plan link: rejected a connection from 127.0.0.1")


def test_strangers_on_the_plan_link_and_ring_ports_while_the_group_joins(tmp_path, models_dir):
    """The plan link (on the doorbell port) and the ring ports listen only while a group joins (at start-up and after
    every restart), so that is when strangers are let at them."""
    cluster = Cluster(tmp_path, ranks=2, models_dir=models_dir, config={"supervisor": {"max_restarts": 10}})
    placement = cluster.placement()
    plan_link = placement.doorbell[1]  # the port keeps its old name in the placement
    ring_ports = sorted(port for _, port in placement.ports if port != plan_link)
    try:
        # 1. The plan link's accept phase at start-up. Rank 0 accepts whoever dials first; a
        # stranger that wins the race must be read, rejected and dropped, and the real worker
        # still joins. (The stranger dials every millisecond, the worker every 100 ms, so the
        # stranger nearly always gets in first; if it does not, step 2 gives it another go.)
        stranger = Stranger(plan_link, PLAN_LINK_GARBAGE)
        stranger.start()
        cluster.start()
        stranger.stop()
        assert all(stranger.closed), "the plan link left a stranger hanging"
        pids = cluster.rank_pids()
        rejected = plan_link_rejections(cluster)
        if rejected:
            assert cluster.restarts() == 0, "a stranger on the plan link cost a restart"
        # Once joined, nothing listens on those ports any more: strangers are refused.
        for port in [*ring_ports, plan_link]:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        reference = cluster.post("/v1/completions", BODY)
        assert reference.status_code == 200

        # 2. A restarted group's ports while it joins: kill rank 1, and let one stranger at rank
        # 0's ring port (the first to listen in every join) and strangers at the plan link.
        # MLX's ring join is not authenticated: the listening rank takes the first connection as
        # its peer, so the stranger makes that join fail on both ranks (`[ring] Couldn't
        # connect`, after MLX's ~30 s of connect retries): cleanly, exit 1, nothing hangs, and
        # the supervisor starts the group again. So one stranger costs one restart and about
        # half a minute; a stream of them keeps the group from forming (and uses up
        # max_restarts), which is why docs/cluster-setup.md says to keep these ports on a
        # private network. The plan link is ours and token-checked: strangers there cost nothing.
        before = cluster.restarts()
        os.kill(pids[1], signal.SIGKILL)
        ring_stranger = Stranger(ring_ports[0], [os.urandom(64)], max_connections=1, wait=False)
        link_stranger = Stranger(plan_link, PLAN_LINK_GARBAGE)
        ring_stranger.start()
        link_stranger.start()
        cluster.wait_for(lambda: cluster.restarts() > before, 30, "the supervisor to restart the group")
        cluster.wait_ready(180)
        ring_stranger.stop()
        link_stranger.stop()
        assert all(pid not in cluster.rank_pids() and not pid_alive(pid) for pid in pids)
        # One restart for the kill, one more for each join a ring stranger broke.
        assert cluster.restarts() - before == 1 + len(ring_stranger.closed)
        assert all(link_stranger.closed), "the plan link left a stranger hanging"
        assert plan_link_rejections(cluster) >= 1, "no stranger ever reached the plan link in an accept phase"

        # Nothing the strangers sent ran, and the group serves in lock-step: the same greedy text.
        again = cluster.post("/v1/completions", BODY)
        assert again.status_code == 200 and again.json()["choices"] == reference.json()["choices"]
        assert not os.path.exists(PWNED)
        assert "DivergenceError" not in cluster.output()
    finally:
        cluster.stop()
