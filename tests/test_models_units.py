"""Several models (engine/models.py), without a model: config rules, the plan's model fields, and
rank 0's decisions (which model runs, what loads and unloads) with fake frontends and executors."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from mlx_cluster.config import ConfigError, config_from_json, dump_config, parse_config
from mlx_cluster.engine.models import ModelLane, ModelSet
from mlx_cluster.engine.plan import (
    FLAG_IDLE,
    MODEL_LOAD,
    MODEL_UNLOAD,
    ModelOp,
    PlanDecodeError,
    StepPlan,
    decode_plan,
    encode_plan,
)

GIB = 1 << 30
TWO = {"models": [{"name": "a", "path": "builtin:tiny"}, {"name": "b", "path": "/models/b"}]}


# ---- config ---------------------------------------------------------------------------------
def test_models_config_sets_model_to_the_start_up_model_and_survives_the_trip_to_the_ranks():
    cfg = parse_config({**TWO, "idle_unload_s": 30})
    assert cfg.model.name == "a" and cfg.model.path == "builtin:tiny"
    again = config_from_json(dump_config(cfg))
    assert again.model.name == "a" and [m.name for m in again.models] == ["a", "b"] and again.idle_unload_s == 30
    preload = parse_config({"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "y", "preload": True}]})
    assert preload.model.name == "b"
    single = parse_config({"model": {"path": "builtin:tiny"}})
    assert single.models is None and dump_config(single) == single.model_dump_json()


@pytest.mark.parametrize(
    "data, words",
    [
        ({**TWO, "model": {"path": "x"}}, "give either model: (one model) or models: (several), not both"),
        ({"idle_unload_s": 5}, "idle_unload_s only applies to several models"),
        ({"models": []}, "models: must list at least one model"),
        ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "the name 'a' is used twice"),
        ({"models": [{"path": "x"}]}, "models.0.name"),
        ({**TWO, "adapters": [{"name": "z", "path": "p"}]}, "LoRA adapters are not supported with models:"),
        ({**TWO, "speculative": {"method": "ngram"}}, "speculative: is not supported with models:"),
        ({**TWO, "cluster": {"parallel": "auto"}}, "cluster.parallel: models: runs every model tensor parallel"),
        ({**TWO, "idle_unload_s": 0}, "idle_unload_s"),
    ],
)
def test_models_config_errors_name_the_key_and_the_fix(data, words):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert words in str(e.value)
    assert "(got {'models'" not in str(e.value)  # whole-file checks do not echo the whole file


# ---- the plan -------------------------------------------------------------------------------
def test_plan_carries_the_model_and_its_operations():
    plan = StepPlan(step=3, model=2, model_ops=(ModelOp(MODEL_UNLOAD, 1), ModelOp(MODEL_LOAD, 2)))
    assert decode_plan(encode_plan(plan)) == plan
    assert decode_plan(encode_plan(StepPlan(step=1))).model_ops == ()
    bad = bytearray(encode_plan(StepPlan(step=1, model_ops=(ModelOp(MODEL_LOAD, 0),))))
    bad[-3] = 9  # the op's kind
    with pytest.raises(PlanDecodeError, match="not load or unload"):
        decode_plan(bytes(bad))


# ---- rank 0's decisions and every rank's operations -----------------------------------------
class FakeFrontend:
    def __init__(self, work=False):
        self.work, self.failed, self.cache, self.queue_depth = work, [], None, 0

    @property
    def has_work(self):
        return self.work

    def has_work_threadsafe(self):
        return self.work

    def drain_inbox(self):
        pass

    def next_plan(self, step, digest):
        return StepPlan(step=step, digest=digest, flags=0 if self.work else FLAG_IDLE)

    def fail_all(self, message, status=503, code="engine_unavailable"):
        self.failed.append((message, status, code))
        self.work = False

    def attach_cache(self, cache, tokens):
        self.cache = ("attached", tokens)

    def detach_cache(self):
        self.cache = None


class FakeExecutor:
    digest, active = 0, 0

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def served():
    return SimpleNamespace(executor=FakeExecutor(), prefix_cache=None, budget=SimpleNamespace(tokens=100))


def make_set(n=3, loaded=(0,), need=None, free=8 * GIB, idle_unload_s=None, read=None):
    lanes = []
    for i in range(n):
        entry = SimpleNamespace(name="abcdefg"[i], path=f"/m/{i}")
        lane = ModelLane(i, entry, None, pinned=i == 0, frontend=FakeFrontend())
        lane.served = served() if i in loaded else None
        lane.need_bytes = GIB
        lanes.append(lane)
    memory = {"free": free}
    models = ModelSet(
        lanes,
        read=read or (lambda lane: "read"),
        serve=lambda lane, _read: served(),
        fit=lambda lane: ((need or {}).get(lane.name, GIB), memory["free"]),
        agree_min=list,
        idle_unload_s=idle_unload_s,
        world_size=2,
    )
    return models, lanes, memory


def run(models, step):
    plan, lane = models.next_plan(step)
    models.apply(plan)
    return plan, lane


def test_loaded_models_with_work_take_turns_and_reload_nothing():
    models, lanes, _ = make_set(2, loaded=(0, 1))
    lanes[0].frontend.work = lanes[1].frontend.work = True
    ran = [run(models, step)[0] for step in range(4)]
    assert [p.model for p in ran] == [1, 0, 1, 0]
    assert all(p.model_ops == () and not p.idle for p in ran)
    lanes[1].frontend.work = False
    assert [run(models, step)[0].model for step in range(4, 7)] == [0, 0, 0]


def test_a_request_for_an_unloaded_model_loads_it_in_the_plan_then_runs_it():
    models, lanes, _ = make_set(2)
    lanes[1].frontend.work = True
    plan, lane = run(models, 0)
    assert plan.model_ops == (ModelOp(MODEL_LOAD, 1),) and plan.model == 0
    assert not plan.idle  # the loaded model's work comes next step: no sleeping in between
    assert lanes[1].loaded and lanes[1].stats.loads == 1 and lanes[1].frontend.cache == ("attached", 100)
    plan, lane = run(models, 1)
    assert plan.model == 1 and plan.model_ops == ()


def test_idle_models_unload_after_idle_unload_s_but_never_the_start_up_model():
    models, lanes, _ = make_set(2, loaded=(0, 1), idle_unload_s=5.0)
    lanes[0].last_used = lanes[1].last_used = time.monotonic() - 10
    plan, _ = run(models, 0)
    assert plan.model_ops == (ModelOp(MODEL_UNLOAD, 1),)
    assert not lanes[1].loaded and lanes[0].loaded and lanes[1].stats.unloads == 1
    assert lanes[1].frontend.cache is None
    assert run(models, 1)[0].model_ops == ()


def test_memory_pressure_unloads_the_least_recently_used_idle_models_first():
    models, lanes, memory = make_set(4, loaded=(0, 1, 2), need={"d": 3 * GIB}, free=GIB // 2)
    now = time.monotonic()
    lanes[1].last_used, lanes[2].last_used = now - 20, now - 10  # b is the least recently used
    lanes[1].need_bytes = lanes[2].need_bytes = 2 * GIB
    lanes[3].frontend.work = True
    plan, _ = models.next_plan(0)
    # b frees 2 GiB (2.5 < 3): not enough, so c goes too.
    assert plan.model_ops == (ModelOp(MODEL_UNLOAD, 1), ModelOp(MODEL_UNLOAD, 2), ModelOp(MODEL_LOAD, 3))
    memory["free"] = 5 * GIB  # what the unloads gave back
    models.apply(plan)
    assert [lane.loaded for lane in lanes] == [True, False, False, True]


def test_a_model_that_does_not_fit_is_refused_with_the_numbers():
    models, lanes, _ = make_set(3, loaded=(0, 2), need={"b": 3 * GIB}, free=GIB)
    lanes[1].frontend.work = True
    plan, _ = run(models, 0)
    assert plan.model_ops == (ModelOp(MODEL_LOAD, 1),)  # unloading c (1 GiB) would not make room: it stays
    assert lanes[2].loaded
    assert not lanes[1].loaded and lanes[1].stats.refusals == 1
    [(message, status, code)] = lanes[1].frontend.failed
    assert status == 503 and code == "model_not_loaded"
    assert "model 'b' does not fit: it needs 3.00 GiB (its weights split over 2 ranks" in message
    assert "has 1.00 GiB available" in message


def test_a_model_no_rank_can_read_is_refused_and_nothing_is_half_loaded():
    def read(lane):
        raise FileNotFoundError("no such directory /m/1")

    models, lanes, _ = make_set(2, read=read)
    lanes[1].frontend.work = True
    run(models, 0)
    assert not lanes[1].loaded
    [(message, _, _)] = lanes[1].frontend.failed
    assert "could not be loaded: FileNotFoundError: no such directory /m/1" in message


def test_other_preloaded_models_load_in_the_first_steps_without_a_request():
    models, lanes, _ = make_set(3)
    lanes[2].pinned = True  # preload: true, after the start-up model
    plan, _ = run(models, 0)
    assert plan.model_ops == (ModelOp(MODEL_LOAD, 2),) and lanes[2].loaded and not lanes[1].loaded
    assert run(models, 1)[0].model_ops == ()
