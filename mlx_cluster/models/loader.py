"""Load a model on one rank of a tensor-parallel group, reading only that rank's weights.

``mlx_lm.utils.sharded_load`` builds the model on lazily loaded full tensors and then
slices them, so every rank reads every byte of the checkpoint, and it ends with a
collective on ``mx.cpu`` that breaks under the NCCL backend. This loader instead:

1. builds the model from its config the way mlx-lm does, without touching weight data;
2. calls ``model.shard(group)`` while recording how mlx's shard helpers slice each
   parameter (axis and segments);
3. reads each parameter from the safetensors files through a memmap: only the rank's
   row or column block for sharded tensors, the whole tensor for replicated ones.

Checkpoints whose tensors ``model.sanitize()`` would rename or transform, models whose
``shard()`` does something the recorder cannot reproduce and legacy quantization formats
fall back to mlx-lm's full lazy load followed by ``model.shard()``, with a warning. The
loader does no collective communication at all. An adapter is applied unfused, with each
rank's part of its A and B (models/lora.py), so quantized weights stay exactly as stored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.nn.layers.distributed as mlx_distributed
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import (
    _download,
    _get_classes,
    _takes_global_scale,
    infer_quant_config,
    load_config,
    load_model,
    load_tokenizer,
)

from mlx_cluster.models.load_progress import LoadProgress
from mlx_cluster.models.safetensors_reader import (
    SafetensorsReader,
    TensorInfo,
    is_supported_dtype,
    mlx_dtype,
    read_checkpoint,
    read_header,
    weight_files,
)

logger = logging.getLogger(__name__)

_HUB_ERROR = "model path {path} does not exist and could not be fetched from the Hugging Face Hub: {reason}"


@dataclass
class LoadedModel:
    """A model loaded (and sharded, for a group of several ranks) on this rank."""

    model: nn.Module  # sharded for the group when group.size() > 1
    tokenizer: TokenizerWrapper
    config: dict  # the model's config.json (as mlx-lm reads it)
    path: Path  # the local model directory
    fingerprint: str  # stable hex id of the model, see model_fingerprint()
    bytes_read: int  # bytes of weight data this rank read from disk
    # How each parameter was sharded (None: whole), when the partial-read path loaded it:
    # LoRA adapters split their A or B the same way (models/lora.py).
    shard_specs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Checks and path resolution
# ---------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tensor_parallel(config: dict, tp_size: int) -> None:
    """Raise ValueError if the model cannot be split evenly across ``tp_size`` ranks.

    Tensor parallelism splits the attention heads, the KV heads and the MLP
    intermediate dimension across ranks, so each must be divisible by ``tp_size``,
    and the mlx-lm model class must implement ``shard()``.
    """
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size must be at least 1, got {tp_size}")
    if tp_size == 1:
        return

    # Multimodal configs keep the language model's sizes under text_config.
    text_config = config.get("text_config") or {}

    def get(key: str) -> Any:
        return config.get(key, text_config.get(key))

    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    intermediate = get("intermediate_size")
    # KV heads first: they are the fewest, so theirs is the most useful message.
    dims = [
        (kv_heads, "{} KV heads"),
        (heads, "{} attention heads"),
        (intermediate, "an MLP intermediate size of {}"),
    ]
    dims = [(value, what) for value, what in dims if isinstance(value, int) and value > 0]
    common = math.gcd(*(value for value, _ in dims)) if dims else 0
    for value, what in dims:
        if value % tp_size:
            sizes = ", ".join(map(str, _divisors(common)))
            raise ValueError(
                f"model has {what.format(value)}, which {tp_size} ranks cannot split evenly; "
                f"use a tensor-parallel size that divides {common} ({sizes})"
            )

    # A custom architecture file is only imported with trust_remote_code; its shard()
    # support is checked once the model is built.
    if config.get("model_file") is None:
        model_class, _ = _get_classes(config)
        if not hasattr(model_class, "shard"):
            raise ValueError(
                f"model type {config.get('model_type')!r} does not support tensor parallelism in mlx-lm "
                f"(its Model class has no shard() method); use a tensor-parallel size of 1"
            )


def _looks_like_repo_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def resolve_local_path(path: str, revision: str | None = None) -> Path:
    """Return the local directory of a model given a directory or a Hugging Face repo id.

    Repo ids are fetched (or found in the local cache) with mlx-lm's ``_download``,
    which goes through ``huggingface_hub.snapshot_download`` and so honours
    ``HF_HUB_OFFLINE``. Raises ValueError with a clear message when neither works.
    """
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"model path {path} is not a directory")
        return local.resolve()
    if not _looks_like_repo_id(str(path)):
        raise ValueError(_HUB_ERROR.format(path=path, reason="it is neither a local directory nor a valid repo id"))
    try:
        return Path(_download(str(path), revision=revision))
    except Exception as e:  # network, auth, offline mode, missing repo, ...
        raise ValueError(_HUB_ERROR.format(path=path, reason=f"{type(e).__name__}: {e}")) from e


# ---------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------


def _weights_description(files: list[Path]) -> dict:
    """Names, dtypes, shapes and file sizes of the tensors in ``files`` (headers only)."""
    return {
        path.name: {
            "size": path.stat().st_size,
            "tensors": {name: [info.dtype, list(info.shape)] for name, info in sorted(read_header(path).items())},
        }
        for path in files
    }


def model_fingerprint(model_dir: Path, adapter_path: str | Path | None = None) -> str:
    """A stable hex id of a model directory (and adapter), cheap enough for 8B models.

    It hashes config.json and the safetensors headers (tensor names, dtypes, shapes)
    and file sizes, plus the adapter's config and headers, but not the weight bytes.
    The same directory content always gives the same fingerprint, so ranks can check
    that they loaded the same model.
    """
    model_dir = Path(model_dir)
    description: dict[str, Any] = {
        "config": (model_dir / "config.json").read_text(),
        "weights": _weights_description(weight_files(model_dir)),
    }
    if adapter_path is not None:
        adapter_dir = Path(adapter_path)
        config_file = adapter_dir / "adapter_config.json"
        description["adapter"] = {
            "config": config_file.read_text() if config_file.exists() else None,
            "weights": _weights_description(sorted(adapter_dir.glob("*.safetensors"))),
        }
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------
# Shard slicing math
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """How mlx's shard helpers slice one parameter: ``_split`` semantics of mlx."""

    axis: int
    segments: int | list  # 1, a number of equal segments, split indices or fractions
    size: int  # group size
    rank: int

    def ranges(self, dim: int) -> list[tuple[int, int]]:
        """The index ranges along ``axis`` (of length ``dim``) that this rank keeps."""
        return shard_ranges(dim, self.segments, self.size, self.rank)


