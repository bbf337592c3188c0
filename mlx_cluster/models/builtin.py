"""Built-in deterministic random-weight models (`builtin:tiny`, `small`, `1b`, `8b`, `tiny-moe`, `30b-a3b`).

They let the runtime, tests and benchmarks run without downloading anything: `make_model` writes a
complete mlx-lm model directory (config, sharded safetensors + index, tokenizer, generation
config) whose weights are random but fully determined by the preset, so every host of a cluster
materialises byte-identical files on its own.

The dense presets use mlx-lm's `llama` architecture (which implements `shard(group)` for tensor
parallelism) with untied embeddings. `1b` and `8b` copy the Llama-3.2-1B / Llama-3.1-8B layer
shapes, but their vocabulary is the locally trained 32768-token tokenizer instead of Llama-3's
128256, so they have fewer parameters than the real models (~1.11B and ~7.25B instead of 1.24B and
8.03B) and a cheaper embedding / lm_head. Use `parameter_count(preset)` for the exact numbers.

The mixture-of-experts presets use mlx-lm's `qwen3_moe` (q/k norms, a router, SwitchGLU experts
stored stacked as mlx-lm's sanitize leaves them). `30b-a3b` copies Qwen3-30B-A3B's shapes (48
layers, 128 experts of which 8 per token) with the 32k vocabulary: 30.0B parameters, 60 GB in
bfloat16, ~2.8B of them active per token. `tiny-moe` is the same architecture at `tiny`'s
scale, for tests on a CPU.

The generated text is gibberish by design, but not degenerate: weights are scaled so that logits
are spread out and the continuation depends on the whole prompt. The lm_head rows of the control
tokens (<|im_end|>, <|endoftext|>, ...) are zero, so a random model practically never ends a
reply on its own: generation runs until max_tokens or a stop string, which keeps benchmark
lengths predictable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from mlx_cluster.models.load_progress import LoadProgress
from mlx_cluster.models.tokenizer_train import (
    EOS_TOKEN,
    EXTRA_TOKENS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    save_tokenizer,
    train_tokenizer,
    write_json,
)

# Bump whenever the bytes written for an existing preset change (weights, tokenizer, configs):
# it names the cache directory, so old caches are simply left behind instead of reused.
FORMAT_VERSION = 2  # 2: the chat template opens <think> when enable_thinking is true
MARKER_FILE = "mlx_cluster_builtin.json"
BUILTIN_PREFIX = "builtin:"
SEED_NAMESPACE = "mlx-cluster-builtin"

_MB = 1_000_000
_GB = 1_000_000_000

# Model shapes plus two generator settings: `torch_dtype` (what the weights are stored as) and
# `max_file_bytes` (the safetensors split size; chosen so every preset has at least 2 files and
# multi-file loading is always exercised).
PRESETS: dict[str, dict] = {
    "tiny": {  # ~4M params, float32: fast CI on CPU
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 704,
        "vocab_size": 2048,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "max_file_bytes": 10 * _MB,
    },
    "small": {  # ~126M params, float32 (CPU matmuls are fastest in float32)
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "intermediate_size": 2048,
        "vocab_size": 32768,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "max_file_bytes": 300 * _MB,
    },
    "1b": {  # Llama-3.2-1B shapes, untied, 32k vocab
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 32768,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "torch_dtype": "bfloat16",
        "max_file_bytes": 2 * _GB,
    },
    "8b": {  # Llama-3.1-8B shapes, 32k vocab
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 32768,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "torch_dtype": "bfloat16",
        "max_file_bytes": 5 * _GB,
    },
    # Mixture of experts (mlx-lm's qwen3_moe); `model_type` picks the architecture (default llama).
    "tiny-moe": {  # ~8M params, float32: the MoE path on a CPU
        "model_type": "qwen3_moe",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "intermediate_size": 704,  # a dense layer's; unused with every layer sparse
        "moe_intermediate_size": 128,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "vocab_size": 2048,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "max_file_bytes": 20 * _MB,
    },
    "30b-a3b": {  # Qwen3-30B-A3B shapes, 32k vocab
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "vocab_size": 32768,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "max_file_bytes": 5 * _GB,
    },
}

# Weight scales (std of the uniform init). Fan-in scaling keeps every projection's output at
# unit scale, so attention and MLP contribute as much as the token embedding to the residual
# stream (with the usual 0.02 the embedding dominates and the output depends on the last token
# only). LOGIT_STD makes logits ~N(0, 2^2): a peaked but not one-hot next-token distribution.
EMBED_STD = 1.0
LOGIT_STD = 2.0

# (dtype name) -> (safetensors dtype code, bytes per element)
_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _check_preset(preset: str) -> dict:
    """Return the preset's settings, or raise ValueError naming the allowed presets."""
    if preset not in PRESETS:
        raise ValueError(f"unknown built-in model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def model_config(preset: str) -> dict:
    """The config.json contents of a preset (mlx-lm / transformers format of its model_type)."""
    settings = {k: v for k, v in _check_preset(preset).items() if k != "max_file_bytes"}
    model_type = settings.get("model_type", "llama")
    config = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "head_dim": settings["hidden_size"] // settings["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": _eos_token_ids(),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
    }
    if model_type == "qwen3_moe":  # every layer sparse, top-k weights renormalized (as Qwen3-30B-A3B)
        config.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    return {**config, **settings}


