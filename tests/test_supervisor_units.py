"""The supervisor's restart policy, without processes and on a fake clock: the backoff doubles up
to 60 s, a group that ran longer than `restart_window_s` starts the count again, and
`max_restarts` quick failures in a row end the launcher with exit 1. (test_faults.py checks the
same messages from a real `mlx-cluster up`.)"""

from __future__ import annotations

import io
import re
import time
from types import SimpleNamespace

from mlx_cluster.config import parse_config
from mlx_cluster.launcher import supervisor as supervisor_module
from mlx_cluster.launcher.supervisor import Supervisor


def run_policy(tmp_path, monkeypatch, lifetimes: list[float | None], **policy) -> tuple[int, list[float], str]:
    """Run Supervisor.run() where group i runs lifetimes[i] seconds and then a rank fails (None:
    a clean stop). Returns the exit code, the backoff sleeps, and what the launcher printed."""
    config = parse_config(
        {
            "cluster": {"name": "unit", "run_dir": str(tmp_path)},
            "hosts": [{"host": "localhost", "ranks": 2}],
            "supervisor": policy,
        }
    )
    out = io.StringIO()
    sup = Supervisor(config, None, out=out)
    sup.run_dir.path.mkdir(parents=True)
    clock = [1000.0]
    monkeypatch.setattr(supervisor_module, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep))
    sleeps: list[float] = []
    lifetimes = list(lifetimes)

    def run_group():
        sup.group_started_at = clock[0]  # as the real run_group does
        life = lifetimes.pop(0)
        if life is None:
            return None
        clock[0] += life
        return "rank 1 exited with code 1"

    def sleep_unless_stopping(seconds: float) -> bool:
        sleeps.append(seconds)
        clock[0] += seconds
        return False

    sup.prepare = lambda: None
    sup.install_signal_handlers = lambda: None
    sup.stop_group = lambda graceful, already_stopping=False: None
    sup.run_group = run_group
    sup._sleep_unless_stopping = sleep_unless_stopping
    code = sup.run()
    assert not lifetimes, "the supervisor stopped before every scripted group ran"
    return code, sleeps, out.getvalue()


def restart_lines(out: str) -> list[tuple[str, str]]:
    return re.findall(r"restarting the group in (\S+) s \(restart (\d+) of \d+\)", out)


def test_backoff_doubles_and_quick_failures_give_up(tmp_path, monkeypatch):
    code, sleeps, out = run_policy(tmp_path, monkeypatch, [1, 1, 1, 1], max_restarts=3, backoff_s=1.0)
    assert code == 1
    assert sleeps == [1.0, 2.0, 4.0]
    assert restart_lines(out) == [("1.0", "1"), ("2.0", "2"), ("4.0", "3")]
    assert "giving up (3 restart(s), max_restarts reached)" in out


def test_backoff_is_capped_at_60_s(tmp_path, monkeypatch):
    code, sleeps, _ = run_policy(tmp_path, monkeypatch, [1] * 6, max_restarts=5, backoff_s=10.0)
    assert code == 1 and sleeps == [10.0, 20.0, 40.0, 60.0, 60.0]


def test_a_group_that_ran_past_the_window_starts_the_count_again(tmp_path, monkeypatch):
    # Two quick failures, then a group that ran 500 s (> restart_window_s 100): the count starts
    # again, so two more quick failures are allowed before giving up.
    code, sleeps, out = run_policy(
        tmp_path, monkeypatch, [1, 1, 500, 1, 1], max_restarts=2, backoff_s=1.0, restart_window_s=100
    )
    assert code == 1
    assert sleeps == [1.0, 2.0, 1.0, 2.0]
    assert restart_lines(out) == [("1.0", "1"), ("2.0", "2"), ("1.0", "1"), ("2.0", "2")]
    assert "giving up (2 restart(s), max_restarts reached)" in out


def test_exactly_the_window_is_not_enough(tmp_path, monkeypatch):
    code, sleeps, _ = run_policy(
        tmp_path, monkeypatch, [1, 100, 1], max_restarts=2, backoff_s=1.0, restart_window_s=100
    )
    assert code == 1 and sleeps == [1.0, 2.0]  # 100 s is not longer than the window: no reset


def test_restart_never_and_a_clean_stop(tmp_path, monkeypatch):
    code, sleeps, out = run_policy(tmp_path / "a", monkeypatch, [1], restart="never")
    assert code == 1 and sleeps == [] and "giving up (restart: never)" in out
    code, sleeps, out = run_policy(tmp_path / "b", monkeypatch, [1, None], max_restarts=3, backoff_s=1.0)
    assert code == 0 and sleeps == [1.0] and out.rstrip().endswith("mlx-cluster: stopped")
