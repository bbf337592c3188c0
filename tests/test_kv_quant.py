"""Quantized live KV (`cache.kv_bits` / `cache.live_kv_bits`, engine/kv_quant.py).

Equivalence: the engine's quantized batch gives, for each sequence, the greedy tokens of mlx-lm's
own single stream with a `QuantizedKVCache` from the first token (quantized as written, every
attention reading the quantized cache; with contiguous reads, the CUDA mode, that stream
attending its cache dequantized). mlx-lm's `generate(kv_bits=...)` is not the reference:
it attends its first prefill chunk at full precision and quantizes after it.

On random-weight checkpoints of real architectures (tests/test_checkpoints.py): one rank in
process, two ranks over HTTP (the digest check holds with concurrent rows joining and
leaving), models that cannot use it (MLA, sinks + rotating caches), the memory it takes from
the cache's own nbytes, and prefix-cache blocks stored from a quantized cache and restored.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest
from mlx_lm.models import base as mlx_lm_base
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, make_prompt_cache

from mlx_cluster.cache.testing import cache_config, generate, load_tiny, make_executor, random_prompt
from mlx_cluster.config import CacheSection
from mlx_cluster.engine import cuda_kv_attention, kv_quant
from mlx_cluster.engine.kv_quant import (
    BatchQuantizedKVCache,
    LiveKV,
    QuantizedSequenceCache,
    kv_budget,
    resolve_live_kv,
)
from tests.cluster import Cluster
from tests.test_checkpoints import MIN_MARGIN, SPECS, build_checkpoints

pytestmark = pytest.mark.slow

ARCHS = ("llama", "qwen3_moe")
MAX_TOKENS = 10
# In bfloat16 these random models' logits differ by ~1.5 between one and two ranks (partial
# sums in another order), as much as 8-bit KV moves them, so TP=1 and TP=2 identity is checked
# on float32 copies of the same checkpoints; the one-rank check runs on both.
F32_MIN_MARGIN = 0.02
F32 = {f"{arch}-f32": dataclasses.replace(SPECS[arch], dtype="float32") for arch in ARCHS}
# head_dim 128 with 2 query heads per KV head: the shape the CUDA decode kernel computes
HD128 = dataclasses.replace(
    SPECS["llama"],
    config={**SPECS["llama"].config, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128},
)


# ---------------------------------------------------------------------------
# The cache itself, against mlx-lm's BatchKVCache (no model)
# ---------------------------------------------------------------------------


def _kv(rows: int, tokens: int, seed: int, heads: int = 2, dim: int = 64):
    k = mx.random.normal((rows, heads, tokens, dim), key=mx.random.key(seed)).astype(mx.bfloat16)
    return k, (k * 0.5 + 1).astype(mx.bfloat16)


def _dq(parts, live: LiveKV):
    return mx.dequantize(*parts, group_size=live.group_size, bits=live.bits)


def _same(q: BatchQuantizedKVCache, ref: BatchKVCache, live: LiveKV) -> None:
    """`q` holds, row by row and position by position, the quantized form of `ref`."""
    assert q._idx == ref._idx
    assert q.left_padding.tolist() == ref.left_padding.tolist() and q.offset.tolist() == ref.offset.tolist()
    qk, qv = q.keys_and_values()
    rk, rv = ref.keys_and_values()
    for got, want in ((qk, rk), (qv, rv)):
        want_q = _dq(mx.quantize(want, group_size=live.group_size, bits=live.bits), live)
        assert mx.array_equal(_dq(got, live), want_q).item()


def test_batch_cache_operations_mirror_mlx_lm_batch_cache():
    live = LiveKV(8, 64)
    # merge two sequences of different lengths (one empty), prefill right-padded, then finalize
    seqs = [_kv(1, n, seed=n) for n in (5, 9)]
    singles_q, singles = [], []
    for k, v in seqs:
        qc, c = QuantizedSequenceCache(live.group_size, live.bits), KVCache()
        qc.update_and_fetch(k, v)
        c.update_and_fetch(k, v)
        singles_q.append(qc)
        singles.append(c)
    singles_q.append(QuantizedSequenceCache(live.group_size, live.bits))
    singles.append(KVCache())
    q, ref = BatchQuantizedKVCache.merge(singles_q), BatchKVCache.merge(singles)
    _same(q, ref, live)
    for c in (q, ref):
        c.prepare(lengths=[3, 1, 2], right_padding=[0, 2, 1])
    k, v = _kv(3, 3, seed=3)
    q.update_and_fetch(k, v)
    ref.update_and_fetch(k, v)
    q.finalize()
    ref.finalize()
    _same(q, ref, live)
    # decode steps, then a joining batch, a filter, an extract and a trim
    for step in range(3):
        k, v = _kv(3, 1, seed=10 + step)
        q.update_and_fetch(k, v)
        ref.update_and_fetch(k, v)
    joining_q, joining = BatchQuantizedKVCache.merge(singles_q[:1]), BatchKVCache.merge(singles[:1])
    q.extend(joining_q)
    ref.extend(joining)
    _same(q, ref, live)
    q.filter([1, 3])
    ref.filter([1, 3])
    _same(q, ref, live)
    one_q, one = q.extract(1), ref.extract(1)
    assert one_q.offset == one.offset
    assert mx.array_equal(_dq(one_q.keys, live), _dq(mx.quantize(one.keys, group_size=64, bits=8), live)).item()
    assert q.trim(2) == ref.trim(2) == 2
    _same(q, ref, live)
    assert q.make_mask(1).tolist() == ref.make_mask(1).tolist()


def test_whole_allocation_reads_attend_like_the_view():
    """With contiguous_reads (mlx's CUDA quantized_matmul refuses strided views), attention reads
    the whole allocation with the unused room masked: the same attention output as the view at
    every update, through prefill, decode, a filter that drops shared left padding, and a trim."""
    live = LiveKV(8, 64)
    heads, dim = 2, 64

    def merged(contiguous: bool) -> BatchQuantizedKVCache:
        singles = []
        for n in (5, 9):
            c = QuantizedSequenceCache(live.group_size, live.bits)
            c.update_and_fetch(*_kv(1, n, seed=n))
            singles.append(c)
        batch = BatchQuantizedKVCache.merge(singles)
        batch.contiguous_reads = contiguous
        return batch

    view, whole = merged(False), merged(True)

    def attend(n: int, seed: int) -> None:
        rows = view.offset.shape[0]
        k, v = _kv(rows, n, seed=seed)
        q = mx.random.normal((rows, heads * 2, n, dim), key=mx.random.key(seed + 1)).astype(mx.bfloat16)
        outs = []
        for c in (view, whole):
            mask = c.make_mask(n)
            keys, values = c.update_and_fetch(k, v)
            assert mask.shape[-1] == keys[0].shape[2]
            # mlx-lm's own quantized attention on both (the whole allocation is read otherwise when
            # served: the next test); a copy of q: it scales its queries in place
            mlx_lm_attention = kv_quant._mlx_lm_attention
            outs.append(mlx_lm_attention(q * 1, tuple(keys), tuple(values), 0.125, mask, 64, 8))
            if c is whole:  # read whole, the room past the last token included
                assert keys[0].shape[2] == c.keys[0].shape[2] > c._idx
        assert mx.allclose(outs[0].astype(mx.float32), outs[1].astype(mx.float32), atol=1e-3).item()

    attend(3, seed=20)  # a prefill chunk over the merged rows
    for step in range(3):
        attend(1, seed=30 + step)
    for c in (view, whole):
        c.filter([0])  # the shorter row alone: its left padding is dropped (a strided view, copied)
    attend(1, seed=40)
    for c in (view, whole):
        c.trim(2)  # rolled back, as speculation does: the trimmed tokens stay in the room, masked
    attend(2, seed=50)
    attend(260, seed=60)  # grows the allocation inside the update


def test_whole_allocations_are_never_read_through_quantized_products():
    """What a contiguous-reads cache (the CUDA mode) hands attention is marked, and mlx-lm's models
    then attend it dequantized through the fused SDPA kernel (on CUDA a decode step takes one
    kernel: the next test), never through mlx's quantized products, which compute grouped-query
    attention wrongly on CUDA; plain views keep mlx-lm's quantized attention."""
    live = LiveKV(8, 64)
    batch = BatchQuantizedKVCache([0, 3], live.group_size, live.bits, contiguous_reads=True)
    k, v = _kv(2, 9, seed=3)
    mask = batch.make_mask(9)
    keys, values = batch.update_and_fetch(k, v)
    assert isinstance(keys, kv_quant.Allocation) and isinstance(values, kv_quant.Allocation)
    q = mx.random.normal((2, 4, 9, 64), key=mx.random.key(4)).astype(mx.bfloat16)
    # as mlx-lm's models call it: the cache has `bits`, so its quantized attention is asked
    got = mlx_lm_base.scaled_dot_product_attention(q, keys, values, cache=batch, scale=0.125, mask=mask)
    want = mx.fast.scaled_dot_product_attention(q, _dq(keys, live), _dq(values, live), scale=0.125, mask=mask)
    assert mx.array_equal(got, want).item()
    plain_k, plain_v = tuple(keys), tuple(values)
    got = mlx_lm_base.scaled_dot_product_attention(q * 1, plain_k, plain_v, cache=batch, scale=0.125, mask=mask)
    want = kv_quant._mlx_lm_attention(q * 1, plain_k, plain_v, 0.125, mask, 64, 8)
    assert mx.array_equal(got, want).item()


@pytest.mark.parametrize(("bits", "ratio"), [(8, (1 + 4 / 64) / 2), (4, (0.5 + 4 / 64) / 2)])
def test_bytes_per_token_from_nbytes(bits, ratio):
    """bfloat16 KV, head_dim 128, group 64: 8 bits take 1.0625 bytes per value (scales and biases
    included) against 2, i.e. about half; 4 bits about 28%."""
    live = LiveKV(bits, 64)
    q, full = BatchQuantizedKVCache([0, 0], live.group_size, live.bits), BatchKVCache([0, 0])
    k, v = _kv(2, 256, seed=1, heads=4, dim=128)  # one full allocation step: nbytes is exact
    q.update_and_fetch(k, v)
    full.update_and_fetch(k, v)
    assert q.nbytes / full.nbytes == pytest.approx(ratio)


# ---------------------------------------------------------------------------
# Real architectures, one rank in process
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_path):
    specs = {name: SPECS[name] for name in (*ARCHS, "deepseek_v3", "gpt_oss")} | F32 | {"llama-hd128": HD128}
    return build_checkpoints(tmp_path_factory, tiny_model_path, specs, "kvq_checkpoints")