def shard_ranges(dim: int, segments: int | list, size: int, rank: int) -> list[tuple[int, int]]:
    """Index ranges of rank ``rank`` of ``size`` along a dimension of length ``dim``.

    Mirrors ``mlx.nn.layers.distributed._shard``: the dimension is first cut into
    segments (e.g. the q, k and v parts of a fused projection), each segment is split
    into ``size`` equal blocks, and a rank keeps its block of every segment.
    """
    if isinstance(segments, int):
        if dim % segments:
            raise ValueError(f"cannot cut a dimension of {dim} into {segments} equal segments")
        bounds = [dim * i // segments for i in range(segments + 1)]
    elif isinstance(segments[0], int):
        bounds = [0, *segments, dim]
    else:
        bounds = [0, *(int(s * dim) for s in segments), dim]

    ranges: list[tuple[int, int]] = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if (hi - lo) % size:
            raise ValueError(f"cannot split a segment of {hi - lo} evenly across {size} ranks")
        step = (hi - lo) // size
        start, stop = lo + rank * step, lo + (rank + 1) * step
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)  # adjacent blocks: one read
        else:
            ranges.append((start, stop))
    return ranges


def sharded_shape(shape: tuple[int, ...], spec: ShardSpec | None) -> tuple[int, ...]:
    """The shape a rank holds of a tensor of ``shape`` sharded by ``spec``."""
    if spec is None:
        return tuple(shape)
    axis = spec.axis % len(shape)
    kept = sum(hi - lo for lo, hi in spec.ranges(shape[axis]))
    return tuple(kept if i == axis else d for i, d in enumerate(shape))


