"""Two tensor-parallel ranks over ring on loopback give the same tokens as one rank."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there", "Write a haiku about clusters.", "1 2 3 4 5 6", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, models_dir):
    """A 1-rank and a 2-rank cluster side by side on the same model."""
    with (
        Cluster(tmp_path_factory.mktemp("one"), ranks=1, models_dir=models_dir) as one,
        Cluster(tmp_path_factory.mktemp("two"), ranks=2, models_dir=models_dir) as two,
    ):
        yield one, two


def complete(cluster, prompt, **kw):
    r = cluster.openai().completions.create(
        model="builtin:tiny",
        prompt=prompt,
        max_tokens=kw.pop("max_tokens", 24),
        extra_body={"ignore_eos": True},
        logprobs=0,
        **kw,
    )
    return r.choices[0].logprobs.tokens, r.choices[0].text


def test_two_ranks_really_shard_the_model(pair):
    _, two = pair
    out = two.output()
    assert "shard 0/2" in out and "shard 1/2" in out


def test_greedy_outputs_are_token_identical(pair):
    one, two = pair
    for prompt in PROMPTS:
        assert complete(one, prompt, temperature=0) == complete(two, prompt, temperature=0), prompt


def test_concurrent_greedy_outputs_are_token_identical(pair):
    one, two = pair
    alone = [complete(one, p, temperature=0) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        together = list(pool.map(lambda p: complete(two, p, temperature=0), PROMPTS * 2))
    assert together == alone * 2


def test_seeded_sampling_is_identical(pair):
    one, two = pair
    for seed in (1, 2, 3):
        a = complete(one, PROMPTS[0], temperature=0.9, top_p=0.95, seed=seed)
        b = complete(two, PROMPTS[0], temperature=0.9, top_p=0.95, seed=seed)
        assert a == b, seed


def test_chat_streaming_on_two_ranks(pair):
    one, two = pair
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    def stream_text(cluster):
        stream = cluster.openai().chat.completions.create(
            model="builtin:tiny", messages=msgs, max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert stream_text(one) == stream_text(two)


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(pair):
    """The batched sampler: a row's tokens depend on its own seed, not on who shares the batch."""
    one, two = pair
    knobs = [
        {"temperature": 0.9, "top_p": 0.95, "seed": 5},
        {"temperature": 1.3, "seed": 6},
        {"temperature": 0.7, "extra_body": {"ignore_eos": True, "top_k": 5, "min_p": 0.05}, "seed": 7},
        {"temperature": 0, "seed": 8},
    ]

    def run(cluster, kw):
        kw = dict(kw)
        extra = kw.pop("extra_body", {"ignore_eos": True})
        r = cluster.openai().completions.create(
            model="builtin:tiny", prompt=PROMPTS[1], max_tokens=20, extra_body=extra, **kw
        )
        return r.choices[0].text

    alone = [run(one, kw) for kw in knobs]
    with ThreadPoolExecutor(len(knobs) * 2) as pool:
        together = list(pool.map(lambda kw: run(two, kw), knobs * 2))
    assert together == alone * 2


def _metric(cluster, name: str) -> float:
    for line in httpx.get(cluster.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_bus_never_waits_on_the_device_while_decoding(pair):
    """Plans travel over TCP: decoding hundreds of steps adds plans but no device syncs."""
    _, two = pair
    plans = _metric(two, "mlx_cluster_bus_plans_total")
    complete(two, PROMPTS[0], temperature=0, max_tokens=200)
    assert _metric(two, "mlx_cluster_bus_plans_total") - plans >= 200
    assert _metric(two, "mlx_cluster_bus_device_syncs_total") == 0