@pytest.fixture(scope="module")
def prompts():
    # Different lengths: rows are left-padded, prefill is right-padded and chunked (chunk 32).
    # Seeds where both references lead by MIN_MARGIN at every step (no near-ties).
    return [random_prompt(n, seed=seed, vocab=2000) for n, seed in ((7, 30), (45, 82), (7, 20))]


def _load(path):
    from mlx_cluster.models.fuse import fuse_projections
    from mlx_cluster.models.loader import load_model_shard

    loaded = load_model_shard(str(path), mx.distributed.init())
    fuse_projections(loaded.model)  # as the engine does
    return loaded


def _reference(loaded, prompt, live: LiveKV, min_margin: float, dequantized: bool = False) -> list[int]:
    """mlx-lm's single stream on a QuantizedKVCache from the first token, greedy, with clear margins;
    `dequantized`: each attention reads that cache dequantized, through the fused SDPA kernel (how
    contiguous-reads batches attend: kv_quant's module docstring)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    cache = [QuantizedKVCache(group_size=live.group_size, bits=live.bits) for _ in make_prompt_cache(loaded.model)]
    if dequantized:
        cache = [kv_quant.DequantizedReads(c) for c in cache]
    tokens, margins = [], []
    for r in stream_generate(
        loaded.model,
        loaded.tokenizer,
        prompt,
        max_tokens=MAX_TOKENS,
        sampler=make_sampler(temp=0.0),
        prompt_cache=cache,
    ):
        tokens.append(r.token)
        top2 = mx.topk(r.logprobs.astype(mx.float32), 2)
        margins.append((mx.max(top2) - mx.min(top2)).item())
    assert min(margins) >= min_margin, f"near-tie in the reference, pick another prompt: {margins}"
    return tokens


@pytest.fixture(scope="module")
def references(checkpoints, prompts):
    out = {}
    for arch in (*ARCHS, *F32):
        loaded = _load(checkpoints[arch])
        live = resolve_live_kv(CacheSection(kv_bits=8), loaded.model)
        assert live == LiveKV(8, 32)  # head_dim 32: the group follows it down from 64
        # float32 logits move by ~1e-5 between one and two ranks: a smaller lead is decisive.
        min_margin = F32_MIN_MARGIN if arch in F32 else MIN_MARGIN
        out[arch] = [_reference(loaded, p, live, min_margin) for p in prompts]
    return out


@pytest.fixture(scope="module")
def dequantized_prompts():
    # Seeds where the dequantized reference leads by MIN_MARGIN at every step (`prompts` has a tie).
    return [random_prompt(n, seed=seed, vocab=2000) for n, seed in ((7, 11), (45, 15), (7, 15))]


@pytest.fixture(scope="module")
def dequantized_references(checkpoints, dequantized_prompts):
    """The first architecture's references for contiguous-reads batches (the CUDA mode)."""
    loaded = _load(checkpoints[ARCHS[0]])
    return [_reference(loaded, p, LiveKV(8, 32), MIN_MARGIN, dequantized=True) for p in dequantized_prompts]


