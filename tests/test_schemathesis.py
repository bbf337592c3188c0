"""Property-based fuzzing of every endpoint in /openapi.json (schemathesis), with auth:
no 5xx, and the cluster still generates afterwards."""

import re
import subprocess
import sys

import pytest

from tests.cluster import Cluster

KEY = "sk-fuzz-key"


def test_no_server_errors_under_fuzzing(tmp_path, models_dir):
    pytest.importorskip("schemathesis")
    # Small caps keep each fuzzed generation short; bigger values must be rejected with a 400.
    cluster = Cluster(
        tmp_path,
        ranks=2,
        models_dir=models_dir,
        env={"MLX_CLUSTER_API_KEY": KEY},
        config={
            "scheduler": {"max_tokens_cap": 16, "max_prompt_tokens": 256, "max_batch_size": 8, "default_max_tokens": 8}
        },
    )
    with cluster:
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            cluster.url + "/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--request-timeout",
            "60",
            "--no-color",
            "--seed",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        report = out.stdout[-6000:] + out.stderr[-2000:]
        assert out.returncode == 0, report
        counts = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
        assert counts and int(counts[1]) == int(counts[2]) > 100, report
        r = cluster.post(
            "/v1/completions", {"prompt": "still alive?", "max_tokens": 4}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "Traceback" not in cluster.output()
