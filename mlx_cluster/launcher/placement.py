"""Where each rank runs and the environment mx.distributed reads there.

Pure functions of the config: rank numbering follows the host order; each backend gets the
variables `mlx.launch` would set (see mlx/_distributed_utils/launch.py):

* ring: MLX_RANK, MLX_HOSTFILE -> JSON list per rank of "ip:port" (one port per connection)
* jaccl / jaccl-ring: MLX_RANK, MLX_JACCL_COORDINATOR, MLX_IBV_DEVICES -> N x N JSON matrix
* nccl: MLX_RANK, MLX_WORLD_SIZE, NCCL_HOST_IP, NCCL_PORT, CUDA_VISIBLE_DEVICES (one GPU per rank)

Variables that must name a file are shipped as content in MLX_CLUSTER_FILES and written to
a temporary file by the rank itself, so the same mechanism works on remote hosts.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

from mlx_cluster.config import ClusterConfig, ConfigError, HostSection


@dataclass(frozen=True)
class RankSpec:
    rank: int
    host: HostSection
    local_index: int  # which of its host's ranks this is
    env: dict[str, str] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.host.is_local


@dataclass(frozen=True)
class Placement:
    world_size: int
    backend: str
    ranks: tuple[RankSpec, ...]
    doorbell: tuple[str, int]  # rank 0's address for the bus doorbell
    ports: tuple[tuple[str, int], ...]  # every (ip, port) the group will listen on
    status_link: tuple[str, int] | None = None  # rank 0's address for the workers' status reports


def _ips(host: HostSection, index: int, backend: str) -> list[str]:
    if host.ips:
        return host.ips
    if host.is_local:
        return ["127.0.0.1"]
    raise ConfigError(
        f"hosts[{index}] ({host.host}): the {backend} backend needs the IP addresses the ranks talk over; "
        f"add ips: [x.x.x.x] to that host"
    )


def plan_placement(config: ClusterConfig) -> Placement:
    hosts = config.host_list()
    backend = config.cluster.backend
    base = config.cluster.base_port
    specs: list[tuple[int, HostSection, int]] = []
    for index, host in enumerate(hosts):
        for local_index in range(host.ranks):
            specs.append((index, host, local_index))
    world = len(specs)
    ips0 = _ips(hosts[0], 0, backend) if world > 1 else ["127.0.0.1"]
    ports: list[tuple[str, int]] = []
    # Read by the rank before it parses its config (parsing imports mlx-lm, and so mlx).
    common: dict[str, str] = {"MLX_CLUSTER_CPU_BLAS": config.cluster.cpu_blas}
    per_rank: list[dict[str, str]] = [{} for _ in specs]
    next_port = base

    if world > 1 and backend == "ring":
        ring = []
        for host_index, host, _ in specs:
            entries = []
            for ip in _ips(host, host_index, backend):
                for _ in range(config.cluster.connections_per_ip):
                    entries.append(f"{ip}:{next_port}")
                    ports.append((ip, next_port))
                    next_port += 1
            ring.append(entries)
        common["MLX_CLUSTER_FILES"] = json.dumps({"MLX_HOSTFILE": json.dumps(ring)})
    elif world > 1 and backend in ("jaccl", "jaccl-ring"):
        _check_rdma(hosts, specs, backend)
        matrix = [host.rdma for _, host, _ in specs]
        common["MLX_JACCL_COORDINATOR"] = f"{ips0[0]}:{next_port}"
        common["MLX_CLUSTER_FILES"] = json.dumps({"MLX_IBV_DEVICES": json.dumps(matrix)})
        if backend == "jaccl-ring":
            common["MLX_JACCL_RING"] = "1"
        ports.append((ips0[0], next_port))
        next_port += 1
    elif world > 1 and backend == "nccl":
        common.update({"NCCL_HOST_IP": ips0[0], "NCCL_PORT": str(next_port), "MLX_WORLD_SIZE": str(world)})
        ports.append((ips0[0], next_port))
        next_port += 1
        for i, (_, host, local_index) in enumerate(specs):
            gpus = host.gpus if host.gpus is not None else list(range(host.ranks))
            if local_index >= len(gpus):
                raise ConfigError(f"host {host.host} runs {host.ranks} ranks but lists only {len(gpus)} gpus")
            per_rank[i]["CUDA_VISIBLE_DEVICES"] = str(gpus[local_index])
    elif world > 1 and backend == "mpi":
        raise ConfigError("cluster.backend: mpi is started by mpirun, not by mlx-cluster; use ring, jaccl or nccl")

    doorbell = (ips0[0], next_port)
    status_link = (ips0[0], next_port + 1)  # runtime/status_link.py: per-rank reports for the dashboard
    if world > 1:
        ports += [doorbell, status_link]
    _check_http_port_apart(config, ips0, ports)
    ranks = []
    for i, (_, host, local_index) in enumerate(specs):
        env = {
            **common,
            **per_rank[i],
            "MLX_RANK": str(i),
            "MLX_CLUSTER_WORLD_SIZE": str(world),
            "MLX_CLUSTER_LOCAL_RANKS": str(host.ranks),  # how many share this host's cores
            "MLX_CLUSTER_BACKEND": backend,
            "MLX_CLUSTER_DOORBELL": f"{doorbell[0]}:{doorbell[1]}",
            "MLX_CLUSTER_STATUS_LINK": f"{status_link[0]}:{status_link[1]}",
        }
        ranks.append(RankSpec(rank=i, host=host, local_index=local_index, env=env))
    return Placement(world, backend, tuple(ranks), doorbell, tuple(ports), status_link)


def _check_http_port_apart(config: ClusterConfig, ips0: list[str], ports: list[tuple[str, int]]) -> None:
    """Rank 0's HTTP server binds server.port on the first host; a rank port there with the same
    number would fail its bind on every restart (seen as `[ring] Couldn't bind socket`)."""
    used = [port for ip, port in ports if ip in ips0]
    if config.server.port in used:
        raise ConfigError(
            f"server.port={config.server.port} is also a port the ranks talk over on "
            f"{config.host_list()[0].host} (cluster.base_port={config.cluster.base_port} takes "
            f"{min(used)}-{max(used)} there): choose a server.port outside that range, or another cluster.base_port"
        )


def _check_rdma(hosts, specs, backend: str) -> None:
    n = len(specs)
    for index, host in enumerate(hosts):
        if host.ranks != 1:
            raise ConfigError(f"hosts[{index}]: the {backend} backend runs one rank per host (ranks: 1)")
        if len(host.rdma) != n:
            raise ConfigError(f"hosts[{index}].rdma must list {n} entries (one per rank, null for itself)")
        if host.rdma[index] is not None:
            raise ConfigError(f"hosts[{index}].rdma[{index}] must be null: a host has no RDMA link to itself")
    ring = backend == "jaccl-ring"
    for i, host in enumerate(hosts):
        peers = ((i - 1) % n, (i + 1) % n) if ring else range(n)
        for j in peers:
            if j != i and host.rdma[j] is None:
                raise ConfigError(f"hosts[{i}].rdma[{j}]: no RDMA device from {host.host} to {hosts[j].host}")


def write_hostfile(config: ClusterConfig) -> str:
    """mlx.launch's hostfile format: one entry per rank, with the backend and env."""
    placement = plan_placement(config)
    hosts = []
    for spec in placement.ranks:
        entry = {"ssh": spec.host.host, "ips": spec.host.ips or (["127.0.0.1"] if spec.is_local else [])}
        if spec.host.rdma:
            entry["rdma"] = spec.host.rdma
        hosts.append(entry)
    envs = [f"{k}={v}" for k, v in sorted(config.cluster.env.items())]
    return json.dumps({"backend": config.cluster.backend, "envs": envs, "hosts": hosts}, indent=2) + "\n"


