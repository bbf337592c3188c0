"""Regression tests for what the chaos harness (benchmarks/chaos.py) found, without a cluster."""

from fastapi.testclient import TestClient

from mlx_cluster.config import ClusterConfig
from mlx_cluster.server.app import ServerState, create_app


def test_a_request_for_an_adapter_while_the_group_loads_is_a_retryable_503():
    # After a restart, rank 0 answers HTTP before it has registered the configured adapters: a
    # request naming one got 404 model_not_found (a permanent error) instead of 503 loading.
    app = TestClient(create_app(ServerState(config=ClusterConfig())))
    for path, body in [
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": "ad1", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"model": "ad1", "input": "hi"}),
        ("/v1/messages", {"model": "ad1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = app.post(path, json=body)
        assert r.status_code == 503, (path, r.text)
        assert r.headers["retry-after"] == "5" and r.json()["error"]["type"] is not None, path
        assert r.json()["error"].get("code", "loading") in ("loading", None), path
