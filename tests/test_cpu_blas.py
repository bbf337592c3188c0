"""cluster.cpu_blas: mlx's CPU matmuls run on the system's OpenBLAS when there is one.

Each case runs in a fresh interpreter: the choice binds `cblas_sgemm` for the life of a
process, and this one made its own at start (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlx_cluster.config import ConfigError, load_config
from mlx_cluster.runtime.cpu_blas import find_openblas
from tests.cluster import REPO

# Reports the log line, which libraries the process mapped, and a product to compare.
PROBE = """
import json, sys
from mlx_cluster.runtime.cpu_blas import use_cpu_blas
line = use_cpu_blas(sys.argv[1], int(sys.argv[2]))
import mlx.core as mx
a = mx.random.normal((64, 96), key=mx.random.key(1)); b = mx.random.normal((96, 80), key=mx.random.key(2))
maps = open("/proc/self/maps").read()
print(json.dumps({"line": line, "openblas": "openblas" in maps, "product": (a @ b).tolist()}))
"""


def probe(setting: str, local_ranks: int = 1, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setting, str(local_ranks)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def close(x: list, y: list) -> bool:
    return all(abs(p - q) <= 1e-4 * (1 + abs(q)) for rx, ry in zip(x, y) for p, q in zip(rx, ry))


@pytest.mark.skipif(
    find_openblas() is None, reason="no OpenBLAS on this machine (.ci/install-system-deps.sh installs it)"
)
def test_auto_multiplies_with_the_system_openblas():
    fast = probe("auto", local_ranks=2, OPENBLAS_NUM_THREADS="")
    own = probe("bundled")
    assert fast["openblas"] and fast["line"].startswith(f"CPU matmuls: {find_openblas()} (")
    assert not own["openblas"] and own["line"] == "CPU matmuls: mlx's own BLAS"
    assert close(fast["product"], own["product"])  # the same product, rounded its own way


@pytest.mark.skipif(find_openblas() is None, reason="no OpenBLAS on this machine")
def test_threads_come_from_the_environment_first():
    assert probe("auto", OPENBLAS_NUM_THREADS="1")["line"].endswith("(1 thread)")
    assert probe(find_openblas(), OPENBLAS_NUM_THREADS="3")["line"].endswith("(3 threads)")  # an explicit path


def test_a_library_without_cblas_is_refused_with_the_key():
    libm = next(p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6") if os.path.exists(p))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, libm, "1"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert f"cluster.cpu_blas: '{libm}' is not a usable BLAS" in out.stderr
    assert "write auto or bundled" in out.stderr


def test_too_late_once_mlx_is_imported():
    code = "import mlx.core\nfrom mlx_cluster.runtime.cpu_blas import use_cpu_blas\nuse_cpu_blas('auto')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "before mlx is imported" in out.stderr


def test_config_names_the_key_and_the_choices(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cluster: {cpu_blas: openblas}\n")
    with pytest.raises(ConfigError, match=r"cluster.cpu_blas: .*auto, bundled, or the absolute path"):
        load_config(p)
    p.write_text("cluster: {cpu_blas: /usr/lib/libopenblas.so.0}\n")
    assert load_config(p).cluster.cpu_blas == "/usr/lib/libopenblas.so.0"
