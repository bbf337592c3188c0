"""Property-based fuzzing of every endpoint in /openapi.json (schemathesis), with auth:
no 5xx, and the cluster still generates afterwards."""

import importlib.util
import json
import re
import subprocess
import sys

import httpx
import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.slow

KEY = "sk-fuzz-key"
# The run (~150-220 s on a loaded 2-core machine) must end before pytest-timeout kills the
# test, or the cluster would be left to the kill: this test gets its own limit, above the
# global 300 s, and the run a smaller one inside it, leaving time to start and stop the cluster.
TEST_TIMEOUT_S = 420
FUZZ_TIMEOUT_S = 330


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_no_server_errors_under_fuzzing(tmp_path, models_dir):
    # No silent skip: the test extra installs schemathesis, so its absence is a broken setup.
    if importlib.util.find_spec("schemathesis") is None:
        pytest.fail("schemathesis is not installed: python3 -m pip install -e '.[test]'")
    # Small caps keep each fuzzed generation (and warmup prefill) short; bigger values must be
    # rejected with a 400.
    cluster = Cluster(
        tmp_path,
        ranks=2,
        models_dir=models_dir,
        env={"MLX_CLUSTER_API_KEY": KEY},
        config={
            "scheduler": {
                "max_tokens_cap": 16,
                "max_prompt_tokens": 64,
                "max_batch_size": 8,
                "default_max_tokens": 8,
            }
        },
    )
    with cluster:
        spec = httpx.get(cluster.url + "/openapi.json", timeout=10).json()
        warmup = spec["paths"]["/admin/cache/warmup"]["post"]
        assert warmup["requestBody"]["content"]["application/json"]["schema"]["oneOf"], json.dumps(warmup)
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
            "8",
            "--request-timeout",
            "60",
            "--no-color",
            "--seed",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--report",
            "har",
            "--report-har-path",
            str(tmp_path / "fuzz.har"),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
        report = out.stdout[-6000:] + out.stderr[-2000:]
        assert out.returncode == 0, report
        counts = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
        assert counts and int(counts[1]) == int(counts[2]) > 100, report
        # /admin/cache/warmup was fuzzed with bodies, and some were valid enough to warm the cache.
        entries = json.loads((tmp_path / "fuzz.har").read_text())["log"]["entries"]
        warmups = [
            e
            for e in entries
            if e["request"]["method"] == "POST" and e["request"]["url"].endswith("/admin/cache/warmup")
        ]
        with_body = [e for e in warmups if (e["request"].get("postData") or {}).get("text")]
        assert len(with_body) > 10, f"{len(warmups)} warmup requests, {len(with_body)} with a body"
        assert any(e["response"]["status"] == 200 for e in with_body)
        r = cluster.post(
            "/v1/completions", {"prompt": "still alive?", "max_tokens": 4}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "Traceback" not in cluster.output()
