"""Tests for mlx_cluster.models.loader: partial reads of tensor-parallel shards.

A tiny random llama model is saved as an mlx-lm directory split across two
safetensors files. The slicing is tested without a real distributed group: the loader
only needs ``rank()`` and ``size()``, and mlx's shard helpers accept any such object
as long as the model is not run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_cluster.models import loader
from mlx_cluster.models.loader import (
    ShardSpec,
    check_tensor_parallel,
    load_model_shard,
    model_fingerprint,
    read_shard,
    resolve_local_path,
    shard_ranges,
)
from mlx_cluster.models.safetensors_reader import SafetensorsReader, read_checkpoint

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 256,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = mx.array([[1, 5, 17, 42, 99, 3, 250, 7]])


class FakeGroup:
    """Stands in for mx.distributed.Group where only rank() and size() are used."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def write_tokenizer(path: Path) -> None:
    """A tiny word-level tokenizer that transformers and mlx-lm can load offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world"] + [f"w{i}" for i in range(40)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def save_model_dir(path: Path, model: nn.Module, config: dict, extra: dict | None = None) -> Path:
    """Save like mlx-lm does, but split across two files plus an index.

    ``extra`` tensors go into a third file (used for tensors sanitize drops).
    """
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    names = sorted(weights)
    files = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    if extra:
        weights.update(extra)
        files["model-extra.safetensors"] = sorted(extra)
    weight_map = {}
    for file, file_names in files.items():
        mx.save_safetensors(str(path / file), {n: weights[n] for n in file_names}, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(file_names, file))
    total = sum(w.nbytes for w in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path)
    return path


def make_model(kind: str) -> tuple[nn.Module, dict]:
    """A random tiny llama in float32, bfloat16 or 4-bit quantized (bf16 scales)."""
    mx.random.seed({"float32": 0, "bfloat16": 1, "quantized": 2}[kind])
    config = dict(CONFIG)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if kind in ("bfloat16", "quantized"):
        model.set_dtype(mx.bfloat16)
    if kind == "quantized":
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
        config["quantization_config"] = config["quantization"]
    mx.eval(model.parameters())
    return model, config


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for kind in ("float32", "bfloat16", "quantized"):
        model, config = make_model(kind)
        # An unused precomputed rotary table, as in HF llama checkpoints, stored in a
        # file of its own: llama's sanitize drops it, so no rank should open that file.
        extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": mx.arange(8, dtype=mx.float32)}
        dirs[kind] = save_model_dir(root / kind, model, config, extra=extra)
    return dirs


def reference_shard(model_dir: Path, group) -> dict[str, mx.array]:
    """mlx-lm's way: load every tensor in full, then slice with model.shard()."""
    model, _ = mlx_lm_load_model(model_dir, lazy=True)
    if group.size() > 1:
        model.shard(group)
    return dict(tree_flatten(model.parameters()))


def assert_same_params(actual: nn.Module, expected: dict[str, mx.array]) -> None:
    params = dict(tree_flatten(actual.parameters()))
    assert params.keys() == expected.keys()
    for name, value in params.items():
        assert value.dtype == expected[name].dtype, name
        assert value.shape == expected[name].shape, name
        assert mx.array_equal(value, expected[name]).item(), name


def expected_bytes(model_dir: Path, size: int) -> int:
    """Sharded tensors / size + replicated tensors, the inv_freq table excluded."""
    total = 0
    for name, info in read_checkpoint(model_dir).items():
        if "rotary_emb" in name:
            continue
        is_sharded = any(f".{p}." in name for p in SHARDED)
        total += info.nbytes // size if is_sharded else info.nbytes
    return total


# --- slicing math -----------------------------------------------------------