def _eos_token_ids() -> list[int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> ends a document. Specials have ids 0, 1, 2."""
    return [SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(PAD_TOKEN)]


def tensor_specs(preset: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in file order, named as mlx-lm's model of the preset's
    model_type expects (qwen3_moe: experts already stacked, as its sanitize would leave them)."""
    c = model_config(preset)
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_dim = c["num_attention_heads"] * c["head_dim"]
    kv_dim = c["num_key_value_heads"] * c["head_dim"]
    moe = c["model_type"] == "qwen3_moe"
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_dim)),
        ]
        if moe:
            experts, expert_inter = c["num_experts"], c["moe_intermediate_size"]
            specs += [
                (p + "self_attn.q_norm.weight", (c["head_dim"],)),
                (p + "self_attn.k_norm.weight", (c["head_dim"],)),
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.gate.weight", (experts, hidden)),
                (p + "mlp.switch_mlp.gate_proj.weight", (experts, expert_inter, hidden)),
                (p + "mlp.switch_mlp.up_proj.weight", (experts, expert_inter, hidden)),
                (p + "mlp.switch_mlp.down_proj.weight", (experts, hidden, expert_inter)),
            ]
        else:
            specs += [
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.gate_proj.weight", (inter, hidden)),
                (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter)),
            ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def parameter_count(preset: str) -> int:
    """Number of parameters of a preset (computed from shapes; nothing is generated)."""
    return sum(math.prod(shape) for _, shape in tensor_specs(preset))


