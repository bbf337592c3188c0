"""Regression tests for what the chaos harness (benchmarks/chaos.py) found, without a cluster."""

import subprocess
import sys

from fastapi.testclient import TestClient

from mlx_cluster.config import ClusterConfig
from mlx_cluster.server.app import ServerState, create_app


def test_a_request_for_an_adapter_while_the_group_loads_is_a_retryable_503():
    # After a restart, rank 0 answers HTTP before it has registered the configured adapters: a
    # request naming one got 404 model_not_found (a permanent error) instead of 503 loading.
    app = TestClient(create_app(ServerState(config=ClusterConfig())))
    for path, body in [
        ("/v1/completions", {"model": "ad1", "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": "ad1", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"model": "ad1", "input": "hi"}),
        ("/v1/messages", {"model": "ad1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = app.post(path, json=body)
        assert r.status_code == 503, (path, r.text)
        assert r.headers["retry-after"] == "5" and r.json()["error"]["type"] is not None, path
        assert r.json()["error"].get("code", "loading") in ("loading", None), path


WATCHING_RANK = """
import time
from mlx_cluster.runtime.watchdog import Watchdog
class Idle:
    busy_since, phase = None, "model"
Watchdog(Idle(), 10, lambda reason: None, None, watch_stdin=True).start()
time.sleep(0.3)  # the stdin watch is blocked in its read; now exit normally
"""


def test_a_rank_watching_its_ssh_stdin_exits_cleanly():
    # Every SSH-launched rank aborted at `down` (exit 134, "Fatal Python error:
    # _enter_buffered_busy"): the stdin watch blocked in sys.stdin.buffer.read held the reader's
    # lock at interpreter shutdown. Its stdin (the SSH channel) stays open here, as then.
    proc = subprocess.Popen([sys.executable, "-c", WATCHING_RANK], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        code = proc.wait(timeout=60)  # stdin still open: no EOF, so the watch must not fire
    finally:
        proc.stdin.close()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert code == 0 and "Fatal Python error" not in err, (code, err)
    # And the watch still does its job: EOF on stdin (the launcher's connection gone) ends the rank.
    from mlx_cluster.runtime.watchdog import EXIT_ORPHANED

    gone = subprocess.run(
        [sys.executable, "-c", WATCHING_RANK.replace("0.3", "30")], stdin=subprocess.DEVNULL, capture_output=True
    )
    assert gone.returncode == EXIT_ORPHANED and b"SSH connection closed" in gone.stderr, gone
