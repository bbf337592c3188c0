"""LoRA adapters: the same greedy tokens as mlx-lm's own `load(path, adapter_path=...)`.

Random-weight checkpoints of real architectures (tests/test_checkpoints.py: llama 4-bit with
tied embeddings, qwen3 bfloat16) and random LoRA adapters made with mlx-lm's own tuner
(`linear_to_lora_layers`, then random lora_b, saved as adapters.safetensors + adapter_config.json):

- one rank, in process: the engine's load, fusion and executor, base and two adapters in ONE
  batch, each row equal to mlx-lm's run of that adapter alone;
- two ranks, one cluster for the module (ring backend on loopback): `model.adapter_path`,
  `adapters:` by name, both in one batch, load / unload over HTTP under traffic, the prefix
  cache keeping adapters apart, and OpenAI error envelopes for bad input.

mlx-lm cannot run an adapter under tensor parallelism, so the two-rank reference is its one-rank
run; the seeds are ones where every greedy step leads by MIN_MARGIN, so a mismatch is a wrong
computation, not rounding.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from tests.cluster import Cluster
from tests.test_checkpoints import MAX_TOKENS, PROMPT_TEXT, SPECS, build_checkpoints, mlx_lm_greedy

pytestmark = pytest.mark.slow

# llama_f32: the 4-bit llama with float32 scales and activations. Two ranks add partial sums in
# another order; in bfloat16 that moves these models' logits by up to 2 (mlx-lm's own two-rank
# base run too), in float32 by ~1e-5, so the two-rank comparison with mlx-lm's one-rank run of
# the adapter is sharp there.
SPECS_HERE = {"llama": SPECS["llama"], "qwen3": SPECS["qwen3"], "llama_f32": replace(SPECS["llama"], dtype="float32")}
ARCHS = tuple(SPECS_HERE)
ALL_KEYS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
# name -> (seed per arch, rank, scale, keys, lora_b std): one adapter on every projection (column-
# and row-parallel alike), one of another rank on a few (the stacks pad ranks). Seeds chosen so
# mlx-lm's greedy steps lead by MIN_MARGIN (by 1.0 or more for llama, which runs on two ranks).
ADAPTERS = {
    "ad1": ({"llama": 1, "qwen3": 9, "llama_f32": 4}, 4, 2.0, ALL_KEYS, 0.05),
    "ad2": (
        {"llama": 3, "qwen3": 46, "llama_f32": 3},
        8,
        1.0,
        ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
        0.1,
    ),
}


def make_adapter(model_dir: Path, out: Path, seed: int, rank: int, scale: float, keys: list[str], std: float) -> Path:
    """An mlx-lm LoRA adapter directory, made with mlx-lm's tuner, with random (non-zero) lora_b."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}
    mx.random.seed(seed)  # lora_a is drawn by linear_to_lora_layers
    linear_to_lora_layers(model, 2, params)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        weights[name] = mx.random.normal(value.shape) * std if name.endswith("lora_b") else value
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def misfit_adapter(out: Path, module: str, a_shape: tuple, b_shape: tuple) -> Path:
    """An adapter directory with one layer's lora_a / lora_b of the given shapes."""
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"scale": 1}}))
    weights = {f"{module}.lora_a": mx.zeros(a_shape), f"{module}.lora_b": mx.zeros(b_shape)}
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    return out


