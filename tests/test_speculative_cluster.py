"""Speculative decoding under tensor parallelism: two ranks over ring on loopback.

Every rank proposes from the same tokens (n-gram lookup; a draft model whole on each rank) and
verifies in lock-step; the engine's token digest, compared every step, fails the group if any
rank took other tokens. The reference is one rank's plain executor in this process (builtin
tiny is float32, where one and two ranks give the same tokens: tests/test_multirank.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mlx_cluster.cache.testing import load_tiny, make_executor
from mlx_cluster.engine.plan import SamplingParams
from tests.cluster import Cluster
from tests.test_speculative import repetitive_prompts, run

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
# Exactly representable in float32 (the plan's encoding), so the in-process reference samples
# with the very same parameters.
SAMPLED = {"temperature": 0.25, "seed": 41}


def spec_config(**speculative) -> dict:
    return {"speculative": speculative, "scheduler": {"max_batch_size": 8}}


@pytest.fixture(scope="module")
def ngram2(tmp_path_factory, models_dir):
    """One two-rank cluster with n-gram speculation, shared by the module."""
    with Cluster(
        tmp_path_factory.mktemp("spec-ngram"),
        ranks=2,
        models_dir=models_dir,
        config=spec_config(method="ngram", num_tokens=4),
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def plain(models_dir):
    """One rank's plain executor and the tokenizer, for references."""
    loaded = load_tiny(models_dir)
    return make_executor(loaded, None), loaded.tokenizer


def complete(cluster: Cluster, prompt: list[int], **kw) -> list[str]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 0, "temperature": 0, **kw}
    r = cluster.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def reference(plain, prompt: list[int], **kw) -> list[str]:
    params = SamplingParams(
        max_tokens=MAX_TOKENS,
        seed=kw.get("seed", 0),
        temperature=kw.get("temperature", 0.0),
        repetition_penalty=kw.get("repetition_penalty", 1.0),
    )
    executor, tokenizer = plain
    [tokens] = run(executor, [(prompt, params)])
    return [tokenizer.decode([t]) for t in tokens]


def metric(cluster: Cluster, name: str) -> float:
    for line in httpx.get(cluster.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_greedy_ngram_on_two_ranks_equals_plain_output(ngram2, plain):
    before = metric(ngram2, "mlx_cluster_spec_decode_num_accepted_tokens_total")
    for prompt in repetitive_prompts(2):
        assert complete(ngram2, prompt) == reference(plain, prompt)
    assert metric(ngram2, "mlx_cluster_spec_decode_num_accepted_tokens_total") > before
    assert metric(ngram2, "mlx_cluster_spec_decode_num_draft_tokens_total") > 0
    assert 0 < metric(ngram2, "mlx_cluster_spec_decode_acceptance_rate") <= 1
    assert metric(ngram2, "mlx_cluster_spec_decode_mean_acceptance_length") > 1


def test_mixed_batch_on_two_ranks_equals_plain_output(ngram2, plain):
    """Speculating rows (greedy, seeded sampled) next to a row that never speculates (penalty)."""
    prompts = repetitive_prompts(3)
    jobs = [(prompts[0], {}), (prompts[1], SAMPLED), (prompts[2], {"repetition_penalty": 1.5}), (prompts[0], {})]
    expected = [reference(plain, p, **kw) for p, kw in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(ngram2, job[0], **job[1]), jobs))
    assert together == expected
    assert complete(ngram2, prompts[1], **SAMPLED) == expected[1]  # seeded: reproducible alone too
    assert "differs from rank 0" not in ngram2.output()


def test_draft_model_on_two_ranks_equals_plain_output(tmp_path, models_dir, plain):
    """The draft model (here the target itself) loaded whole on each rank. A draft as large as
    the target never pays for itself, so the measured cost would keep every row plain: the test
    pins the cost to exercise the path."""
    config = spec_config(method="draft", draft_model="builtin:tiny", num_tokens=3, verify_cost=[1.0, 1.0])
    with Cluster(tmp_path, ranks=2, models_dir=models_dir, config=config) as cluster:
        prompts = [p[:7] + [5, 9, 300] for p in repetitive_prompts(2)]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: complete(cluster, p), [*prompts, prompts[0]]))
        assert got == [reference(plain, p) for p in [*prompts, prompts[0]]]
        assert metric(cluster, "mlx_cluster_spec_decode_num_accepted_tokens_total") > 0
        assert cluster.output().count("draft model builtin:tiny loaded whole on this rank") == 2
