"""`mlx-cluster status | down | logs`, run from another terminal against a running cluster."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request

from mlx_cluster.config import ClusterConfig
from mlx_cluster.launcher.rundir import ACTIVE, RunDir, pid_alive


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except (ValueError, OSError):
            return {"status": f"http {e.code}"}
    except (OSError, ValueError):
        return None


def status(config: ClusterConfig, as_json: bool = False) -> int:
    """Print ranks, hosts, pids, uptime, restarts and rank 0's health. Exit 0 only when serving."""
    run_dir = RunDir.for_cluster(config)
    state = run_dir.read_state()
    if state is None:
        print(f"cluster {config.cluster.name!r}: not running (no state in {run_dir.path})")
        return 3
    launcher_up = pid_alive(state.get("launcher_pid"))
    health = _health(state["http"]) if launcher_up else None
    from mlx_cluster.launcher.status_view import api_key, fetch_status, print_rank_table

    # Per-rank figures (memory, step time, tok/s) come from rank 0's /admin/status, when it answers.
    cluster_status, why = fetch_status(state["http"], api_key(config)) if health is not None else (None, "")
    report = {**state, "launcher_alive": launcher_up, "health": health}
    if cluster_status is not None:
        report["ranks_live"] = cluster_status["ranks"]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        status_word = state["status"] if launcher_up else f"{state['status']} (launcher gone)"
        up = state.get("group_started_at")
        uptime = f"{time.time() - up:.0f}s" if up and launcher_up else "-"
        print(
            f"cluster   {state['cluster']}  status {status_word}  backend {state['backend']}  "
            f"ranks {state['world_size']}  restarts {state['restarts']}  uptime {uptime}"
        )
        print(f"api       {state['http']}/v1   health {health.get('status') if health else 'unreachable'}")
        if cluster_status is not None:
            print_rank_table(cluster_status)
        else:
            if why:
                print(f"per-rank figures: {why}")
            print(f"{'rank':>4}  {'host':<20} {'pid':>8}  state")
            for r in state["ranks"]:
                alive = pid_alive(r["pid"]) if r["local"] else (launcher_up and r["exit_code"] is None)
                print(f"{r['rank']:>4}  {r['host']:<20} {r['pid'] or '-':>8}  {'up' if alive else 'down'}")
    serving = launcher_up and health is not None and health.get("status") in ("ok", "degraded", "overloaded")
    return 0 if serving else 1


def down(config: ClusterConfig, timeout_s: float | None = None) -> int:
    """SIGTERM the launcher (rank 0 drains, every rank stops); SIGKILL what is left after the timeout."""
    run_dir = RunDir.for_cluster(config)
    state = run_dir.read_state()
    if state is None:
        print(f"cluster {config.cluster.name!r} is not running")
        return 0
    timeout_s = timeout_s if timeout_s is not None else config.supervisor.drain_timeout_s + 20
    launcher = state.get("launcher_pid")
    if pid_alive(launcher) and state.get("status") in ACTIVE:
        print(f"stopping cluster {state['cluster']!r} (launcher pid {launcher}) ...", file=sys.stderr)
        _signal(launcher, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(launcher) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(launcher):
            print(f"the launcher did not stop within {timeout_s:.0f} s; killing it and its ranks", file=sys.stderr)
            _signal(launcher, signal.SIGKILL)
    killed = _kill_leftover_ranks(config, state)
    print(f"cluster {state['cluster']!r} is down" + (f" ({killed} leftover rank(s) killed)" if killed else ""))
    return 0


def _kill_leftover_ranks(config: ClusterConfig, state: dict) -> int:
    killed = 0
    for r in state.get("ranks", []):
        if r["local"]:
            if pid_alive(r["pid"]):
                _signal(r["pid"], signal.SIGKILL)
                killed += 1
        elif r["pid"]:
            from mlx_cluster.launcher.ssh import kill_remote

            host = next((h for h in config.host_list() if h.host == r["host"]), None)
            if host is not None:
                try:
                    killed += bool(
                        kill_remote(host, config.ssh, r["pid"], signal.SIGKILL, match="mlx_cluster.runtime.rank")
                    )
                except Exception as e:  # unreachable host: report, keep going
                    print(f"could not reach {r['host']} to stop rank {r['rank']}: {e}", file=sys.stderr)
    return killed


def _signal(pid: int, sig: int) -> None:
    try:
        import os

        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def logs(config: ClusterConfig, follow: bool = False, rank: int | None = None, lines: int = 50) -> int:
    run_dir = RunDir.for_cluster(config)
    files = sorted(run_dir.path.glob("rank*.log"), key=lambda p: int(p.stem[4:]))
    if rank is not None:
        files = [f for f in files if f.stem == f"rank{rank}"]
    if not files:
        print(f"no logs for cluster {config.cluster.name!r} in {run_dir.path}", file=sys.stderr)
        return 1
    handles = []
    for f in files:
        # Read the tail through the handle that then follows: no line falls between the two.
        h = open(f, errors="replace")
        text = h.read().splitlines()
        for line in text[-lines:] if lines else []:
            print(f"[{f.stem}] {line}")
        handles.append((f.stem, h))
    sys.stdout.flush()
    try:
        while follow:
            idle = True
            for name, h in handles:
                for line in h.readlines():
                    idle = False
                    print(f"[{name}] {line}", end="", flush=True)
            if idle:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    return 0
