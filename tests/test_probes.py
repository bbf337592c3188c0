"""Kubernetes-style probes: /livez, /readyz and /health, on a ready cluster and while loading."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

MODEL = "builtin:tiny"
HEALTH_STATUSES = {"ok", "degraded", "overloaded", "shutting_down"}


def get(url: str, path: str, timeout: float = 5) -> httpx.Response:
    return httpx.get(url + path, timeout=timeout)


def test_livez_and_readyz_on_a_ready_server(server):
    r = get(server.url, "/livez")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = get(server.url, "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_health_reports_its_fields(server):
    r = get(server.url, "/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok"
    assert h["model"] == MODEL
    assert h["ranks"] == 1
    assert h["queue_depth"] == 0
    assert h["running_sequences"] == 0
    assert h["uptime_s"] >= 0


def test_health_counts_a_running_sequence(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # an explicit iterator: leaving a for loop early would close the stream
        data = 0
        while data < 3:  # the role chunk, then two tokens
            data += next(lines).startswith("data: ")
        h = get(server.url, "/health").json()
        assert h["status"] in HEALTH_STATUSES
        assert h["running_sequences"] == 1
        assert h["queue_depth"] == 0
        assert get(server.url, "/readyz").status_code == 200
    server.wait_for(lambda: get(server.url, "/health").json()["running_sequences"] == 0, 5, "the stream's abort")


def test_probes_while_the_model_loads(tmp_path):
    # A fresh models directory makes the rank build builtin:tiny first, so loading takes a while.
    cluster = Cluster(tmp_path / "w", ranks=1, models_dir=tmp_path / "fresh-models")
    cluster.start(wait=False)
    answers = []  # (readyz status, readyz body, livez status, health status, health body, chat status, chat body)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert cluster.proc.poll() is None, cluster.output()[-3000:]
            try:
                ready = get(cluster.url, "/readyz", timeout=10)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            live = get(cluster.url, "/livez")
            health = get(cluster.url, "/health")
            chat = httpx.post(
                cluster.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                timeout=30,
            )
            answers.append((ready.status_code, ready.json(), live.status_code, health, chat))
            if ready.status_code == 200:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"never ready: {cluster.output()[-3000:]}")
    finally:
        cluster.stop()
    # The first answer tells the truth: either still loading (503) or ready.
    assert answers[0][0] in (503, 200)
    assert answers[-1][0] == 200 and answers[-1][1] == {"status": "ready"}
    loading = [a for a in answers if a[0] == 503]
    assert all(a[1] == {"status": "loading"} for a in loading)
    # Not ready yet is still alive: an orchestrator must not kill a loading rank.
    assert all(a[2] == 200 for a in answers)
    for _, _, _, health, chat in loading:
        assert health.json()["status"] in HEALTH_STATUSES
        if health.json()["engine"] == "loading":
            assert health.status_code == 503 and health.json()["status"] == "degraded"
        if chat.status_code == 503:
            assert chat.json()["error"]["code"] == "loading"
            assert chat.headers["retry-after"]
        else:
            assert chat.status_code == 200  # the model became ready between the probes
    print(f"probes answered {len(answers)} times, {len(loading)} of them while loading")
