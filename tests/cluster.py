"""Start a real cluster the way a user does (`mlx-cluster up cluster.yaml` in a subprocess)
and drive it over HTTP. Used by the integration and fault-injection tests.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent

# A 2-core CI machine shared with other jobs delays wake-ups and process exits; timing bounds
# below add this much and no more.
SCHEDULING_SLACK_S = 1.5

# The design's failure bounds, stated once, in these words, in README.md ("Failures") and
# docs/operations.md ("Restarts"); test_readme.py checks that both say exactly this and that
# the code's constants are the numbers it names.
FAILURE_BOUNDS = (
    "A rank that dies is noticed at its peers' next exchange: at once while serving, within "
    "`supervisor.heartbeat_s` while idle. A rank that stops or wedges (SIGSTOP, a sleeping Mac, "
    "a stuck kernel) is noticed within `supervisor.collective_timeout_s + supervisor.heartbeat_s "
    "+ 0.25 s` (the watchdog's poll). The rank that notices exits 1 s later (rank 0 first ends "
    "in-flight requests with an error); the launcher then stops the rest of the group (at most "
    "5 s more) and restarts it after its backoff."
)
WATCHDOG_POLL_S = 0.25  # "the watchdog's poll": runtime/watchdog.py POLL_S
FAIL_PATH_S = 1.0  # "exits 1 s later": runtime/rank.py FAIL_FLUSH_S
GROUP_STOP_S = 5.0  # "at most 5 s more": launcher/supervisor.py FAILURE_GRACE_S


def stall_bound_s(collective_timeout_s: float, heartbeat_s: float) -> float:
    """Seconds from a rank stopping or wedging until the rank that notices has exited
    (FAILURE_BOUNDS). Why: an idle rank 0 begins its next heartbeat plan within heartbeat_s;
    that plan's collective then blocks; the watchdog, looking every 0.25 s, ends the rank once
    it has blocked for collective_timeout_s, after the 1 s fail path. A worker that hears
    nothing from rank 0 gives up after collective_timeout_s (its plan link's silence timeout) or its own watchdog,
    whichever comes first: within the same bound."""
    return collective_timeout_s + heartbeat_s + WATCHDOG_POLL_S + FAIL_PATH_S


def death_bound_s(heartbeat_s: float) -> float:
    """Seconds from a rank's death until a peer that noticed it has exited (FAILURE_BOUNDS,
    the idle case: the next heartbeat plan, then the fail path)."""
    return heartbeat_s + FAIL_PATH_S


_rng = random.SystemRandom()  # not the seedable global one: two runs must not pick alike


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # macOS and IANA


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports after it, below the kernel's ephemeral range:
    a port from that range can be handed to any outgoing connection between this check and the
    group's bind (seen as `[ring] Couldn't bind socket (error: 98)` on a loaded machine)."""
    top = _ephemeral_ports_start() - n
    for _ in range(500):
        base = _rng.randrange(10_000, top)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def free_port() -> int:
    """A free port outside the ephemeral range (see free_port_block)."""
    return free_port_block(1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def survivors(pids: list[int], timeout_s: float) -> list[int]:
    """Wait up to timeout_s for every pid to exit; SIGKILL and return the ones that did not,
    so a failing test still never leaks a process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if pid_alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


class Cluster:
    """One `mlx-cluster up` process and the ranks it supervises."""

    def __init__(
        self,
        workdir: Path,
        *,
        ranks: int = 1,
        models_dir: Path | None = None,
        config: dict | None = None,
        env: dict | None = None,
        name: str | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # One block for the HTTP port and the group's ports, so neither can land on the other (two
        # independent picks once gave rank 1 the port rank 0's HTTP server had bound: every restart failed).
        base_port = free_port_block(9)
        self.port = base_port + 8
        self.name = name or f"test-{self.port}"
        cfg = {
            "cluster": {"name": self.name, "run_dir": str(self.workdir / "runs"), "base_port": base_port},
            "hosts": [{"host": "localhost", "ranks": ranks}],
            "model": {"path": "builtin:tiny", "builtin_dir": str(models_dir or self.workdir / "models")},
            "server": {"port": self.port},
            "cache": {"ssd": {"dir": str(self.workdir / "kv")}},
            "supervisor": {"backoff_s": 0.2, "collective_timeout_s": 10, "heartbeat_s": 0.5, "drain_timeout_s": 10},
        }
        _merge(cfg, config or {})
        self.config = cfg
        self.config_path = self.workdir / f"{self.name}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.out"
        self.url = f"http://127.0.0.1:{self.port}"

    # ---- lifecycle --------------------------------------------------------------------
    def start(self, wait: bool = True, timeout_s: float = 180) -> Cluster:
        """Run `mlx-cluster up`; with `wait`, return once /readyz says 200. If it never gets
        there, everything started is stopped before the error propagates: no leaked ranks."""
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlx_cluster", "up", str(self.config_path)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        except BaseException:
            self.stop(timeout_s=10)
            raise
        if wait:
            self.ready_or_stop(timeout_s)
        return self

    def ready_or_stop(self, timeout_s: float = 180) -> None:
        """wait_ready, and if that fails, stop everything started before the error propagates."""
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop(timeout_s=10)
            raise

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Wait for /readyz 200; on failure the caller still owns the cluster (stop() it in a finally)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlx-cluster up exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if self.readyz() == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready after {timeout_s} s:\n{self.output()[-4000:]}")

    def readyz(self) -> int | None:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM the launcher (it drains), SIGKILL whatever is left. Safe to call twice."""
        if self.proc is None:
            return None
        pids = self.rank_pids()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for pid in set(pids + self.rank_pids()):  # belt and braces: a test must never leak a rank
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def restarts(self) -> int:
        return self.state()["restarts"]

    # ---- introspection ----------------------------------------------------------------
    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def state(self) -> dict:
        path = self.workdir / "runs" / self.name / "state.json"
        return json.loads(path.read_text())

    def rank_pids(self) -> list[int]:
        try:
            return [r["pid"] for r in self.state()["ranks"] if r["pid"]]
        except (OSError, KeyError, ValueError):
            return []

    def placement(self):
        """Where the group listens: `.doorbell` (ip, port: the plan link) and `.ports` (ring ports and it)."""
        from mlx_cluster.config import load_config
        from mlx_cluster.launcher.placement import plan_placement

        return plan_placement(load_config(self.config_path))

    def logs(self, rank: int | None = None, lines: int = 100_000, timeout_s: float = 30) -> str:
        """What `mlx-cluster logs cluster.yaml [--rank N]` prints (the per-rank log files)."""
        cmd = [sys.executable, "-m", "mlx_cluster", "logs", str(self.config_path), "-n", str(lines)]
        if rank is not None:
            cmd += ["--rank", str(rank)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=self.env, timeout=timeout_s)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics, e.g. metric("mlx_cluster_request_failure_total", reason="abort");
        0.0 when the series has no sample yet (a labelled counter appears on first use)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = {"model_name": self.config["model"].get("name") or self.config["model"]["path"], **labels}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                    return sample.value
        return 0.0

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=kwargs.pop("api_key", "none"),
            max_retries=0,
            timeout=kwargs.pop("timeout", 120),
            **kwargs,
        )

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kwargs.pop("timeout", 120), **kwargs)


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