@pytest.mark.parametrize(
    "segments",
    [1, 3, [6, 12], [0.25, 0.75]],
)
@pytest.mark.parametrize("axis", [0, -1])
def test_shard_ranges_match_mlx_shard(segments, axis):
    from mlx.nn.layers.distributed import _shard

    full = mx.arange(24 * 24).reshape(24, 24)
    for rank in range(2):
        group = FakeGroup(rank, 2)
        expected = _shard({"w": full}, lambda p, w: (axis, segments), group)["w"]
        spec = ShardSpec(axis=axis, segments=segments, size=2, rank=rank)
        index = [slice(None)] * 2
        parts = []
        for lo, hi in spec.ranges(24):
            index[axis] = slice(lo, hi)
            parts.append(full[tuple(index)])
        assert mx.array_equal(mx.concatenate(parts, axis=axis), expected).item()


def test_shard_ranges_merges_and_rejects():
    assert shard_ranges(128, 1, 4, 2) == [(64, 96)]
    assert shard_ranges(12, 3, 2, 1) == [(2, 4), (6, 8), (10, 12)]
    with pytest.raises(ValueError):
        shard_ranges(10, 1, 3, 0)


# --- the per-tensor reader --------------------------------------------------


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "quantized"])
def test_read_shard_matches_full_tensor_sliced(model_dirs, kind):
    """Each sharded parameter read partially equals the full tensor sliced by mlx."""
    model_dir = model_dirs[kind]
    tensors = read_checkpoint(model_dir)
    full = mx.load(str(model_dir / "model-00001-of-00002.safetensors"))
    full.update(mx.load(str(model_dir / "model-00002-of-00002.safetensors")))
    for rank in range(2):
        reference = reference_shard(model_dir, FakeGroup(rank, 2))
        with SafetensorsReader() as reader:
            for name, expected in reference.items():
                module = name.rsplit(".", 2)[-2]
                if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                    spec = ShardSpec(axis=0, segments=1, size=2, rank=rank)  # output rows
                elif module in ("o_proj", "down_proj"):
                    spec = ShardSpec(axis=-1, segments=1, size=2, rank=rank)  # input columns
                else:
                    spec = None
                before = reader.bytes_read
                got = read_shard(reader, tensors[name], spec)
                assert got.dtype == expected.dtype == full[name].dtype, name
                assert mx.array_equal(got, expected).item(), name
                # Only the rank's bytes were copied out of the file.
                assert reader.bytes_read - before == (full[name].nbytes // 2 if spec else full[name].nbytes)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "quantized"])
def test_load_model_shard_two_ranks_matches_mlx_shard(model_dirs, kind, monkeypatch):
    """The whole fast path for rank 0 and 1 of 2 equals mlx-lm's load + shard()."""
    model_dir = model_dirs[kind]
    opened = set()
    original_view = SafetensorsReader._view

    def recording_view(self, info):
        opened.add(info.file.name)
        return original_view(self, info)

    monkeypatch.setattr(SafetensorsReader, "_view", recording_view)
    total = 0
    for rank in range(2):
        group = FakeGroup(rank, 2)
        loaded = load_model_shard(str(model_dir), group)
        assert_same_params(loaded.model, reference_shard(model_dir, group))
        assert loaded.bytes_read == expected_bytes(model_dir, 2)
        total += loaded.bytes_read
        layer = loaded.model.model.layers[0]
        assert layer.self_attn.n_heads == 2 and layer.self_attn.n_kv_heads == 1
    # The file holding only the tensor sanitize drops was never opened.
    assert opened == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    print(f"\n{kind}: full {expected_bytes(model_dir, 1)} bytes, ranks 0+1 read {total} bytes")


# --- end to end -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "quantized"])
def test_single_rank_logits_match_mlx_lm_load(model_dirs, kind):
    model_dir = model_dirs[kind]
    loaded = load_model_shard(str(model_dir), mx.distributed.init())
    reference_model, reference_tokenizer = mlx_lm_load(str(model_dir))
    assert mx.array_equal(loaded.model(PROMPT), reference_model(PROMPT)).item()
    assert loaded.bytes_read == expected_bytes(model_dir, 1)
    assert loaded.path == model_dir.resolve()
    assert loaded.config["num_attention_heads"] == 4
    assert loaded.tokenizer.encode("hello world") == reference_tokenizer.encode("hello world")
    assert loaded.tokenizer.eos_token_ids == {2}


def test_sanitize_transform_falls_back_to_full_load(model_dirs, monkeypatch, caplog):
    """When sanitize changes tensors, the full lazy load is used, with a warning."""
    original = llama.Model.sanitize

    def transforming_sanitize(self, weights):
        weights = original(self, weights)
        weights["model.norm.weight"] = weights["model.norm.weight"] * 2
        return weights

    monkeypatch.setattr(llama.Model, "sanitize", transforming_sanitize)
    model_dir = model_dirs["float32"]
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        loaded = load_model_shard(str(model_dir), FakeGroup(1, 2))
    assert "partial-read fast path" in caplog.text and "sanitize" in caplog.text
    assert_same_params(loaded.model, reference_shard(model_dir, FakeGroup(1, 2)))
    full = read_checkpoint(model_dir)
    assert loaded.bytes_read == sum(info.nbytes for info in full.values())


def test_adapter(model_dirs, tmp_path):
    """A LoRA adapter: applied as mlx-lm does on one rank, fused before sharding on two."""
    model_dir = model_dirs["float32"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.o_proj"]}
    adapter_config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    mx.random.seed(3)
    weights = {}
    for i in range(2):
        for proj, (fan_in, fan_out) in {"q_proj": (64, 64), "o_proj": (64, 64)}.items():
            prefix = f"model.layers.{i}.self_attn.{proj}"
            weights[f"{prefix}.lora_a"] = mx.random.normal((fan_in, 4)) * 0.1
            weights[f"{prefix}.lora_b"] = mx.random.normal((4, fan_out)) * 0.1
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)

    single = load_model_shard(str(model_dir), mx.distributed.init(), adapter_path=str(adapter))
    reference_model, _ = mlx_lm_load(str(model_dir), adapter_path=str(adapter))
    assert mx.allclose(single.model(PROMPT), reference_model(PROMPT), atol=1e-5).item()
    assert single.fingerprint != model_fingerprint(model_dir)

    # Two ranks, unfused: q_proj (column-parallel) keeps A whole and splits B's output columns;
    # o_proj (row-parallel) splits A's input rows and keeps B whole, as its base weight is split.
    ranks = [load_model_shard(str(model_dir), FakeGroup(r, 2), adapter_path=str(adapter)) for r in range(2)]
    layers = [dict(r.model.named_modules()) for r in ranks]
    q, o = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"
    a_q, b_q = weights[f"{q}.lora_a"], weights[f"{q}.lora_b"]
    a_o, b_o = weights[f"{o}.lora_a"], weights[f"{o}.lora_b"]
    for m in layers:
        assert mx.array_equal(m[q]["lora_a"][1], a_q) and mx.array_equal(m[o]["lora_b"][1], b_o)
    assert mx.array_equal(mx.concatenate([m[q]["lora_b"][1] for m in layers], axis=1), b_q)
    assert mx.array_equal(mx.concatenate([m[o]["lora_a"][1] for m in layers], axis=0), a_o)
    assert all(not m[q]["lora_a"][0].any().item() for m in layers), "slot 0 is no adapter"


# --- checks, fingerprint, paths ---------------------------------------------


def test_divisibility_error_message():
    config = {
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
    }
    with pytest.raises(ValueError) as e:
        check_tensor_parallel(config, 3)
    assert str(e.value) == (
        "model has 8 KV heads, which 3 ranks cannot split evenly; "
        "use a tensor-parallel size that divides 8 (1, 2, 4, 8)"
    )
    with pytest.raises(
        ValueError, match=r"model has 8 KV heads, which 16 ranks cannot split evenly; .* \(1, 2, 4, 8\)"
    ):
        check_tensor_parallel(config, 16)
    with pytest.raises(ValueError, match="model has 12 attention heads, which 8 ranks"):
        check_tensor_parallel({**config, "num_attention_heads": 12}, 8)
    with pytest.raises(ValueError, match="MLP intermediate size of 100"):
        check_tensor_parallel({**config, "intermediate_size": 100}, 8)
    for size in (1, 2, 4, 8):
        check_tensor_parallel(config, size)


def test_divisibility_checked_before_loading(model_dirs):
    with pytest.raises(ValueError, match="2 KV heads, which 4 ranks cannot split evenly"):
        load_model_shard(str(model_dirs["float32"]), FakeGroup(0, 4))


def test_model_without_shard_is_rejected():
    config = {"model_type": "gpt2", "n_head": 4, "num_attention_heads": 4, "intermediate_size": 128}
    with pytest.raises(ValueError, match="no shard\\(\\) method"):
        check_tensor_parallel(config, 2)
    check_tensor_parallel(config, 1)


def test_fingerprint_stable_and_sensitive(model_dirs, tmp_path):
    model_dir = model_dirs["bfloat16"]
    first = model_fingerprint(model_dir)
    assert len(first) == 64 and first == model_fingerprint(model_dir)
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert model_fingerprint(copy) == first
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != first
    assert model_fingerprint(model_dirs["float32"]) != first
    assert load_model_shard(str(model_dir), FakeGroup(0, 2)).fingerprint == first


def test_missing_path_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ValueError, match="does not exist and could not be fetched from the Hugging Face Hub"):
        resolve_local_path(missing)
    with pytest.raises(ValueError, match="does not exist and could not be fetched"):
        load_model_shard(missing, FakeGroup(0, 1))

    # A repo id goes to the hub; in offline mode with an empty cache that fails.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="model path nobody/no-such-model does not exist and could not be fetched"):
        resolve_local_path("nobody/no-such-model")