@pytest.mark.parametrize("arch", [*ARCHS, *F32])
def test_batch_matches_single_stream_quantized_cache(arch, checkpoints, prompts, references, tmp_path):
    loaded = _load(checkpoints[arch])
    live = resolve_live_kv(CacheSection(kv_bits=8), loaded.model)
    ex = make_executor(loaded, cache_config(tmp_path, block_size=16, kv_bits=8), prefill_chunk=32, live_kv=live)
    results = generate(ex, prompts, MAX_TOKENS)  # one batch, three lengths
    assert [r.tokens for r in results] == references[arch]
    # Blocks stored from the quantized live cache restore into one losslessly: same tokens.
    stats = ex.prefix_cache.stats()
    assert stats.stored_blocks > 0 and stats.ram.quant_bytes_saved > 0
    again = generate(ex, prompts, MAX_TOKENS)
    assert [r.cached_tokens for r in again] == [0, 32, 0]
    assert [r.tokens for r in again] == references[arch]
    stored = next(iter(ex.prefix_cache.ram.items()))[1]
    assert set(stored.arrays) == {"k.q", "k.s", "k.b", "v.q", "v.s", "v.b"}


def test_cpu_prefill_reads_the_cache_dequantized(checkpoints, prompts, references, tmp_path, monkeypatch):
    """On a CPU, prefill chunks attend through kv_quant.DequantizedReads (fused SDPA on the
    dequantized cache, 4x faster there than two quantized_matmuls) and decode steps read the
    quantized cache; the tokens are still those of mlx-lm's quantized single stream, and what is
    stored stays quantized."""
    widths = []
    fetch = kv_quant.DequantizedReads.update_and_fetch

    def counted(self, keys, values):
        widths.append(keys.shape[2])
        out = fetch(self, keys, values)
        assert not hasattr(self, "bits") and all(isinstance(x, mx.array) for x in out)
        return out

    monkeypatch.setattr(kv_quant.DequantizedReads, "update_and_fetch", counted)
    loaded = _load(checkpoints["llama"])
    live = resolve_live_kv(CacheSection(kv_bits=8), loaded.model)
    ex = make_executor(loaded, cache_config(tmp_path, block_size=16, kv_bits=8), prefill_chunk=32, live_kv=live)
    results = generate(ex, prompts, MAX_TOKENS)
    assert [r.tokens for r in results] == references["llama"]
    assert widths and min(widths) > 1  # prefill chunks only, every layer of each
    assert len(widths) % len(loaded.model.layers) == 0
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # a GPU keeps the quantized products
    caches = [kv_quant.BatchQuantizedKVCache([0], 32, 8)]
    assert kv_quant.prefill_reads(caches) == caches


