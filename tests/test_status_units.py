"""The status link (runtime/status_link.py) and GET /admin/status without a cluster."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest
from fastapi.testclient import TestClient

from mlx_cluster.config import ClusterConfig
from mlx_cluster.runtime.status_link import (
    MAGIC,
    MAX_REPORT_BYTES,
    STALE_HEARTBEATS,
    Reporter,
    StatusBoard,
    StatusServer,
    dial,
    send_report,
)
from mlx_cluster.server.app import ServerState, create_app
from mlx_cluster.server.metrics import Metrics
from mlx_cluster.server.status import attach_status
from tests.cluster import free_port

TOKEN = "run-token"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_board_marks_a_rank_unknown_until_it_reports_and_down_when_its_reports_go_stale():
    clock = FakeClock()
    board = StatusBoard(world_size=2, heartbeat_s=1.0, clock=clock)
    assert [r["up"] for r in board.snapshot()] == [False, False]
    board.put(1, {"t": 10.0, "gen_tokens": 0, "phase_s": {"bus": 0.0, "model": 0.0}, "state": "idle"})
    clock.now += 1.0
    board.put(1, {"t": 11.0, "gen_tokens": 50, "phase_s": {"bus": 0.25, "model": 0.5}, "state": "busy"})
    rank1 = board.snapshot()[1]
    assert rank1["up"] and rank1["state"] == "busy"
    assert rank1["tok_s"] == 50.0 and rank1["bus_frac"] == 0.25 and rank1["model_frac"] == 0.5
    clock.now += STALE_HEARTBEATS * 1.0 + 1.5  # no report for longer than the stale bound
    rank1 = board.snapshot()[1]
    assert not rank1["up"] and rank1["state"] == "unknown"
    board.put(1, {"t": 16.0, "state": "idle"})
    assert board.snapshot()[1]["up"]
    board.closed(1)
    assert board.snapshot()[1]["state"] == "down"


def _server(world_size=3):
    board = StatusBoard(world_size=world_size, heartbeat_s=0.2)
    port = free_port()
    return board, StatusServer(board, "127.0.0.1", port, TOKEN, timeout_s=10).start(), port


def _wait(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_reports_reach_the_board_and_strangers_and_oversized_reports_are_turned_away():
    board, server, port = _server(world_size=3)
    try:
        # A stranger with the wrong token is dropped; the real ranks still get in.
        stranger = socket.create_connection(("127.0.0.1", port))
        stranger.sendall(MAGIC + struct.pack("<I", 1) + b"wrong-tok")
        assert stranger.recv(1) == b""  # closed without a word
        one = dial(1, "127.0.0.1", port, TOKEN, timeout_s=5)
        two = dial(2, "127.0.0.1", port, TOKEN, timeout_s=5)
        send_report(one, {"t": 1.0, "state": "idle", "mem_active": 123, "cache": {"ram": {"hits": 4}}})
        assert _wait(lambda: board.snapshot()[1]["up"])
        assert board.snapshot()[1]["mem_active"] == 123 and board.snapshot()[1]["cache"] == {"ram": {"hits": 4}}
        # Once every worker has joined, nothing listens there any more.
        assert server.joined.wait(5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # A frame over the limit ends that rank's link: it shows as down, the others carry on.
        send_report(two, {"t": 1.0, "state": "idle"})
        assert _wait(lambda: board.snapshot()[2]["up"])
        two.sendall(struct.pack("<I", MAX_REPORT_BYTES + 1) + b"x" * 16)
        assert _wait(lambda: board.snapshot()[2]["state"] == "down")
        # Not JSON: counted and ignored.
        payload = b"not json"
        one.sendall(struct.pack("<I", len(payload)) + payload)
        assert _wait(lambda: board.bad_reports == 1)
        assert board.snapshot()[1]["up"]
        one.close()
        assert _wait(lambda: board.snapshot()[1]["state"] == "down")
    finally:
        server.close()


def test_prefetch_notices_reach_the_board_at_once_and_count_only_once_every_worker_sent_one():
    board, server, port = _server(world_size=3)
    woken = []
    board.on_prefetched = lambda: woken.append(1)
    try:
        one = dial(1, "127.0.0.1", port, TOKEN, timeout_s=5)
        two = dial(2, "127.0.0.1", port, TOKEN, timeout_s=5)
        send_report(one, {"notice": "prefetched", "step": 7})
        assert _wait(lambda: woken) and board.prefetched_through() == -1  # rank 2 has not read yet
        send_report(two, {"notice": "prefetched", "step": 5})
        assert _wait(lambda: board.prefetched_through() == 5)
        send_report(two, {"notice": "prefetched", "step": 9})
        assert _wait(lambda: board.prefetched_through() == 7)
        send_report(one, {"notice": "prefetched", "step": "8"})  # not a step: counted and ignored
        assert _wait(lambda: board.bad_reports == 1) and board.prefetched_through() == 7
        assert board.snapshot()[1]["state"] == "unknown"  # a notice is not a report
        one.close()
        two.close()
    finally:
        server.close()


def test_a_reporter_delivers_a_notice_without_waiting_for_the_heartbeat():
    delivered = []
    reporter = Reporter(lambda: {"report": True}, delivered.append, interval_s=60.0).start()
    try:
        assert _wait(lambda: delivered == [{"report": True}])
        reporter.notify({"notice": "prefetched", "step": 1})
        reporter.notify({"notice": "prefetched", "step": 2})  # replaces the one not sent yet, if any
        assert _wait(lambda: delivered[-1] == {"notice": "prefetched", "step": 2})
        assert delivered.count({"report": True}) == 1
    finally:
        reporter.stop()


def test_admin_status_is_behind_the_key_and_the_dashboard_page_is_not():
    state = ServerState(config=ClusterConfig(), api_keys=("sk-secret",), world_size=1)
    state.metrics = Metrics(state.model_name)
    board = StatusBoard(world_size=1, heartbeat_s=1.0)
    attach_status(state, board, restarts=2)
    board.put(0, {"t": time.time(), "state": "idle", "pid": 1, "mem_active": 5, "step_s": 0.01})
    app = TestClient(create_app(state))
    assert app.get("/admin/status").status_code == 401
    for path in ("/", "/dashboard"):
        page = app.get(path)
        assert page.status_code == 200 and "/dashboard/app.js" in page.text
    assert app.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
    assert app.get("/dashboard/../config.py").status_code == 404
    r = app.get("/admin/status", headers={"Authorization": "Bearer sk-secret"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "cluster.status" and body["cluster"]["restarts"] == 2
    assert body["cluster"]["api_key_required"] is True
    assert body["ranks"][0]["up"] and body["ranks"][0]["mem_active"] == 5
    json.dumps(body)  # plain JSON throughout
    # A polling page asks only for the history points it has not seen.
    status = state.cluster_status
    status.sample()
    status.sample()
    assert len(status.history) == 1
    last_t = status.history[-1]["t"]
    since = app.get("/admin/status", params={"history_since": last_t}, headers={"Authorization": "Bearer sk-secret"})
    assert since.json()["history"] == []
    since = app.get(
        "/admin/status", params={"history_since": last_t - 1}, headers={"Authorization": "Bearer sk-secret"}
    )
    assert len(since.json()["history"]) == 1
    metrics = app.get("/metrics", headers={"Authorization": "Bearer sk-secret"}).text
    assert 'mlx_cluster_rank_up{model_name="builtin:tiny",rank="0"} 1.0' in metrics
    assert 'mlx_cluster_rank_memory_active_bytes{model_name="builtin:tiny",rank="0"} 5.0' in metrics
