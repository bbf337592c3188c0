"""A cluster's run directory: state file and per-rank logs, shared with other terminals.

`<cluster.run_dir>/<cluster.name>/state.json` says who runs the cluster (launcher pid), which
ranks exist where (pids, hosts), restarts and status. `status`, `down` and `logs` read it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mlx_cluster.config import ClusterConfig, ConfigError

ACTIVE = ("starting", "running", "restarting", "stopping")


def pid_alive(pid: int | None) -> bool:
    """True while the process runs; an exited process its parent has not reaped yet counts as gone."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) is all we know


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self._logs: dict[int, object] = {}
        self.started_at = time.time()

    @classmethod
    def for_cluster(cls, config: ClusterConfig) -> RunDir:
        return cls(Path(config.cluster.run_dir).expanduser() / config.cluster.name)

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def log_file(self, rank: int) -> Path:
        return self.path / f"rank{rank}.log"

    def read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def claim(self) -> None:
        """Refuse to start a second launcher for a cluster that is running."""
        self.path.mkdir(parents=True, exist_ok=True)
        state = self.read_state()
        if state and state.get("status") in ACTIVE and pid_alive(state.get("launcher_pid")):
            raise ConfigError(
                f"cluster {self.path.name!r} is already running (launcher pid {state['launcher_pid']}); "
                f"stop it with `mlx-cluster down`, or give this one another cluster.name"
            )
        for log in self.path.glob("rank*.log"):
            log.replace(log.with_suffix(".log.1"))  # keep the previous run's logs one generation

    def append_log(self, rank: int, line: str) -> None:
        f = self._logs.get(rank)
        if f is None:
            f = self._logs[rank] = open(self.log_file(rank), "a", buffering=1)
        f.write(line + "\n")

    def write_state(self, supervisor, status: str) -> None:
        ranks = []
        for proc in supervisor.procs:
            ranks.append(
                {
                    "rank": proc.rank,
                    "host": proc.host.host,
                    "local": proc.host.is_local,
                    "pid": proc.pid,
                    "exit_code": proc.poll(),
                }
            )
        state = {
            "cluster": supervisor.config.cluster.name,
            "status": status,
            "launcher_pid": os.getpid(),
            "started_at": self.started_at,
            "group_started_at": time.time()
            if status == "running"
            else (self.read_state() or {}).get("group_started_at"),
            "restarts": supervisor.restarts,
            "world_size": supervisor.placement.world_size,
            "backend": supervisor.placement.backend,
            "http": supervisor.http_url(),
            "config_path": os.path.abspath(supervisor.config_path) if supervisor.config_path else None,
            "ranks": ranks,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def release(self) -> None:
        for f in self._logs.values():
            f.close()
        self._logs.clear()
