"""Micro-batches in flight (engine/microbatch.py) without a cluster.

One process cannot run two stages, so the lanes' bookkeeping runs on stage 0 of a 2-stage
layout (the other stage's hand-offs read as zeros): every sequence gets exactly its tokens,
lanes stay balanced, a drop mid-flight removes the row everywhere. Token identity with one rank
is checked on real clusters (tests/test_pipeline.py, tests/test_pipeline_checkpoints.py).
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_cluster.engine.decode import Batcher
from mlx_cluster.engine.executor import Executor
from mlx_cluster.engine.microbatch import MicroBatches, split_batch
from mlx_cluster.engine.plan import NewSequence, SamplingParams, StepPlan
from mlx_cluster.models.pipeline import Layout, wire_stage

VOCAB = 97


def tiny_llama():
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def stage_zero_executor() -> Executor:
    model = tiny_llama()
    wire_stage(model, Layout(1, 2, ((0, 1), (1, 2))), rank=0, group=mx.distributed.init())
    return Executor(model, vocab_size=VOCAB, max_batch_size=8, prefill_batch_size=8, prefill_chunk=64, microbatches=2)


def seq(seq_id: int, max_tokens: int, prompt_len: int = 5) -> NewSequence:
    prompt = tuple((seq_id * 7 + i) % VOCAB for i in range(prompt_len))
    return NewSequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, seed=seq_id, temperature=0.0))


def run(executor: Executor, plans: dict[int, StepPlan], steps: int = 200):
    tokens: dict[int, list] = {}
    lane_sizes = []
    batches = executor.generator._generation_batch
    for step in range(steps):
        executor.apply(plans.get(step, StepPlan(step=step)))
        for out in executor.step():
            tokens.setdefault(out.seq_id, []).append(out)
        lane_sizes.append([len(lane) for lane in batches.lanes])
        if not executor.active and step > max(plans):
            break
    return tokens, lane_sizes


def test_every_sequence_gets_its_tokens_and_lanes_stay_balanced():
    executor = stage_zero_executor()
    assert isinstance(executor.generator._generation_batch, MicroBatches)
    lengths = {1: 3, 2: 5, 3: 8, 4: 8, 5: 2}
    plans = {0: StepPlan(step=0, new=tuple(seq(i, n) for i, n in lengths.items()))}
    plans[6] = StepPlan(step=6, new=(seq(6, 4, prompt_len=9),))  # joins while lanes are in flight
    tokens, lane_sizes = run(executor, plans)
    assert {i: len(t) for i, t in tokens.items()} == {**lengths, 6: 4}
    assert all(
        t[-1].finish_reason == "length" and all(o.finish_reason is None for o in t[:-1]) for t in tokens.values()
    )
    # The five prompts arrive together and are shared out as the lanes pass stage 0.
    first = next(sizes for sizes in lane_sizes if sum(sizes) == 5)
    assert sorted(first) == [2, 3]
    assert not executor.active and len(executor.generator._generation_batch) == 0


def test_a_drop_mid_flight_removes_the_row_and_its_hidden_state():
    executor = stage_zero_executor()
    plans = {0: StepPlan(step=0, new=tuple(seq(i, 30) for i in range(1, 5)))}
    plans[5] = StepPlan(step=5, drop=(2, 3))  # one row per lane: one lane is in flight
    tokens, _ = run(executor, plans)
    assert len(tokens[1]) == len(tokens[4]) == 30
    assert len(tokens[2]) < 30 and len(tokens[3]) < 30
    assert executor.stats.dropped_sequences == 2


def test_a_row_in_flight_offers_its_tokens_up_to_the_one_every_stage_holds():
    executor = stage_zero_executor()
    executor.apply(StepPlan(step=0, new=(seq(1, 10), seq(2, 10))))
    for _ in range(4):
        executor.step()
    batches = executor.generator._generation_batch
    in_flight = [lane for lane in batches.lanes if lane.in_flight]
    assert len(in_flight) == 1 and len(in_flight[0]) == 1
    lane = in_flight[0]
    offered = batches.tokens[batches.uids.index(lane.uids[0])]
    assert offered == lane.tokens[0][:-1]  # the latest token is in stage 0's cache only


def generation_batch(rows: int = 4):
    """A 4-row generation batch of an unpipelined model, just prefilled."""
    from mlx_cluster.engine.decode import RowSampling

    batcher = Batcher(tiny_llama(), completion_batch_size=8, prefill_batch_size=8, prefill_step_size=64)
    seqs = [seq(i, 9) for i in range(rows)]
    batcher.insert(
        [list(s.prompt) for s in seqs], max_tokens=[9] * rows, samplers=[RowSampling(s.params, VOCAB) for s in seqs]
    )
    while len(batcher._generation_batch) < rows:
        batcher.next()
    return batcher._generation_batch


def generate(batch, steps: int = 6) -> dict[int, list[int]]:
    tokens = {uid: [] for uid in batch.uids}
    for _ in range(steps):
        for r in batch.next():
            tokens[r.uid].append(r.token)
    return tokens


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_split_batch_generates_what_the_whole_one_would(n):
    whole = generate(generation_batch())
    head, rest = split_batch(generation_batch(), n)
    assert len(head) == n and len(rest) == 4 - n
    assert {**generate(head), **generate(rest)} == whole


def test_prefill_pieces_fill_stage_zero_caches_as_one_forward_pass_would():
    from mlx_cluster.engine.microbatch import PipelinedPrefill
    from mlx_cluster.models.pipeline import stage_edges

    model = tiny_llama()
    wire_stage(model, Layout(1, 2, ((0, 1), (1, 2))), rank=0, group=mx.distributed.init())
    tokens = mx.array([[(r * 13 + i) % VOCAB for i in range(40)] for r in range(3)])
    plain, pieces = make_prompt_cache(model), make_prompt_cache(model)
    model(tokens, cache=plain)
    edges = stage_edges(model)
    PipelinedPrefill(model, edges)(tokens, cache=pieces)  # 3 pieces of 16, 16 and 8 tokens
    assert edges.tick is None
    for a, b in zip(plain, pieces):
        assert a.offset == b.offset == 40
        assert mx.allclose(a.keys[..., :40, :], b.keys[..., :40, :], atol=1e-5).item()
        assert mx.allclose(a.values[..., :40, :], b.values[..., :40, :], atol=1e-5).item()