def test_a_backend_that_refuses_strided_views_gets_contiguous_reads(
    checkpoints, dequantized_prompts, dequantized_references, tmp_path, monkeypatch, caplog
):
    """mlx's CUDA quantized_matmul (0.32) has no kernel for the strided view the cache hands
    attention. Simulated here (the CPU multiplies views): the probe fails for strided reads and
    passes for contiguous ones, so start-up picks contiguous reads and says so; the whole
    allocation is then attended dequantized (never through quantized products), so the tokens are
    mlx-lm's quantized stream attended dequantized, restored prefixes included."""
    arch = ARCHS[0]
    loaded = _load(checkpoints[arch])
    probed = []

    def cuda_like(model, live):
        probed.append(live.contiguous_reads)
        return None if live.contiguous_reads else "RuntimeError: [quantized_matmul] No implementation for problem shape"

    monkeypatch.setattr(kv_quant, "attention_error", cuda_like)
    with caplog.at_level(logging.INFO, logger="mlx_cluster.engine.kv_quant"):
        live = resolve_live_kv(CacheSection(kv_bits=8), loaded.model)
    assert live == LiveKV(8, 32, contiguous_reads=True) and probed == [False, True]
    assert "needs contiguous operands" in caplog.text and "full precision" not in caplog.text
    monkeypatch.undo()
    assert BatchQuantizedKVCache.merge(live.empty_caches(2)).contiguous_reads  # the batch keeps the mode

    ex = make_executor(loaded, cache_config(tmp_path, block_size=16, kv_bits=8), prefill_chunk=32, live_kv=live)
    assert [r.tokens for r in generate(ex, dequantized_prompts, MAX_TOKENS)] == dequantized_references
    again = generate(ex, dequantized_prompts, MAX_TOKENS)  # restored blocks keep the mode
    assert [r.cached_tokens for r in again] == [0, 32, 0] and [r.tokens for r in again] == dequantized_references


