"""`mlx-cluster up`: start every rank, stream their output, keep the group healthy.

The supervisor treats the ranks as one unit: if any rank exits unexpectedly the whole group
is stopped (a tensor-parallel group cannot run with a hole in it) and, per the restart policy,
started again with backoff. A crash loop ends with a clear message and a non-zero exit.

When rank 0 runs on this machine the supervisor owns the HTTP listening socket and hands it
to each incarnation of rank 0, so clients queue in the backlog during a restart instead of
being refused, and the port cannot be taken by someone else in between.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.request

from mlx_cluster.config import ClusterConfig, ConfigError, dump_config
from mlx_cluster.launcher.local import LocalRankProcess
from mlx_cluster.launcher.placement import (
    Placement,
    backend_device_error,
    check_local_ports,
    check_port_free,
    cuda_available,
    plan_placement,
)
from mlx_cluster.launcher.progress import ProgressDisplay
from mlx_cluster.launcher.rundir import RunDir

log = logging.getLogger(__name__)

SECRET_ENV = ("MLX_CLUSTER_API_KEY",)
FAILURE_GRACE_S = 5.0  # rank 0 fails its in-flight requests, flushes them, then exits by itself


class Supervisor:
    def __init__(self, config: ClusterConfig, config_path: str | None, out=sys.stdout):
        self.config = config
        self.config_path = config_path
        self.out = out
        self.display = ProgressDisplay(out)  # per-rank load bars on a terminal, plain lines otherwise
        self.placement: Placement = plan_placement(config)
        self.run_dir = RunDir.for_cluster(config)
        self.procs: list = []
        self.restarts = 0
        self.group_started_at = time.monotonic()
        self.stopping = False
        self.http_socket: socket.socket | None = None
        self._out_lock = threading.Lock()
        self._stop_signals = 0

    # ---- output ---------------------------------------------------------------------
    def on_line(self, rank: int, host: str, line: str) -> None:
        with self._out_lock:
            self.display.line(rank, f"[rank {rank} {host}] {line}")
            self.run_dir.append_log(rank, line)

    def say(self, message: str) -> None:
        with self._out_lock:
            self.display.line(None, f"mlx-cluster: {message}")

    # ---- lifecycle ------------------------------------------------------------------
    def prepare(self) -> None:
        """Checks that need nothing running: another launcher, busy ports, the HTTP socket."""
        self.run_dir.claim()
        check_local_ports(self.placement)
        if any(r.is_local for r in self.placement.ranks):
            error = backend_device_error(self.placement.backend, self.placement.world_size, cuda_available())
            if error:
                raise ConfigError(error)
        self._check_model()
        rank0 = self.placement.ranks[0]
        if rank0.is_local:
            server = self.config.server
            check_port_free(server.host, server.port, "server.port")
            family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((server.host, server.port))
            sock.listen(2048)
            self.http_socket = sock
        self._check_exposure()

    def _check_model(self) -> None:
        """Fail before starting anything when the model cannot be split over this many ranks
        (otherwise every restart would fail the same way at load time)."""
        import json
        from pathlib import Path

        from mlx_cluster.launcher.layout import parallel_sizes, plan_text
        from mlx_cluster.models.builtin import resolve_model_path
        from mlx_cluster.models.loader import check_tensor_parallel

        model = self.config.model
        for i, other in enumerate(self.config.models or []):  # several models: each must exist too
            if other.name != model.name and (self.placement.ranks[0].is_local or other.path.startswith("builtin:")):
                try:
                    resolve_model_path(other.path, other.builtin_dir)
                except ValueError as e:
                    raise ConfigError(f"models.{i}.path: {e}") from None
        if not self.placement.ranks[0].is_local and not model.path.startswith("builtin:"):
            return  # the path names a directory on the remote hosts
        try:
            path = Path(resolve_model_path(model.path, model.builtin_dir)).expanduser()
        except ValueError as e:
            raise ConfigError(f"model.path: {e}") from None
        config_file = path / "config.json"
        if not config_file.is_file():
            return  # a Hugging Face id or a remote-only path: the ranks resolve it
        try:
            # The tensor x pipeline layout, checked and shown before anything starts.
            world = self.placement.world_size
            self.say("placement:\n" + plan_text(self.config, path, world))
            sizes = parallel_sizes(self.config, world)  # None: auto, decided at start-up
            check_tensor_parallel(json.loads(config_file.read_text()), sizes[0] if sizes else 1)
        except ValueError as e:
            raise ConfigError(f"model {model.path}: {e}") from None

    def _check_exposure(self) -> None:
        from mlx_cluster.server.auth import load_api_keys

        server = self.config.server
        if not self.placement.ranks[0].is_local:
            # Rank 0 reads the key file on its own host; here we can only see that one is set.
            if not (server.api_key_file or os.environ.get("MLX_CLUSTER_API_KEY") or server.allow_insecure):
                raise ConfigError(
                    "rank 0 runs on another host: set server.api_key_file (a path on that host), "
                    "MLX_CLUSTER_API_KEY, or server.allow_insecure: true"
                )
            return
        try:
            keys = load_api_keys(server.api_key_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        loopback = server.host in ("127.0.0.1", "localhost", "::1")
        if not keys and not loopback and not server.allow_insecure:
            raise ConfigError(
                f"server.host is {server.host}, reachable from other machines, but no API key is set: "
                "set server.api_key_file (or MLX_CLUSTER_API_KEY), or server.allow_insecure: true to serve without one"
            )

    def start_group(self) -> None:
        token = secrets.token_hex(16)
        cfg_json = dump_config(self.config)
        self.procs = []
        for spec in self.placement.ranks:
            env = {
                **self.config.cluster.env,
                **spec.env,
                "MLX_CLUSTER_CONFIG": cfg_json,
                "MLX_CLUSTER_BUS_TOKEN": token,
                "MLX_CLUSTER_RESTARTS": str(self.restarts),  # shown on the dashboard
            }
            if spec.rank == 0 and self.http_socket is not None:
                env["MLX_CLUSTER_HTTP_FD"] = str(self.http_socket.fileno())
            argv = [
                self.config.cluster.python or (sys.executable if spec.is_local else "python3"),
                "-m",
                "mlx_cluster.runtime.rank",
            ]
            if spec.is_local:
                # Only rank 0 serves HTTP, so only rank 0 may see the API key.
                inherited = {k: v for k, v in os.environ.items() if spec.rank == 0 or k not in SECRET_ENV}
                fds = (self.http_socket.fileno(),) if "MLX_CLUSTER_HTTP_FD" in env else ()
                proc = LocalRankProcess(
                    spec.rank,
                    spec.host,
                    argv,
                    {**inherited, **env},
                    self.config.cluster.cwd,
                    self.on_line,
                    pass_fds=fds,
                )
            else:
                from mlx_cluster.launcher.ssh import RemoteRankProcess

                if spec.rank == 0:
                    env.update({k: os.environ[k] for k in SECRET_ENV if k in os.environ})
                proc = RemoteRankProcess(
                    spec.rank, spec.host, self.config.ssh, argv, env, self.config.cluster.cwd, self.on_line
                )
            proc.start()
            self.procs.append(proc)
        self.run_dir.write_state(self, status="running")
        threading.Thread(target=self._announce_ready, args=(self.procs,), daemon=True).start()

    def _announce_ready(self, procs: list) -> None:
        url = self.http_url()
        deadline = time.monotonic() + self.config.supervisor.startup_timeout_s
        while time.monotonic() < deadline and procs is self.procs and not self.stopping:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        self.say(
                            f"ready: {self.placement.world_size} rank(s) serving "
                            f"{self.config.model.served_name} at {url}/v1"
                        )
                        return
            except OSError:
                pass
            time.sleep(0.5)

    def http_url(self) -> str:
        server = self.config.server
        host = server.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        elif not self.placement.ranks[0].is_local and host in ("127.0.0.1", "localhost"):
            host = (
                self.placement.ranks[0].host.ips[0]
                if self.placement.ranks[0].host.ips
                else self.placement.ranks[0].host.host
            )
        return f"http://{host}:{server.port}"

    def first_exit(self) -> tuple[int, int] | None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                return proc.rank, code
        return None

    def stop_group(self, graceful: bool, already_stopping: bool = False) -> None:
        """Graceful: SIGTERM to rank 0 (it drains, then stops every rank), unless the group is
        already stopping by itself. Then SIGKILL stragglers."""
        if graceful and self.procs:
            if not already_stopping:
                self.procs[0].signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.supervisor.drain_timeout_s + 15
        else:
            deadline = time.monotonic() + FAILURE_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            if self._stop_signals > 1:
                break  # a second Ctrl-C: stop waiting
            time.sleep(0.05)
        for proc in self.procs:
            if proc.poll() is None:
                self.say(f"rank {proc.rank} did not stop in time; killing it")
                proc.kill()
        for proc in self.procs:
            proc.wait(5)
            proc.close()

    def run(self) -> int:
        self.prepare()
        self.install_signal_handlers()
        sup = self.config.supervisor
        self.say(
            f"starting {self.placement.world_size} rank(s) of cluster {self.config.cluster.name!r} "
            f"({self.placement.backend}); logs in {self.run_dir.path}"
        )
        try:
            while True:
                failure = self.run_group()
                if failure is None:
                    self.run_dir.write_state(self, status="stopped")
                    self.say("stopped")
                    return 0
                self.say(f"{failure}; stopping the group")
                self.stop_group(graceful=False)
                if time.monotonic() - self.group_started_at > sup.restart_window_s:
                    self.restarts = 0  # it ran healthy for a while: this is not a crash loop
                if sup.restart == "never" or self.restarts >= sup.max_restarts:
                    why = (
                        "restart: never"
                        if sup.restart == "never"
                        else f"{self.restarts} restart(s), max_restarts reached"
                    )
                    self.run_dir.write_state(self, status="failed")
                    self.say(f"giving up ({why}); see the rank logs in {self.run_dir.path}")
                    return 1
                self.restarts += 1
                delay = min(sup.backoff_s * (2 ** (self.restarts - 1)), 60.0)
                self.run_dir.write_state(self, status="restarting")
                self.say(f"restarting the group in {delay:.1f} s (restart {self.restarts} of {sup.max_restarts})")
                if self._sleep_unless_stopping(delay):
                    self.run_dir.write_state(self, status="stopped")
                    return 0
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            if self.http_socket is not None:
                self.http_socket.close()
            self.run_dir.release()

    def run_group(self) -> str | None:
        """Start the group and watch it; None after a clean stop, else what went wrong."""
        self.group_started_at = time.monotonic()
        try:
            self.start_group()
        except Exception as e:  # a rank that cannot be launched (SSH refused, bad python, ...)
            return f"could not start the group: {e}"
        exited = self.wait_for_exit()
        if exited is None:  # Ctrl-C / SIGTERM to the launcher
            self.stop_group(graceful=True)
            return None
        if exited[1] == 0:  # rank 0 drained and the group is shutting down (SIGTERM sent to rank 0 directly)
            self.stop_group(graceful=True, already_stopping=True)
            return None
        rank, code = exited
        return f"rank {rank} exited with code {code}"

    def wait_for_exit(self) -> tuple[int, int] | None:
        while not self.stopping:
            exited = self.first_exit()
            if exited is not None:
                return exited
            time.sleep(0.1)
        return None

    def _sleep_unless_stopping(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stopping:
                return True
            time.sleep(0.05)
        return self.stopping

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self._stop_signals += 1
            if not self.stopping:
                self.say(f"{signal.Signals(signum).name}: draining and stopping the cluster")
            self.stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)


def run_cluster(config: ClusterConfig, config_path: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return Supervisor(config, config_path).run()
