"""Several models in one cluster (`models:`): routing, load on first use, idle unload, 1 and 2 ranks.

Two real checkpoints of different architectures (test_checkpoints.py's llama 4-bit and qwen3
bfloat16, random weights with clear argmax margins) are served side by side; each model's
greedy text must be mlx-lm's own for that model, which is also what the model gives served alone
(test_checkpoints.py checks that on 1 and 2 ranks). Every cluster here is shared by its tests.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster
from tests.test_checkpoints import MAX_TOKENS, PROMPT_TEXT, SPECS, build_checkpoints, mlx_lm_greedy

pytestmark = pytest.mark.slow

ARCHS = ("qwen3", "llama")  # qwen3 is loaded at start-up; llama on first use


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory, tiny_model_path, {a: SPECS[a] for a in ARCHS}, "models_ckpt")


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, str]:
    """mlx-lm's own greedy text for each model alone."""
    from mlx_lm import load

    out = {}
    for arch in ARCHS:
        model, tokenizer = load(str(checkpoints[arch]))
        ref = mlx_lm_greedy(model, tokenizer, tokenizer.encode(PROMPT_TEXT))
        ref.check(arch)
        out[arch] = ref.text
    return out


def start(workdir: Path, models_dir, checkpoints, ranks: int, **extra) -> Cluster:
    """A cluster serving both checkpoints under their architecture names (models: replaces model:)."""
    config = {"models": [{"name": arch, "path": str(checkpoints[arch])} for arch in ARCHS], **extra}
    cluster = Cluster(workdir, ranks=ranks, models_dir=models_dir, config=config)
    del cluster.config["model"]
    cluster.config_path.write_text(yaml.safe_dump(cluster.config))
    return cluster.start()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, models_dir, checkpoints):
    # One running and one waiting request per model: the queue-full test fills llama's.
    cluster = start(
        tmp_path_factory.mktemp("models1"),
        models_dir,
        checkpoints,
        1,
        scheduler={"max_batch_size": 1, "max_queue": 1},
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, models_dir, checkpoints):
    cluster = start(tmp_path_factory.mktemp("models2"), models_dir, checkpoints, 2, idle_unload_s=1.0)
    try:
        yield cluster
    finally:
        cluster.stop()


def complete(cluster: Cluster, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT_TEXT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    return cluster.post("/v1/completions", body)


def text_of(cluster: Cluster, model: str) -> str:
    r = complete(cluster, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def metric(cluster: Cluster, name: str, **labels) -> float | None:
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def loaded(cluster: Cluster) -> dict[str, bool]:
    return {m["id"]: m["loaded"] for m in httpx.get(cluster.url + "/v1/models", timeout=10).json()["data"]}


def test_models_listed_loaded_or_not_and_routed_alternately(one_rank, references):
    assert loaded(one_rank) == {"qwen3": True, "llama": False}
    assert one_rank.readyz() == 200
    for arch in ("llama", "qwen3", "llama", "qwen3"):
        assert text_of(one_rank, arch) == references[arch], arch
    assert loaded(one_rank) == {"qwen3": True, "llama": True}
    # Switching between two loaded models reloads nothing (the start-up load counts as one).
    assert metric(one_rank, "mlx_cluster_model_loads_total", model="llama") == 1
    assert metric(one_rank, "mlx_cluster_model_loads_total", model="qwen3") == 1
    assert metric(one_rank, "mlx_cluster_models_loaded") == 2
    assert "loaded model llama in" in one_rank.output()
    # The chat surface routes the same way, grammars included (built with the running model's tokenizer).
    client = one_rank.openai()
    for arch in ARCHS:
        reply = client.chat.completions.create(
            model=arch,
            messages=[{"role": "user", "content": "a JSON object please"}],
            response_format={"type": "json_object"},
            max_tokens=64,
        )
        assert reply.model == arch
        if reply.choices[0].finish_reason == "stop":
            json.loads(reply.choices[0].message.content)


def test_unknown_model_is_404(one_rank):
    r = complete(one_rank, "gpt-4")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'qwen3'" in error["message"] and "'llama'" in error["message"]
    assert httpx.get(one_rank.url + "/v1/models/gpt-4", timeout=10).status_code == 404
    assert httpx.get(one_rank.url + "/v1/models/llama", timeout=10).json()["id"] == "llama"


def test_queue_full_per_model_is_429(one_rank, references):
    """max_batch_size 1, max_queue 1: one llama request runs, one waits, the third is refused;
    qwen3's queue is its own and still takes a request."""
    long = {"model": "llama", "prompt": "hi", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(one_rank.post("/v1/completions", long).status_code))]
    threads[0].start()

    def health():
        return httpx.get(one_rank.url + "/health", timeout=5).json()["models"]["llama"]

    one_rank.wait_for(lambda: health()["running_requests"] == 1, 60, "a running llama request")
    threads.append(threading.Thread(target=lambda: statuses.append(one_rank.post("/v1/completions", long).status_code)))
    threads[1].start()
    one_rank.wait_for(lambda: health()["queue_depth"] == 1, 60, "a waiting llama request")
    r = complete(one_rank, "llama")
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
    assert text_of(one_rank, "qwen3") == references["qwen3"]
    for t in threads:
        t.join(120)
    assert statuses == [200, 200]


def test_two_ranks_load_on_use_unload_when_idle_and_reload(two_ranks, references):
    assert loaded(two_ranks) == {"qwen3": True, "llama": False}
    ready = []
    stop = threading.Event()

    def watch_readyz():  # /readyz must not flap while a model loads
        while not stop.is_set():
            ready.append(two_ranks.readyz())

    watcher = threading.Thread(target=watch_readyz)
    watcher.start()
    try:
        assert text_of(two_ranks, "llama") == references["llama"]
        assert text_of(two_ranks, "qwen3") == references["qwen3"]
    finally:
        stop.set()
        watcher.join(10)
    assert ready and set(ready) == {200}, ready
    # idle_unload_s: 1: llama goes; qwen3 (loaded at start-up) stays.
    two_ranks.wait_for(lambda: loaded(two_ranks) == {"qwen3": True, "llama": False}, 30, "llama to unload")
    assert metric(two_ranks, "mlx_cluster_models_loaded") == 1
    assert two_ranks.readyz() == 200
    assert text_of(two_ranks, "llama") == references["llama"]
    assert metric(two_ranks, "mlx_cluster_model_loads_total", model="llama") == 2
    assert metric(two_ranks, "mlx_cluster_model_unloads_total", model="llama") >= 1
    for rank in range(2):  # every rank loaded and unloaded at the same steps
        log = two_ranks.logs(rank)
        assert log.count("loaded model llama in") == 2, log[-3000:]
        assert "unloaded model llama" in log