def test_cuda_decode_steps_take_the_one_kernel_attention(
    checkpoints, dequantized_prompts, dequantized_references, tmp_path, monkeypatch
):
    """On CUDA a contiguous-reads batch's decode steps attend through cuda_kv_attention.attend
    (its numbers are checked on the device: tests/test_cuda_kv_attention.py); prefill chunks read
    the cache dequantized. Simulated here: the kernel is available, fits one-query steps, and is
    stood in for by the dequantized fused SDPA it must equal. Tokens: mlx-lm's quantized stream
    attended dequantized."""
    loaded = _load(checkpoints[ARCHS[0]])
    widths = []

    def stand_in(queries, *args):
        widths.append(queries.shape[2])
        return kv_quant.dequantized_attention(queries, *args)

    monkeypatch.setattr(cuda_kv_attention, "available", lambda: True)
    monkeypatch.setattr(cuda_kv_attention, "fits", lambda q, keys, mask, group, bits: q.shape[2] == 1)
    monkeypatch.setattr(cuda_kv_attention, "attend", stand_in)
    live = LiveKV(8, 32, contiguous_reads=True)
    ex = make_executor(loaded, cache_config(tmp_path, block_size=16, kv_bits=8), prefill_chunk=32, live_kv=live)
    assert [r.tokens for r in generate(ex, dequantized_prompts, MAX_TOKENS)] == dequantized_references
    layers = len(loaded.model.layers)
    assert widths and set(widths) == {1} and len(widths) % layers == 0  # every layer of every decode step


def test_engine_decode_steps_are_what_the_cuda_kernel_computes(checkpoints, prompts, tmp_path, monkeypatch):
    """With head_dim 128 and 8 bits, every decode step's attention the engine builds (rows of
    different lengths joining one batch: left padding, masked room) passes the kernel's real
    `fits`, so on CUDA none falls back to the slower dequantized read; prefill chunks never reach
    it. Only the kernel call is stood in for (the device checks its numbers)."""
    loaded = _load(checkpoints["llama-hd128"])
    asked, real_fits = [], cuda_kv_attention.fits

    def recorded_fits(queries, q_keys, mask, group_size, bits):
        asked.append((queries.shape[2], real_fits(queries, q_keys, mask, group_size, bits)))
        return asked[-1][1]

    monkeypatch.setattr(cuda_kv_attention, "available", lambda: True)
    monkeypatch.setattr(cuda_kv_attention, "fits", recorded_fits)
    monkeypatch.setattr(cuda_kv_attention, "attend", kv_quant.dequantized_attention)
    live = LiveKV(8, 64, contiguous_reads=True)
    ex = make_executor(loaded, cache_config(tmp_path, block_size=16, kv_bits=8), prefill_chunk=32, live_kv=live)
    generate(ex, prompts, 4)
    decode = [fit for width, fit in asked if width == 1]
    assert decode and all(decode)
    assert all(not fit for width, fit in asked if width > 1)