@pytest.fixture(scope="module")
def prompt(tiny_model_path) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    return list(load_tokenizer(Path(tiny_model_path)).encode(PROMPT_TEXT))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory, tiny_model_path, {a: SPECS_HERE[a] for a in ARCHS}, "lora_checkpoints")


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("lora_adapters")
    return {
        (arch, name): make_adapter(checkpoints[arch], root / f"{arch}-{name}", seeds[arch], *spec)
        for arch in ARCHS
        for name, (seeds, *spec) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def references(checkpoints, adapters, prompt) -> dict[tuple[str, str | None], list[int]]:
    """mlx-lm's own load (with adapter_path) + greedy stream_generate, one rank."""
    from mlx_lm import load

    out = {}
    for arch in ARCHS:
        for name in (None, *ADAPTERS):
            path = None if name is None else str(adapters[arch, name])
            ref = mlx_lm_greedy(*load(str(checkpoints[arch]), adapter_path=path), prompt)
            if SPECS_HERE[arch].dtype == "float32":  # rounding moves float32 logits by ~1e-5
                assert min(ref.margins) > 0.01, f"{arch} with adapter {name}: near-tie {ref.margins}"
            else:
                ref.check(f"{arch} with adapter {name}")
            out[arch, name] = ref.tokens
    for arch in ARCHS:
        assert out[arch, "ad1"] != out[arch, None] != out[arch, "ad2"], "the adapters must change the output"
    return out


# ---------------------------------------------------------------------------
# One rank, in process
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_one_rank_base_and_two_adapters_in_one_batch(arch, checkpoints, adapters, references, prompt):
    from mlx_cluster.cache.testing import make_executor
    from mlx_cluster.engine.plan import AdapterOp, NewSequence, SamplingParams, StepPlan
    from mlx_cluster.models.fuse import fuse_projections
    from mlx_cluster.models.loader import load_model_shard
    from mlx_cluster.models.lora import AdapterSet, linear_layouts

    group = mx.distributed.init()
    loaded = load_model_shard(str(checkpoints[arch]), group)
    layouts = linear_layouts(loaded.model, group, loaded.shard_specs)  # as build_engine: before fusion
    assert fuse_projections(loaded.model) > 0
    executor = make_executor(loaded, None)
    executor.adapters = AdapterSet(loaded.model, layouts, group, max_adapters=4)
    ops = (AdapterOp(3, str(adapters[arch, "ad1"])), AdapterOp(1, str(adapters[arch, "ad2"])))
    executor.apply(StepPlan(step=0, adapters=ops))
    assert executor.adapter_results == {3: None, 1: None}

    greedy = SamplingParams(max_tokens=MAX_TOKENS, seed=0, temperature=0.0)
    rows = {10: (None, 0), 11: ("ad1", 3), 12: ("ad2", 1), 13: ("ad1", 3)}
    seqs = tuple(NewSequence(seq_id, tuple(prompt), greedy, adapter=slot) for seq_id, (_, slot) in rows.items())
    executor.apply(StepPlan(step=1, new=seqs))
    tokens = {seq_id: [] for seq_id in rows}
    while executor.active:
        for out in executor.step():
            tokens[out.seq_id].append(out.token)
    for seq_id, (name, _) in rows.items():
        assert tokens[seq_id] == references[arch, name], f"row with adapter {name}"

    # Unloaded, the slot is zeros again: its rows are the base model's.
    executor.apply(StepPlan(step=2, adapters=(AdapterOp(3),)))
    executor.apply(StepPlan(step=3, new=(NewSequence(20, tuple(prompt), greedy, adapter=3),)))
    out = []
    while executor.active:
        out += [o.token for o in executor.step()]
    assert out == references[arch, None]


def test_adapter_errors_name_the_numbers(checkpoints, adapters, tmp_path):
    from mlx_cluster.models.loader import load_model_shard
    from mlx_cluster.models.lora import AdapterError, linear_layouts, read_adapter

    group = mx.distributed.init()
    loaded = load_model_shard(str(checkpoints["llama"]), group)
    layouts = linear_layouts(loaded.model, group, loaded.shard_specs)
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nowhere", layouts)
    bad = misfit_adapter(tmp_path / "bad", "model.layers.0.mlp.up_proj", (96, 4), (4, 256))
    with pytest.raises(AdapterError, match=r"lora_a is \(96, 4\).*needs \(128, r\) and \(r, 256\)"):
        read_adapter(bad, layouts)
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora"}))
    with pytest.raises(AdapterError, match="only LoRA adapters"):
        read_adapter(bad, layouts)


# ---------------------------------------------------------------------------
# Two ranks, one cluster
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(checkpoints, adapters, models_dir, tmp_path_factory):
    """llama_f32 (4-bit) on two ranks: ad1 as model.adapter_path (served as the model's own name),
    ad2 served as "ad2"; prefix cache on with small blocks."""
    config = {
        "model": {"path": str(checkpoints[ARCH2]), "name": "base", "adapter_path": str(adapters[ARCH2, "ad1"])},
        "adapters": [{"name": "ad2", "path": str(adapters[ARCH2, "ad2"])}],
        "cache": {"block_size": 4},
    }
    c = Cluster(tmp_path_factory.mktemp("lora_cluster"), ranks=2, models_dir=models_dir, config=config)
    c.start()
    yield c
    c.stop()


ARCH2 = "llama_f32"  # the two-rank cluster's checkpoint


def _complete(cluster: Cluster, model: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    return cluster.post("/v1/completions", body)


def _token_ids(cluster: Cluster, response: httpx.Response, tokenizer) -> list[int]:
    assert response.status_code == 200, response.text
    texts = response.json()["choices"][0]["logprobs"]["tokens"]
    decoded = {tokenizer.decode([t]): t for t in range(len(tokenizer.vocab))}
    return [decoded[t] for t in texts]  # the checkpoints' texts identify token ids (silent_tokens)


@pytest.fixture(scope="module")
def tokenizer(checkpoints):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(checkpoints[ARCH2])


def test_two_ranks_adapters_match_mlx_lm(cluster, references, prompt, tokenizer):
    log = cluster.output()
    assert log.count("loaded LoRA adapter") >= 4, "each rank loads both adapters"
    models = httpx.get(cluster.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["base", "ad2"] and models[1]["parent"] == "base"

    # One at a time, then together in one batch (two threads; the batcher joins them).
    assert _token_ids(cluster, _complete(cluster, "base", prompt), tokenizer) == references[ARCH2, "ad1"]
    assert _token_ids(cluster, _complete(cluster, "ad2", prompt), tokenizer) == references[ARCH2, "ad2"]
    results = {}

    def run(name):
        results[name] = _complete(cluster, name, prompt)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("base", "ad2", "base", "ad2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _token_ids(cluster, results["base"], tokenizer) == references[ARCH2, "ad1"]
    assert _token_ids(cluster, results["ad2"], tokenizer) == references[ARCH2, "ad2"]
    assert results["ad2"].json()["model"] == "ad2"


def test_prefix_cache_keeps_adapters_apart(cluster, prompt):
    def cached(model: str) -> int:
        r = _complete(cluster, model, prompt[::-1] * 3, 2)  # a prompt no other test sends
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("base") == 0
    assert cached("base") > 0
    assert cached("ad2") == 0, "ad2 must not reuse the KV computed with another adapter"
    assert cached("ad2") > 0


def test_load_and_unload_under_traffic(cluster, adapters, references, prompt, tokenizer):
    # Load ad1 again under a second name while requests run.
    busy = threading.Thread(target=lambda: [_complete(cluster, "ad2", prompt) for _ in range(3)])
    busy.start()
    r = cluster.post("/v1/load_lora_adapter", {"lora_name": "ad1b", "lora_path": str(adapters[ARCH2, "ad1"])})
    assert r.status_code == 200, r.text
    assert "ad1b" in [m["id"] for m in httpx.get(cluster.url + "/v1/models").json()["data"]]
    assert _token_ids(cluster, _complete(cluster, "ad1b", prompt), tokenizer) == references[ARCH2, "ad1"]
    busy.join()

    # Unload while a long request streams from it: that request finishes whole; then the name is gone.
    started, finish = threading.Event(), []

    def stream_long():
        body = {"model": "ad1b", "prompt": prompt, "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    finish.append(json.loads(line[6:])["choices"][0]["finish_reason"])

    runner = threading.Thread(target=stream_long)
    runner.start()
    assert started.wait(60)
    r = cluster.post("/v1/unload_lora_adapter", {"lora_name": "ad1b"})
    assert r.status_code == 200, r.text
    runner.join()
    assert len(finish) == 120 and finish[-1] == "length", "the running request was not cut off"
    gone = _complete(cluster, "ad1b", prompt)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert "ad1b" not in [m["id"] for m in httpx.get(cluster.url + "/v1/models").json()["data"]]
    # ... and its slot is free for the next load.
    r = cluster.post("/v1/load_lora_adapter", {"lora_name": "ad1c", "lora_path": str(adapters[ARCH2, "ad1"])})
    assert r.status_code == 200, r.text


def test_bad_input_gets_error_envelopes(cluster, adapters, checkpoints, tmp_path):
    r = _complete(cluster, "nope", [1, 2, 3])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'base'" in r.json()["error"]["message"] and "'ad2'" in r.json()["error"]["message"]

    r = cluster.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    r = cluster.post("/v1/load_lora_adapter", {"lora_name": "ad2", "lora_path": str(adapters[ARCH2, "ad1"])})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"]
    r = cluster.post("/v1/load_lora_adapter", {"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = cluster.post("/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert r.status_code == 404 and r.json()["error"]["type"]

    # Shapes that do not fit the model: every rank refuses it, the same step, with the numbers.
    bad = misfit_adapter(tmp_path / "bad", "model.layers.1.mlp.down_proj", (200, 4), (4, 128))
    r = cluster.post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
    assert r.status_code == 400, r.text
    assert "lora_a is (200, 4)" in r.json()["error"]["message"] and "(256, r)" in r.json()["error"]["message"]
    assert _complete(cluster, "bad", [1, 2, 3]).status_code == 404
    assert _complete(cluster, "ad2", [1, 2, 3], 2).status_code == 200, "the cluster serves on"


# ---------------------------------------------------------------------------
# Units: the plan carries adapters; rank 0 defers an unload while its slot runs
# ---------------------------------------------------------------------------


def test_plan_carries_adapter_slots_and_operations():
    from mlx_cluster.engine.plan import (
        MAX_ADAPTER_PATH_BYTES,
        AdapterOp,
        NewSequence,
        PlanDecodeError,
        SamplingParams,
        StepPlan,
        decode_plan,
        encode_plan,
    )

    seq = NewSequence(3, (1, 2), SamplingParams(max_tokens=4, seed=1), adapter=5)
    plan = StepPlan(step=9, new=(seq,), drop=(7,), adapters=(AdapterOp(5, "/a/caf\u00e9"), AdapterOp(2)))
    assert decode_plan(encode_plan(plan)) == plan
    with pytest.raises(PlanDecodeError, match="adapter path bytes"):
        decode_plan(encode_plan(StepPlan(step=1, adapters=(AdapterOp(1, "x" * (MAX_ADAPTER_PATH_BYTES + 1)),))))


def test_unload_waits_for_the_slot_to_be_free():
    from mlx_cluster.engine.adapters import AdapterRegistry, AdapterRequest, AdapterScheduler
    from mlx_cluster.engine.plan import AdapterOp

    registry = AdapterRegistry(max_adapters=2, default_slot=1)
    scheduler, answers = AdapterScheduler(registry), []
    scheduler.add(AdapterRequest("a", "/a", answers.append))
    assert scheduler.next_ops(set()) == (AdapterOp(2, "/a"),)  # slot 1 is model.adapter_path's
    assert registry.slot_of("a") is None, "not served before every rank has it"
    scheduler.applied({2: None})
    assert registry.slot_of("a") == 2 and answers == [None]

    scheduler.add(AdapterRequest("b", "/b", answers.append))
    assert answers[-1] == "all 2 adapter slots are in use (model.max_adapters); unload one first"
    scheduler.add(AdapterRequest("a", "", answers.append))
    assert registry.slot_of("a") is None, "new requests stop at once"
    assert scheduler.next_ops({2}) == (), "a running row still uses slot 2"
    assert scheduler.next_ops(set()) == (AdapterOp(2, ""),)
    scheduler.applied({2: None})
    assert "a" not in registry.by_name and answers[-1] is None
    scheduler.add(AdapterRequest("a", "", answers.append))
    assert answers[-1] == "no LoRA adapter named 'a' is loaded"
