"""benchmarks/tp_identity.py's verdict: a divergence from the one-rank text is a near-tie only
where the reference's best two tokens were within `--tie` of each other (docs/benchmarks.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from tp_identity import compare, margin  # noqa: E402


def _run(tokens: list[str], leads: list[float]) -> dict:
    return {"tokens": tokens, "top": [{t: 0.0, "other": -lead} for t, lead in zip(tokens, leads)]}


def test_divergence_is_judged_by_the_references_margin_where_it_happens():
    reference = _run(["a", "b", "c", "d"], [2.0, 1.0, 0.01, 3.0])
    assert compare(reference, _run(["a", "b", "c", "d"], [0] * 4), tie=0.05) == {"match": True, "diverges_at": None}
    tie = compare(reference, _run(["a", "b", "x", "y"], [0] * 4), tie=0.05)
    assert tie == {"match": False, "diverges_at": 2, "reference_margin": 0.01, "near_tie": True}
    wrong = compare(reference, _run(["a", "x", "c", "d"], [0] * 4), tie=0.05)
    assert wrong["diverges_at"] == 1 and not wrong["near_tie"]
    assert not compare(reference, _run(["a", "b"], [0] * 2), tie=0.05)["match"]  # cut short
    assert margin({"only": -0.1}) == float("inf")
