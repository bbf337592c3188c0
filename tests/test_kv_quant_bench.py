"""benchmarks/kv_quant.py's variant names: precision, group and an environment to A/B in the
same interleaved rounds (docs/benchmarks.md, "Quantized live KV")."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from kv_quant import _file_name, _variant, _variant_env  # noqa: E402


def test_variant_names_carry_precision_group_and_environment():
    args = Namespace(kv_group_size=64)
    assert _variant("none", args) == (None, 64) and _variant_env("none") == {}
    assert _variant("8g128", args) == (8, 128)
    name = "4@MLX_PTX_CACHE_DIR=/tmp/a=b,NCCL_PROTO=LL"
    assert _variant(name, args) == (4, 64)
    assert _variant_env(name) == {"MLX_PTX_CACHE_DIR": "/tmp/a=b", "NCCL_PROTO": "LL"}
    assert _file_name(name) == "4_MLX_PTX_CACHE_DIR__tmp_a_b_NCCL_PROTO_LL"  # a folder and trace name
