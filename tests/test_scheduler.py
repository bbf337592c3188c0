"""Pure scheduling and the plan codec, without a model."""

import pytest

from mlx_cluster.engine.plan import (
    NewSequence,
    PlanDecodeError,
    SamplingParams,
    StepPlan,
    decode_plan,
    encode_plan,
)
from mlx_cluster.engine.scheduler import SchedulerInput, schedule


def seq(i, n=4, max_tokens=8):
    return NewSequence(seq_id=i, prompt=tuple(range(n)), params=SamplingParams(max_tokens=max_tokens, seed=i))


def state(**kw):
    base = dict(step=1, waiting=[], running=frozenset(), drop=frozenset(), max_batch_size=4, max_new_per_step=8)
    base.update(kw)
    return SchedulerInput(**base)


def test_admits_in_order_up_to_free_slots():
    d = schedule(state(waiting=[seq(1), seq(2), seq(3)], running=frozenset({10, 11})))
    assert [s.seq_id for s in d.plan.new] == [1, 2]
    assert d.admitted == 2 and not d.plan.idle


def test_drops_free_slots_in_the_same_step():
    d = schedule(state(waiting=[seq(1), seq(2)], running=frozenset({10, 11, 12, 13}), drop=frozenset({10, 99})))
    assert d.plan.drop == (10,)  # 99 is not running: nothing to drop
    assert [s.seq_id for s in d.plan.new] == [1]


def test_idle_and_shutdown_flags():
    assert schedule(state()).plan.idle
    assert not schedule(state(running=frozenset({1}))).plan.idle
    d = schedule(state(shutdown=True))
    assert d.plan.shutdown and not d.plan.idle


def test_kv_budget_stops_at_first_request_that_does_not_fit():
    d = schedule(state(waiting=[seq(1, n=10), seq(2, n=100), seq(3, n=1)], running=frozenset({5}), kv_tokens_free=30))
    assert [s.seq_id for s in d.plan.new] == [1]  # no overtaking by the small one behind
    # An empty batch always admits one request, or nothing could ever run.
    d = schedule(state(waiting=[seq(2, n=100)], kv_tokens_free=30))
    assert d.admitted == 1


def test_max_new_per_step():
    d = schedule(state(waiting=[seq(i) for i in range(5)], max_batch_size=16, max_new_per_step=2))
    assert d.admitted == 2


def test_plan_roundtrip():
    # Floats travel as float32: use values float32 represents exactly.
    params = SamplingParams(
        max_tokens=7,
        seed=2**63 + 5,
        temperature=0.75,
        top_p=0.875,
        top_k=40,
        min_p=0.0625,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.125,
        stop_token_ids=(1, 2),
        logit_bias=((5, 100.0), (9, -3.5)),
        logprobs=True,
        top_logprobs=3,
    )
    plan = StepPlan(
        step=42,
        new=(NewSequence(7, (1, 2, 3) * 100, params, (b"a" * 16,), (b"b" * 16, b"c" * 16)),),
        drop=(3, 4),
        flags=1,
        digest=0xDEADBEEF,
    )
    assert decode_plan(encode_plan(plan)) == plan
    empty = StepPlan(step=1)
    assert decode_plan(encode_plan(empty)) == empty
    assert len(encode_plan(empty)) < 64  # a steady decode step fits the inline frame


def test_decoder_rejects_garbage_without_crashing():
    good = encode_plan(StepPlan(step=1, new=(seq(1),)))
    with pytest.raises(PlanDecodeError, match="truncated"):
        decode_plan(good[:-3])
    with pytest.raises(PlanDecodeError, match="trailing"):
        decode_plan(good + b"x")
    with pytest.raises(PlanDecodeError, match="version"):
        decode_plan(b"\x09\x00" + good[2:])
    # A huge count must be refused before anything is allocated.
    bad = bytearray(encode_plan(StepPlan(step=1)))
    bad[16:20] = (10**6).to_bytes(4, "little")
    with pytest.raises(PlanDecodeError, match="limit"):
        decode_plan(bytes(bad))
    import random

    rng = random.Random(0)
    for _ in range(2000):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        try:
            decode_plan(blob)
        except PlanDecodeError:
            pass
