"""`mlx-cluster serve --model DIR`: the one-process shortcut, with a local mlx-lm directory."""

import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.cluster import REPO, free_port

pytestmark = pytest.mark.slow


def test_serve_a_local_model_directory(tmp_path, tiny_model_path):
    # A plain mlx-lm directory (not a builtin: path), as a user's converted model would be.
    model_dir = tmp_path / "my-model"
    shutil.copytree(tiny_model_path, model_dir)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_cluster",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--set",
            f"cluster.run_dir={tmp_path / 'runs'}",
            "--set",
            f"cache.ssd.dir={tmp_path / 'kv'}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models", timeout=5).json()
        assert models["data"][0]["id"] == str(model_dir)
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=60,
            json={"model": str(model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        # The launcher announces readiness from its own poller: wait for it before stopping.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("ready: 1 rank(s)" in line for line in lines):
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leak the server, even when the test fails
            proc.wait()
        reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "ready: 1 rank(s)" in out and "stopped" in out


def test_serve_reports_a_missing_model_clearly(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_cluster",
            "serve",
            "--model",
            str(tmp_path / "nope"),
            "--port",
            str(free_port()),
            "--no-restart",
            "--set",
            f"cluster.run_dir={tmp_path / 'runs'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr
