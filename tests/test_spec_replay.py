"""benchmarks/spec_replay.py replays the real Speculator on recorded text: it must keep working
as the engine's rules change (docs/benchmarks.md tunes them with it), and price steps honestly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from spec_replay import replay_one  # noqa: E402

from mlx_cluster.engine.speculate import NgramProposer, Speculator  # noqa: E402
from mlx_cluster.engine.verify_cost import VerifyCost  # noqa: E402

LOOP = [7, 8, 9, 10, 11, 12]


def replay(stream_out: list[int], believed: VerifyCost, true: VerifyCost) -> dict:
    speculator = Speculator(NgramProposer(2, 4), 4, 1, believed)
    return replay_one(speculator, LOOP * 3, stream_out, drained=1.5, true_cost=true)


def test_a_loop_is_verified_and_every_token_is_accounted_for():
    out = LOOP * 20
    counts = replay(out, VerifyCost(1.6, 1.6, 4), VerifyCost(1.6, 1.6, 4))
    assert len(out) - 1 <= counts["tokens"] <= len(out)  # the last recorded token has no truth after it
    assert counts["verify"] > 0 and counts["tokens"] / counts["cost"] > 2  # nearly all accepted
    assert counts["plain"] + counts["drained"] + 5 * counts["verify"] >= counts["tokens"]


def test_a_cost_that_never_pays_keeps_every_row_plain_without_probes():
    out = LOOP * 20
    counts = replay(out, VerifyCost(9.0, 9.0, 4), VerifyCost(1.6, 1.6, 4))
    assert counts["verify"] == 0 and counts["drained"] <= 1 and counts["tokens"] == len(out) - 1


def test_the_command_replays_a_dump(tmp_path):
    dump = {
        "model": "synthetic",
        "device": "none",
        "verify_cost": [[1.6, 1.7, 4]],
        "drained": 1.5,
        "workloads": {"loop": [[LOOP * 3, LOOP * 10]], "noise": [[list(range(40)), list(range(100, 160))]]},
    }
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(dump))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "spec_replay.py"), "replay", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loop = next(line for line in out.splitlines() if line.strip().startswith("loop"))
    noise = next(line for line in out.splitlines() if line.strip().startswith("noise"))
    assert "0 verify" not in loop and " 0 verify" in noise  # nothing recurs in noise: never verified