def shard_nbytes(info: TensorInfo, spec: ShardSpec | None) -> int:
    """How many bytes `read_shard` reads for this tensor (for the load progress)."""
    if spec is None:
        return info.nbytes
    axis = spec.axis % len(info.shape)
    dim = info.shape[axis]
    return info.nbytes * sum(stop - start for start, stop in spec.ranges(dim)) // max(1, dim)


def read_shard(reader: SafetensorsReader, info: TensorInfo, spec: ShardSpec | None) -> mx.array:
    """Read this rank's part of one tensor: the whole tensor when ``spec`` is None."""
    if spec is None:
        return reader.read(info)
    axis = spec.axis % len(info.shape)
    return reader.read(info, axis=axis, ranges=spec.ranges(info.shape[axis]))


@dataclass
class _ShardRecord:
    source: mx.array  # the parameter before sharding (kept alive so ids stay unique)
    result: mx.array  # the sharded parameter
    spec: ShardSpec


@contextmanager
def _record_shard_specs() -> Iterator[dict[int, _ShardRecord]]:
    """Record, for every array produced by mlx's shard helpers, how it was sliced.

    ``shard_linear`` and ``shard_inplace`` both go through
    ``mlx.nn.layers.distributed._shard`` with a predicate that returns the axis and
    segments of each parameter. Wrapping it while ``model.shard()`` runs tells us the
    exact slicing of each parameter, including fused projections with segments, which
    the module types alone would not. Maps id(sharded array) -> record.
    """
    original = mlx_distributed._shard
    records: dict[int, _ShardRecord] = {}

    def recording_shard(parameters, sharding_predicate, group=None):
        group_ = group or mx.distributed.init()
        specs: dict[str, Any] = {}

        def predicate(path, weight):
            specs[path] = sharding_predicate(path, weight)
            return specs[path]

        result = original(parameters, predicate, group)
        sources, results = dict(tree_flatten(parameters)), dict(tree_flatten(result))
        for path, s in specs.items():
            if s is None:
                continue  # returned unchanged: recognised as a replicated parameter
            axis, segments = (s, 1) if isinstance(s, int) else s
            out = results[path]
            spec = ShardSpec(axis=axis, segments=segments, size=group_.size(), rank=group_.rank())
            records[id(out)] = _ShardRecord(source=sources[path], result=out, spec=spec)
        return result

    mlx_distributed._shard = recording_shard
    try:
        yield records
    finally:
        mlx_distributed._shard = original


# ---------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------


class _NeedsFullLoad(Exception):
    """The partial-read path cannot load this model; the message says why."""


def _model_classes(config: dict, model_path: Path, trust_remote_code: bool):
    """The Model and ModelArgs classes, as ``mlx_lm.utils.load_model`` picks them."""
    model_file = config.get("model_file")
    if model_file is None:
        return _get_classes(config)
    if not trust_remote_code:
        raise ValueError(
            f"The model at {model_path} requires importing and running a custom module ({model_file!r}) "
            "to build its architecture. Pass trust_remote_code=True if you trust this model."
        )
    spec = importlib.util.spec_from_file_location("custom_model", model_path / model_file)
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    return arch.Model, arch.ModelArgs


def _quantize_like_mlx_lm(model: nn.Module, config: dict, weights: dict[str, mx.array]) -> None:
    """Quantize the model's layers as ``mlx_lm.utils.load_model`` does for mlx-lm checkpoints.

    ``weights`` only needs the checkpoint's names, shapes and dtypes: layers are
    quantized when the checkpoint has their ``scales``, with per-layer settings from
    config["quantization"] or inferred from the shapes.
    """
    quantization = config["quantization"]

    def class_predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = infer_quant_config(path, module, weights)
        if f"{path}.global_scale" in weights and _takes_global_scale(module):
            params["global_scale"] = True
        return params

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=class_predicate,
    )


