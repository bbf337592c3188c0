"""The chaos harness's short variant (benchmarks/chaos.py): a seeded mixed workload on two ranks
(streaming and not; chat, completions, Responses, Messages; JSON schema; tool calls; n-gram
speculation; a LoRA adapter; long prompts through the SSD tier; cancellations; a client that
never reads; malformed and oversized bodies) while rank kills, a launcher kill and SSD-file
corruption are injected. The oracle must hold: no wrong token against a fault-free one-rank
reference, no hang, no truncated success, no error without an envelope, no process left after
`down`, /readyz never 200 while a request cannot be served."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.cluster import REPO

pytestmark = pytest.mark.slow


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", REPO / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_chaos_run_holds_the_oracle(tmp_path, models_dir):
    chaos = load_chaos()
    report = chaos.run_chaos(
        seed=3,
        n_faults=3,
        n_requests=24,
        duration_s=25,
        long_words=40,
        # SSD files corrupted first, so the restarts after the kills read (and must reject) them.
        kinds=("ssd_corrupt", "sigkill", "launcher"),
        in_order=True,
        workdir=tmp_path,
        models_dir=models_dir,
        log=lambda *_: None,
    )
    shown = json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1)
    assert sum(report["faults"].values()) == 3, shown
    assert report["wrong_tokens"] == 0 and report["hangs"] == 0, shown
    assert report["violations"] == [] and report["readyz_lies"] == [] and report["orphans"] == [], shown
    assert report["oracle_holds"], shown
    # Every request was judged, and some were answered in full and compared (on a loaded 2-core
    # machine most of a 25 s workload can fall into the restarts and get 503 loading).
    assert sum(report["outcomes"].values()) == 24 and report["outcomes"].get("ok", 0) >= 1, shown


def test_the_oracle_catches_what_it_must():
    """The judge itself: a differing token, a reply cut short and a connection lost outside any
    fault are violations; a cancelled stream's prefix of the reference is not."""
    chaos = load_chaos()
    R = chaos.Result
    refs = {1: (["a", "b"], None, "length"), 2: ("hello there", None, "stop"), 3: (["x"], None, "stop")}
    results = [
        R(1, "completion", "ok", (["a", "c"], None, "length")),
        R(2, "chat", "cancelled", ("hello", None, None)),
        R(3, "completion", "lost", start=100.0, end=101.0),
        R(4, "chat", "truncated"),
    ]
    verdict = chaos.judge(results, refs, faults=[chaos.Fault("sigkill", t=10.0, recovered_at=20.0)])
    assert verdict["wrong_tokens"] == 1
    assert verdict["outcomes"] == {"wrong": 1, "cancelled": 1, "unexplained_lost": 1, "truncated": 1}
    assert [v["id"] for v in verdict["violations"]] == [1, 3, 4]


def test_pipeline_and_models_options_build_what_they_say(models_dir, tmp_path):
    """--pipeline gives cluster.parallel; --models 2 gives every request a model, alternating,
    and a second model that answers differently from builtin:tiny (so a request served by the
    wrong model is a wrong token for the oracle), whose config validates as `models:`."""
    chaos = load_chaos()
    assert chaos.layout_config(1, 2) == {}
    assert chaos.layout_config(2, 2) == {"cluster": {"parallel": {"tensor": 1, "pipeline": 2}}}
    with pytest.raises(ValueError, match="must divide"):
        chaos.layout_config(2, 3)
    specs = chaos.make_workload(5, 30, 10.0, None)
    chaos.assign_models(specs, ["tiny", "tiny2"])
    named = [s.body["model"] for s in specs if s.body is not None]
    assert set(named) == {"tiny", "tiny2"} and all(s.raw is not None for s in specs if s.body is None)

    import mlx.core as mx

    from mlx_cluster.config import ClusterConfig
    from mlx_cluster.models.builtin import resolve_model_path

    tiny = resolve_model_path("builtin:tiny", str(models_dir))
    second = chaos.make_second_model(models_dir, tmp_path / "tiny2")
    key = "model.embed_tokens.weight"
    a, b = (
        {k: v for f in sorted(d.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}
        for d in (Path(tiny), second)
    )
    assert a.keys() == b.keys() and not mx.array_equal(a[key], b[key])
    assert all(mx.array_equal(a[k], b[k]).item() for k in a if k != key)
    cfg = chaos.models_config({"tiny": "builtin:tiny", "tiny2": str(second)}, models_dir, 4.0)
    assert [m.name for m in ClusterConfig.model_validate(cfg).models] == ["tiny", "tiny2"]