def test_local_path_resolves(model_dirs):
    assert resolve_local_path(str(model_dirs["float32"])) == model_dirs["float32"].resolve()


# --- real two-process tensor parallelism over the ring backend --------------

WORKER = textwrap.dedent(
    """
    import sys
    import mlx.core as mx
    import numpy as np
    from mlx_cluster.models.loader import load_model_shard

    group = mx.distributed.init(backend="ring", strict=True)
    loaded = load_model_shard(sys.argv[1], group)
    logits = loaded.model(mx.array([[1, 5, 17, 42, 99, 3, 250, 7]]))
    np.save(f"{sys.argv[2]}/logits{group.rank()}.npy", np.array(logits.astype(mx.float32)))
    print("bytes_read", group.rank(), loaded.bytes_read, flush=True)
    """
)


def _free_ports(n: int) -> list[int]:
    from tests.cluster import free_port_block  # below the ephemeral range: see there

    base = free_port_block(n)
    return list(range(base, base + n))


@pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="mlx built without the ring backend")
def test_two_process_ring_logits_match_single_process(model_dirs, tmp_path):
    model_dir = model_dirs["float32"]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in _free_ports(2)]))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(model_dir), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(outputs)
    print("\n" + "".join(line + "\n" for out in outputs for line in out.splitlines() if "bytes_read" in line))

    single = load_model_shard(str(model_dir), mx.distributed.init())
    expected = np.array(single.model(PROMPT))
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"logits{rank}.npy"), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "quantized"])
def test_fused_projections_give_the_same_logits(model_dirs, kind):
    """Serving fuses q/k/v and gate/up into one matmul each (fewer kernels per step): same numbers."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_cluster.models.fuse import fuse_projections

    plain = load_model_shard(str(model_dirs[kind]), mx.distributed.init()).model
    fused = load_model_shard(str(model_dirs[kind]), mx.distributed.init()).model
    assert fuse_projections(fused) == 2 * len(fused.model.layers)
    layer = fused.model.layers[0]
    assert "qkv_proj" in layer.self_attn and "gate_up_proj" in layer.mlp
    assert fuse_projections(fused) == 0  # already fused: nothing left to do
    outputs = []
    for model in (plain, fused):
        cache = make_prompt_cache(model)
        outputs.append((model(PROMPT, cache=cache), model(mx.array([[7]]), cache=cache)))  # prefill, decode
    for a, b in zip(*outputs):
        assert mx.array_equal(a, b).item()