def _build_unloaded_model(model_path: Path, config: dict, tensors: dict[str, TensorInfo], trust_remote_code: bool):
    """Build the (quantized) model with placeholder parameters, reading no weight data.

    Raises _NeedsFullLoad when the checkpoint cannot be read tensor by tensor into
    the model's parameters.
    """
    if "quantization" not in config:
        text_config = config.get("text_config") or {}
        if (
            config.get("quantization_config")
            or text_config.get("quantization_config")
            or (model_path / "hf_quant_config.json").exists()
        ):
            raise _NeedsFullLoad("the checkpoint uses a quantization_config that mlx-lm converts at load time")
    if config.get("quantize_activations"):
        raise _NeedsFullLoad("the model quantizes activations")
    unsupported = sorted({info.dtype for info in tensors.values() if not is_supported_dtype(info.dtype)})
    if unsupported:
        raise _NeedsFullLoad(f"the checkpoint has tensors of dtype {', '.join(unsupported)}")

    model_class, args_class = _model_classes(config, model_path, trust_remote_code)
    model = model_class(args_class.from_dict(config))

    # Run sanitize on lazy placeholders (never evaluated) with the checkpoint's names,
    # shapes and dtypes. Dropping tensors (e.g. a tied lm_head) is fine; renaming or
    # computing new ones means the files cannot be read straight into parameters.
    placeholders = {name: mx.zeros(info.shape, dtype=mlx_dtype(info.dtype)) for name, info in tensors.items()}
    sanitized = model.sanitize(dict(placeholders)) if hasattr(model, "sanitize") else placeholders
    changed = sorted(name for name, value in sanitized.items() if placeholders.get(name) is not value)
    if changed:
        raise _NeedsFullLoad(
            f"model.sanitize() renames or transforms {len(changed)} checkpoint tensors (e.g. {changed[0]}); "
            "convert the model with mlx_lm.convert to load it faster"
        )

    if config.get("quantization") is not None:
        _quantize_like_mlx_lm(model, config, sanitized)
    model.eval()

    params = dict(tree_flatten(model.parameters()))
    missing, unexpected = sorted(params.keys() - sanitized.keys()), sorted(sanitized.keys() - params.keys())
    if missing or unexpected:
        raise _NeedsFullLoad(
            f"checkpoint names do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    mismatched = [name for name, value in params.items() if tuple(value.shape) != tensors[name].shape]
    if mismatched:
        raise _NeedsFullLoad(f"checkpoint shapes do not match the model (e.g. {mismatched[0]})")
    return model


def _plan_reads(model: nn.Module, group, after_shard=None) -> dict[str, ShardSpec | None]:
    """Shard the model for ``group`` and return, per parameter, how to read it.

    None means read the whole tensor (replicated); a ShardSpec gives the block. Only
    ``group.rank()`` and ``group.size()`` are used here, so the plan can be computed
    with any object that has them (as long as ``model.shard()`` accepts it).
    """
    originals = dict(tree_flatten(model.parameters()))
    if group.size() == 1:
        if after_shard is not None:
            after_shard(model)
            return dict.fromkeys(name for name, _ in tree_flatten(model.parameters()))
        return dict.fromkeys(originals)
    if not hasattr(model, "shard"):
        raise ValueError(f"model {type(model).__module__} does not support tensor parallelism (no shard() method)")

    # Not thread-safe: the recorder patches mlx for the duration of model.shard().
    with _record_shard_specs() as records:
        model.shard(group)
    if after_shard is not None:  # e.g. a pipeline stage drops the layers it does not hold
        after_shard(model)

    plan: dict[str, ShardSpec | None] = {}
    for name, value in tree_flatten(model.parameters()):
        original = originals.get(name)
        if value is original:
            plan[name] = None
            continue
        record = records.get(id(value))
        if record is None or record.source is not original or record.result is not value:
            raise _NeedsFullLoad(f"model.shard() changes {name} in a way the partial reader cannot reproduce")
        if sharded_shape(original.shape, record.spec) != tuple(value.shape):
            raise _NeedsFullLoad(f"unexpected sharded shape for {name}")
        plan[name] = record.spec
    return plan


def _load_partial(
    model_path: Path, config: dict, group, tensors: dict[str, TensorInfo], trust_remote_code: bool, after_shard=None
):
    """Fast path: build, shard, and read only this rank's blocks. Returns (model, bytes_read, plan)."""
    model = _build_unloaded_model(model_path, config, tensors, trust_remote_code)
    plan = _plan_reads(model, group, after_shard)
    progress = LoadProgress(sum(shard_nbytes(tensors[name], spec) for name, spec in plan.items()))
    with SafetensorsReader() as reader:
        weights = []
        for name, spec in plan.items():
            weights.append((name, read_shard(reader, tensors[name], spec)))
            progress.update(reader.bytes_read)
        progress.update(reader.bytes_read, final=True)
        opened = len(reader.files_opened)
    model.load_weights(weights, strict=True)
    logger.debug("read %d tensors from %d files", len(weights), opened)
    return model, reader.bytes_read, plan


def _load_full(model_path: Path, group, trust_remote_code: bool, after_shard=None):
    """Slow path: mlx-lm's lazy full load, then shard. Returns (model, config)."""
    model, config = load_model(model_path, lazy=True, strict=True, trust_remote_code=trust_remote_code)
    if group.size() > 1:
        if not hasattr(model, "shard"):
            raise ValueError(f"model at {model_path} does not support tensor parallelism (no shard() method)")
        model.shard(group)
    if after_shard is not None:
        after_shard(model)
    return model, config


def apply_adapter(model: nn.Module, group, shard_specs: dict, adapter_path: str):
    """Apply one LoRA adapter to every forward of a loaded model (this rank's part under TP).

    The serving engine does not use this: it loads adapters into slots chosen per request
    (engine/adapters.py). Returns the AdapterSet.
    """
    from mlx_cluster.models.lora import AdapterSet, linear_layouts

    adapters = AdapterSet(model, linear_layouts(model, group, shard_specs), group, max_adapters=1)
    adapters.install(1, adapters.read(adapter_path))
    adapters.rows.index = mx.array([1], dtype=mx.int32)  # every row, whatever the batch size
    return adapters


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def load_model_shard(
    path: str,
    group=None,
    *,
    revision: str | None = None,
    adapter_path: str | None = None,
    trust_remote_code: bool = False,
    after_shard=None,
) -> LoadedModel:
    """Load this rank's shard of a model, its tokenizer, config and fingerprint.

    ``group`` is the tensor-parallel group (default: ``mx.distributed.init()``, as in
    mlx). With more than one rank the model is sharded with ``model.shard(group)``
    and each rank reads only its part of each sharded weight. No collective
    operation is performed, so ranks may finish loading at different times.
    ``after_shard(model)``, when given, runs after sharding and before any weight is read
    (a pipeline stage drops the layers it does not hold there).
    """
    started = time.monotonic()
    model_path = resolve_local_path(path, revision)
    if group is None:
        group = mx.distributed.init()
    tp_size = group.size()

    if not (model_path / "config.json").exists():
        raise ValueError(f"model directory {model_path} has no config.json")
    config = load_config(model_path)
    check_tensor_parallel(config, tp_size)
    if adapter_path is not None and not Path(adapter_path).exists():
        raise ValueError(f"adapter path {adapter_path} does not exist")

    tensors = read_checkpoint(model_path)
    if not tensors:
        raise ValueError(f"no safetensors weights found in {model_path}")
    fingerprint = model_fingerprint(model_path, adapter_path)

    model, shard_specs = None, {}
    try:
        model, bytes_read, shard_specs = _load_partial(
            model_path, config, group, tensors, trust_remote_code, after_shard
        )
    except _NeedsFullLoad as e:
        reason = str(e)
    if model is None:
        logger.warning(
            "Not using the partial-read fast path for %s (%s): every rank reads all the weights.", model_path, reason
        )
        model, config = _load_full(model_path, group, trust_remote_code, after_shard)
        # Every rank reads every tensor it keeps (or a slice of) in full.
        bytes_read = sum(info.nbytes for info in tensors.values())

    mx.eval(model.parameters())
    if adapter_path is not None:
        apply_adapter(model, group, shard_specs, adapter_path)

    tokenizer = load_tokenizer(
        model_path,
        {"trust_remote_code": True} if trust_remote_code else None,
        eos_token_ids=config.get("eos_token_id"),
    )
    logger.info(
        "Loaded %s (rank %d of %d): read %.1f MB of weights in %.1f s",
        model_path,
        group.rank(),
        tp_size,
        bytes_read / 1e6,
        time.monotonic() - started,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        path=model_path,
        fingerprint=fingerprint,
        bytes_read=bytes_read,
        shard_specs=shard_specs,
    )