def check_local_ports(placement: Placement) -> None:
    """Fail early, naming the port, if a port the group needs on this machine is taken."""
    local_ips = {"127.0.0.1", "::1", "0.0.0.0"}
    local_ips.update(ip for spec in placement.ranks if spec.is_local for ip in spec.host.ips)
    for ip, port in placement.ports:
        if ip not in local_ips:
            continue
        check_port_free(ip, port, f"cluster.base_port range ({ip}:{port})")


def check_port_free(ip: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            raise ConfigError(
                f"{what}: port {port} on {ip} is not available ({e.strerror}); "
                f"stop what uses it or choose another with --set cluster.base_port=N / server.port=N"
            ) from None


def backend_device_error(backend: str, world_size: int, cuda_available: bool) -> str | None:
    """Why `backend` cannot join ranks on this machine's device, or None when it can.

    ring and JACCL run their collectives on the CPU stream. On an NVIDIA GPU those collectives
    end up inside MLX's CUDA graph capture and both ranks abort at the first model step
    (`cudaStreamEndCapture ... failed`, seen with mlx 0.32): refuse it up front instead.
    """
    if world_size > 1 and cuda_available and backend in ("ring", "jaccl", "jaccl-ring"):
        return (
            f"cluster.backend: {backend} cannot join ranks that run on NVIDIA GPUs (its CPU-side "
            "collectives break MLX's CUDA graphs); set cluster.backend: nccl"
        )
    return None


def cuda_available() -> bool:
    """Whether MLX on this machine runs on CUDA (imports mlx, so only where a check needs it)."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())
