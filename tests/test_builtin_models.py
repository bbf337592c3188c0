"""Tests of the built-in random-weight models (mlx_cluster.models.builtin). Only `tiny` is generated."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlx_cluster.models import builtin
from mlx_cluster.models.builtin import (
    MARKER_FILE,
    PRESETS,
    make_model,
    model_config,
    parameter_count,
    resolve_model_path,
    shard_plan,
    tensor_specs,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("builtin") / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir):
    from mlx_lm import load

    return load(str(tiny_dir))


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_make_model_is_deterministic(tiny_dir, tmp_path):
    other = make_model(tmp_path / "again", "tiny")
    assert _hashes(other) == _hashes(tiny_dir)


def test_directory_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    expected |= {"special_tokens_map.json", "model.safetensors.index.json", MARKER_FILE}
    assert expected <= names
    # No temp dirs were left next to the model.
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


def test_index_is_consistent(tiny_dir):
    from safetensors import safe_open

    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    files = sorted(tiny_dir.glob("model-*.safetensors"))
    assert len(files) >= 2
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    seen: dict[str, str] = {}
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                assert name not in seen, f"{name} is in {seen.get(name)} and {f.name}"
                seen[name] = f.name
                tensor = st.get_tensor(name)
                total += tensor.nbytes
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert sorted(seen) == sorted(name for name, _ in tensor_specs("tiny"))


def test_load_and_generate(tiny_loaded):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = tiny_loaded
    text = generate(model, tokenizer, "Hello there", max_tokens=16, sampler=make_sampler(temp=0.0))
    assert isinstance(text, str) and text


def test_greedy_outputs_are_not_degenerate(tiny_loaded):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer = tiny_loaded
    logits = model(mx.array([tokenizer.encode("The quick brown fox")]))[0, -1]
    assert logits.std().item() > 1.0  # spread out, not a flat distribution
    continuations = []
    for prompt in ["Hello, how are you?", "def main():", "Bonjour", "1 2 3 4"]:
        ids = tokenizer.encode(prompt)
        steps = generate_step(mx.array(ids), model, max_tokens=32)
        out = [int(token) for token, _ in steps]
        assert len(out) == 32
        assert not set(out) & set(tokenizer.eos_token_ids), "a random model should not stop on its own"
        assert len(set(out)) >= 8, f"too repetitive: {out}"
        continuations.append(tuple(out))
    assert len(set(continuations)) == len(continuations)


def test_chat_template(tiny_loaded):
    _, tokenizer = tiny_loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 degrees."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>tool\n{"temp": 20}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 20 degrees.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Paris?<|im_end|>\n")

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = tokenizer.apply_chat_template(messages[:2], tools=tools, tokenize=False, add_generation_prompt=True)
    assert with_tools.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_weather"' in with_tools and with_tools.count("<|im_start|>system") == 1
    assert tokenizer.tool_call_start == "<tool_call>"  # mlx-lm infers its json_tools parser


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you?",
        "  spaces  and\ttabs\n\nand newlines . , ' end ",
        "def f(x):\n    return x ** 2  # comment",
        "Ünïcödé: café, Straße, 日本語, Привет, 😀🚀, العربية",
        "<|im_start|>user\nhi<|im_end|>\n<tool_call>{}</tool_call>",
    ],
)
def test_tokenizer_round_trip(tiny_loaded, text):
    _, tokenizer = tiny_loaded
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert max(ids) < model_config("tiny")["vocab_size"]
    assert tokenizer.decode(ids) == text


def test_special_token_ids(tiny_loaded):
    _, tokenizer = tiny_loaded
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {0, 2}
    assert len(tokenizer.get_vocab()) == PRESETS["tiny"]["vocab_size"]


def test_presets_shapes_and_parameter_counts():
    assert 3_000_000 <= parameter_count("tiny") <= 5_000_000
    assert 100_000_000 <= parameter_count("small") <= 150_000_000
    assert 1_000_000_000 <= parameter_count("1b") <= 1_250_000_000
    assert 7_000_000_000 <= parameter_count("8b") <= 8_100_000_000
    llama = {"1b": (2048, 16, 32, 8, 8192), "8b": (4096, 32, 32, 8, 14336)}
    for preset, shape in llama.items():
        c = model_config(preset)
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        assert tuple(c[k] for k in keys) == shape
        assert c["torch_dtype"] == "bfloat16"
    # Qwen3-30B-A3B: 128 experts, 8 per token, ~3.3B parameters active per token.
    assert 29_500_000_000 <= parameter_count("30b-a3b") <= 30_500_000_000
    c = model_config("30b-a3b")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert tuple(c[k] for k in keys) == (2048, 48, 32, 4, 128)
    assert (c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]) == (128, 8, 768)
    for preset in PRESETS:
        c = model_config(preset)
        assert c["model_type"] in ("llama", "qwen3_moe") and not c["tie_word_embeddings"]
        for tp in (2, 4):  # tensor parallelism over 2 or 4 ranks must split heads evenly
            assert c["num_attention_heads"] % tp == 0 and c["num_key_value_heads"] % tp == 0
            assert c["intermediate_size"] % tp == 0 and c.get("moe_intermediate_size", 0) % tp == 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_what_mlx_lm_builds(preset):
    """The weights written are exactly the parameters of mlx-lm's model for the config written
    (names and shapes; the model is built lazily, so `30b-a3b` costs nothing here)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = model_config(preset)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    assert {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} == dict(tensor_specs(preset))


