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