def shard_plan(preset: str) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensor_specs into files of at most max_file_bytes (a lone larger tensor gets its own file)."""
    settings = _check_preset(preset)
    itemsize = _DTYPES[settings["torch_dtype"]][1]
    files: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_specs(preset):
        nbytes = math.prod(shape) * itemsize
        if files[-1] and size + nbytes > settings["max_file_bytes"]:
            files.append([])
            size = 0
        files[-1].append((name, shape))
        size += nbytes
    return files


def tensor_seed(name: str) -> int:
    """A 63-bit seed derived from the tensor name alone, so tensors can be generated in any order."""
    digest = hashlib.sha256(f"{SEED_NAMESPACE}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def init_tensor(name: str, shape: tuple[int, ...], dtype: str, zero_rows: list[int] = ()):
    """Generate one weight deterministically (an `mx.array` of `dtype`).

    Uniform instead of normal noise (same std), WHY: bytes should not depend on the machine or
    backend (CPU, Metal, CUDA), since each host of a cluster generates its own copy. mlx's
    uniform(0, 1) is random bits turned into floats exactly; `u - 0.5` is exact too, which leaves
    a single rounded multiply. Normal noise goes through erfinv, whose approximation can differ.
    """
    import mlx.core as mx

    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=getattr(mx, dtype))
    if name == "model.embed_tokens.weight":
        std = EMBED_STD
    elif name == "lm_head.weight":
        std = LOGIT_STD / math.sqrt(shape[-1])
    else:
        std = 1.0 / math.sqrt(shape[-1])  # fan-in scaling (the last axis, also of stacked experts)
    width = std * math.sqrt(12.0)  # uniform over an interval of width w has std w / sqrt(12)
    weight = (mx.random.uniform(shape=shape, key=mx.random.key(tensor_seed(name))) - 0.5) * width
    if zero_rows:
        weight[mx.array(list(zero_rows))] = 0.0
    return weight.astype(getattr(mx, dtype))


def _write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, zero_rows: list[int], on_bytes=None
) -> int:
    """Stream tensors into one safetensors file, generating each just before it is written.

    Writing the format by hand (8-byte header length, JSON header, raw little-endian data) keeps
    memory at one tensor instead of one file, and the header byte-identical across runs. Returns
    the number of data bytes written.
    """
    import mlx.core as mx

    code, itemsize = _DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            rows = zero_rows if name == "lm_head.weight" else ()
            weight = init_tensor(name, shape, dtype, rows)
            mx.eval(weight)
            f.write(memoryview(weight))
            if on_bytes is not None:
                on_bytes(weight.nbytes)
            del weight
    return offset


def _write_weights(out_dir: Path, preset: str, zero_rows: list[int]) -> None:
    """Write model-0000i-of-0000N.safetensors files and model.safetensors.index.json."""
    plan = shard_plan(preset)
    dtype = PRESETS[preset]["torch_dtype"]
    weight_map, total = {}, 0
    itemsize = _DTYPES[dtype][1]
    # Progress lines (`writing weights: X of Y MB`): `up` draws them as a bar, like the load's.
    progress = LoadProgress(
        sum(math.prod(shape) * itemsize for tensors in plan for _, shape in tensors), "writing weights"
    )
    written = 0

    def on_bytes(n: int) -> None:
        nonlocal written
        written += n
        progress.update(written)

    for i, tensors in enumerate(plan, start=1):
        filename = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        total += _write_safetensors(out_dir / filename, tensors, dtype, zero_rows, on_bytes)
        weight_map.update({name: filename for name, _ in tensors})
    progress.update(written, final=True)
    write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _marker(preset: str) -> dict:
    """Contents of the completion marker; includes the preset so an edited preset is regenerated."""
    return {"format_version": FORMAT_VERSION, "generator": __name__, "preset": preset, "settings": PRESETS[preset]}


def _is_complete(out_dir: Path, preset: str) -> bool:
    """True if out_dir holds a finished model of this preset and format version."""
    try:
        return json.loads((out_dir / MARKER_FILE).read_text()) == _marker(preset)
    except (OSError, ValueError):
        return False


def _write_model(out_dir: Path, preset: str) -> None:
    """Write every file of the model into the (empty) directory out_dir; the marker goes last."""
    config = model_config(preset)
    tokenizer = train_tokenizer(config["vocab_size"])
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):  # config.json hard-codes these ids
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    save_tokenizer(tokenizer, out_dir, config["max_position_embeddings"])
    write_json(out_dir / "config.json", config)
    generation = {"bos_token_id": None, "eos_token_id": _eos_token_ids(), "pad_token_id": config["pad_token_id"]}
    write_json(out_dir / "generation_config.json", generation)
    zero_rows = sorted(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + EXTRA_TOKENS)
    _write_weights(out_dir, preset, zero_rows)
    write_json(out_dir / MARKER_FILE, _marker(preset))


def _replaceable(out_dir: Path) -> bool:
    """True if out_dir is absent, an empty directory, or a built-in model (ours to replace)."""
    if not out_dir.exists():
        return True
    return out_dir.is_dir() and ((out_dir / MARKER_FILE).exists() or not any(out_dir.iterdir()))


def _make_room(out_dir: Path) -> Path | None:
    """Clear the way for renaming a new model to out_dir (which must be `_replaceable`).

    An empty directory is removed; a stale built-in model (older format version or another
    preset) is moved aside and returned, for the caller to delete after the swap.
    """
    if not out_dir.exists():
        return None
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        return None
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    out_dir.rename(old / "model")
    return old


def make_model(out_dir, preset: str) -> Path:
    """Write the built-in model `preset` to out_dir and return its path.

    Atomic: files are written into a temporary directory next to out_dir, which is renamed into
    place only once complete (its marker file written last). If out_dir already holds this preset
    at the current format version it is returned untouched.
    """
    _check_preset(preset)
    if sys.byteorder != "little":
        raise RuntimeError("built-in models are written as little-endian safetensors")
    out_dir = Path(out_dir).expanduser().absolute()
    if _is_complete(out_dir, preset):
        return out_dir
    if not _replaceable(out_dir):  # never overwrite the user's data; check before generating
        raise FileExistsError(f"{out_dir} exists and is not a built-in model directory; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the model should be readable like any dir
        _write_model(tmp, preset)
        if _is_complete(out_dir, preset):  # another process finished the same model meanwhile
            return out_dir
        if not _replaceable(out_dir):
            raise FileExistsError(f"{out_dir} appeared while the model was being written")
        old = _make_room(out_dir)
        os.rename(tmp, out_dir)
    except OSError:
        if _is_complete(out_dir, preset):  # lost a rename race to an identical model: fine
            return out_dir
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def resolve_model_path(path: str, builtin_dir: str = "~/.cache/mlx-cluster/models") -> str:
    """Map `builtin:NAME` to a materialised model directory; return any other path unchanged.

    The model is written once to builtin_dir/NAME-vFORMAT_VERSION. An exclusive flock serialises
    concurrent callers (e.g. all ranks of a cluster starting on one host): the first writes, the
    others wait and then find the finished model.
    """
    if not path.startswith(BUILTIN_PREFIX):
        return path
    preset = path[len(BUILTIN_PREFIX) :]
    _check_preset(preset)
    root = Path(builtin_dir).expanduser().absolute()
    target = root / f"{preset}-v{FORMAT_VERSION}"
    if _is_complete(target, preset):  # fast path: no lock needed to read a finished model
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        make_model(target, preset)
    return str(target)