def test_moe_preset_serves_like_mlx_lm(tmp_path):
    """`tiny-moe` loads with mlx-lm, routes its tokens over many experts, and the engine's
    one-rank path (load, fusion, executor) gives mlx-lm's own greedy tokens."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_cluster.cache.testing import generate, make_executor
    from mlx_cluster.models.fuse import fuse_projections
    from mlx_cluster.models.loader import load_model_shard

    path = make_model(tmp_path / "tiny-moe", "tiny-moe")
    model, tokenizer = load(str(path))
    prompt = tokenizer.encode("The cluster serves every rank the same plan, and")
    gate = model.model.layers[0].mlp.gate
    h = model.model.embed_tokens(mx.array([prompt]))
    chosen = mx.argpartition(-gate(h), 4, axis=-1)[..., :4]
    assert len(set(chosen.flatten().tolist())) >= 8, "the router should spread tokens over the experts"
    want = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12, sampler=make_sampler(temp=0.0))]

    loaded = load_model_shard(str(path), mx.distributed.init())
    fuse_projections(loaded.model)
    [result] = generate(make_executor(loaded, None), [prompt], 12)
    assert result.tokens == want


def test_every_preset_has_several_files_within_limit():
    for preset, settings in PRESETS.items():
        plan = shard_plan(preset)
        assert len(plan) >= 2, preset
        assert [name for f in plan for name, _ in f] == [name for name, _ in tensor_specs(preset)]
        itemsize = 4 if settings["torch_dtype"] == "float32" else 2
        for f in plan:
            assert sum(itemsize * _prod(shape) for _, shape in f) <= settings["max_file_bytes"]


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_bfloat16_weights(tmp_path, monkeypatch):
    """The 1b/8b code path (bf16 safetensors) on a tiny shape."""
    import mlx.core as mx
    from mlx_lm import load

    monkeypatch.setitem(
        PRESETS, "tiny-bf16", {**PRESETS["tiny"], "torch_dtype": "bfloat16", "max_file_bytes": 5_000_000}
    )
    path = make_model(tmp_path / "bf16", "tiny-bf16")
    assert len(list(path.glob("model-*.safetensors"))) == 2
    model, tokenizer = load(str(path))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    logits = model(mx.array([tokenizer.encode("hello")]))
    assert mx.all(mx.isfinite(logits)).item()


def test_make_model_errors(tmp_path):
    with pytest.raises(ValueError, match="tiny, small, 1b, 8b, tiny-moe, 30b-a3b"):
        make_model(tmp_path / "x", "huge")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_model(foreign, "tiny")
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_make_model_replaces_stale_builtin(tiny_dir, tmp_path):
    import shutil

    stale = tmp_path / "stale"
    shutil.copytree(tiny_dir, stale)
    marker = json.loads((stale / MARKER_FILE).read_text())
    (stale / MARKER_FILE).write_text(json.dumps({**marker, "format_version": 0}))
    (stale / "leftover.txt").write_text("from an older format")
    make_model(stale, "tiny")
    assert _hashes(stale) == _hashes(tiny_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale"]


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("/some/local/model", str(tmp_path)) == "/some/local/model"
    assert resolve_model_path("mlx-community/Llama-3.2-1B-Instruct-4bit", str(tmp_path)).startswith("mlx-community/")
    with pytest.raises(ValueError) as err:
        resolve_model_path("builtin:nope", str(tmp_path))
    assert all(name in str(err.value) for name in PRESETS)

    path = Path(resolve_model_path("builtin:tiny", str(tmp_path)))
    assert path == tmp_path / f"tiny-v{builtin.FORMAT_VERSION}"
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert Path(resolve_model_path("builtin:tiny", str(tmp_path))) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes


def test_resolve_model_path_concurrent(tmp_path):
    """Concurrent callers (flock is per open file, so threads contend like processes) share one copy."""
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_path("builtin:tiny", str(tmp_path))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == [f"tiny-v{builtin.FORMAT_VERSION}"]


def test_cli_make_model(tmp_path, tiny_dir):
    out = tmp_path / "cli-model"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_cluster", "make-model", str(out), "--preset", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == out
    assert _hashes(out) == _hashes(tiny_dir)