def test_models_that_cannot_use_it(checkpoints, caplog):
    """auto falls back with a warning; an explicit live_kv_bits is a start-up error."""
    for arch, why in (("deepseek_v3", "cannot read a quantized cache"), ("gpt_oss", "RotatingKVCache")):
        loaded = _load(checkpoints[arch])
        with caplog.at_level(logging.WARNING, logger="mlx_cluster.engine.kv_quant"):
            assert resolve_live_kv(CacheSection(kv_bits=8, kv_group_size=32), loaded.model) is None
        assert why in caplog.text and "cache.kv_bits=8 still applies to stored prefix blocks" in caplog.text
        caplog.clear()
        assert kv_budget(1000, loaded.model, None).tokens == 1000  # full precision: as configured
        with pytest.raises(ValueError, match=r"cache.live_kv_bits=8: .*" + why):
            resolve_live_kv(CacheSection(live_kv_bits=8, kv_group_size=32), loaded.model)


def test_budget_counts_quantized_tokens(models_dir):
    """max_kv_tokens is memory sized in full-precision tokens: a quantized cache fits more."""
    loaded = load_tiny(models_dir)  # float32, 4 layers, 4 KV heads, head_dim 32
    full = kv_budget(1000, loaded.model, None)
    assert full.tokens == 1000 and full.bytes_per_token == 4 * 2 * 4 * 32 * 4
    q8 = kv_budget(1000, loaded.model, LiveKV(8, 32))
    assert q8.bytes_per_token == 4 * 2 * 4 * (32 + 2 * 4)  # int8 values, one fp32 scale and bias per 32
    assert q8.tokens == 1000 * full.bytes_per_token // q8.bytes_per_token == 3200
    assert resolve_live_kv(CacheSection(kv_bits=8, live_kv_bits=None), loaded.model) is None


# ---------------------------------------------------------------------------
# Two ranks, real processes, over HTTP
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(F32))
def test_two_ranks_match_one_rank(arch, checkpoints, prompts, references, tmp_path, models_dir):
    """Each rank quantizes its own heads; concurrent rows join and leave; the digest holds."""
    config = {
        "model": {"path": str(checkpoints[arch])},
        "cache": {"kv_bits": 8, "block_size": 16},
        "scheduler": {"prefill_chunk_tokens": 32, "max_kv_tokens": 4096},
    }
    cluster = Cluster(tmp_path, ranks=2, models_dir=models_dir, config=config)

    def complete(prompt):
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        return cluster.post("/v1/completions", body)

    try:
        cluster.start()
        with ThreadPoolExecutor(len(prompts)) as pool:
            responses = list(pool.map(complete, prompts))
        again = complete(prompts[-1])  # a prefix-cache hit on both ranks
    finally:
        cluster.stop()
    log = cluster.output()
    assert log.count("live KV cache on rank") == 2 and "8-bit (group 32)" in log
    assert "differs from rank 0" not in log
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(checkpoints[arch])
    for response, want in zip([*responses, again], [*references[arch], references[arch][-1]]):
        assert response.status_code == 200, response.text
        # Each token's text (see test_checkpoints.silent_tokens): equal texts, equal token ids.
        assert response.json()["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in want]


def test_config_keys():
    from pydantic import ValidationError

    assert CacheSection().live_kv_bits == "auto"
    assert CacheSection(kv_bits=8, live_kv_bits=None).live_kv_bits is None
    with pytest.raises(ValidationError, match="live_kv_bits"):
        CacheSection(live_kv_bits=3)
