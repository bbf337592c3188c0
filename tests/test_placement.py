"""Rank placement and the per-backend environment mx.distributed reads."""

import json
import socket

import pytest

from mlx_cluster.config import ConfigError, load_config
from mlx_cluster.launcher.placement import check_local_ports, plan_placement, write_hostfile


def files(spec):
    return {k: json.loads(v) for k, v in json.loads(spec.env["MLX_CLUSTER_FILES"]).items()}


def test_ring_two_local_ranks():
    cfg = load_config(None, ["hosts=[{host: localhost, ranks: 2}]", "cluster.base_port=6000"])
    p = plan_placement(cfg)
    assert p.world_size == 2
    assert [s.env["MLX_RANK"] for s in p.ranks] == ["0", "1"]
    assert files(p.ranks[0])["MLX_HOSTFILE"] == [["127.0.0.1:6000"], ["127.0.0.1:6001"]]
    assert p.doorbell == ("127.0.0.1", 6002)


def test_ring_connections_per_ip_and_remote_hosts():
    cfg = load_config(
        None,
        [
            "hosts=[{host: localhost, ips: [10.0.0.1]}, {host: b, ips: [10.0.0.2, 10.0.1.2]}]",
            "cluster.connections_per_ip=2",
            "cluster.base_port=7000",
        ],
    )
    p = plan_placement(cfg)
    assert files(p.ranks[1])["MLX_HOSTFILE"] == [
        ["10.0.0.1:7000", "10.0.0.1:7001"],
        ["10.0.0.2:7002", "10.0.0.2:7003", "10.0.1.2:7004", "10.0.1.2:7005"],
    ]
    assert not p.ranks[1].is_local


def test_remote_host_needs_ips():
    cfg = load_config(None, ["hosts=[{host: localhost}, {host: mac-b}]"])
    with pytest.raises(ConfigError, match=r"hosts\[1\] \(mac-b\).*ips"):
        plan_placement(cfg)


def test_nccl_one_gpu_per_rank():
    cfg = load_config(None, ["cluster.backend=nccl", "hosts=[{host: localhost, ranks: 4, gpus: [3, 2, 1, 0]}]"])
    p = plan_placement(cfg)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in p.ranks] == ["3", "2", "1", "0"]
    assert p.ranks[0].env["MLX_WORLD_SIZE"] == "4"
    assert p.ranks[0].env["NCCL_HOST_IP"] == "127.0.0.1"
    assert p.ranks[2].env["NCCL_PORT"] == str(cfg.cluster.base_port)


def test_jaccl_matrix_and_checks():
    ok = "hosts=[{host: localhost, ips: [10.0.0.1], rdma: [null, rdma_en3]}, {host: b, ips: [10.0.0.2], rdma: [rdma_en3, null]}]"
    p = plan_placement(load_config(None, ["cluster.backend=jaccl", ok]))
    assert files(p.ranks[0])["MLX_IBV_DEVICES"] == [[None, "rdma_en3"], ["rdma_en3", None]]
    assert p.ranks[0].env["MLX_JACCL_COORDINATOR"].startswith("10.0.0.1:")
    bad = "hosts=[{host: localhost, ips: [10.0.0.1], rdma: [rdma_en2, rdma_en3]}, {host: b, ips: [10.0.0.2], rdma: [rdma_en3, null]}]"
    with pytest.raises(ConfigError, match="must be null"):
        plan_placement(load_config(None, ["cluster.backend=jaccl", bad]))


def test_busy_port_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = load_config(None, ["hosts=[{host: localhost, ranks: 2}]", f"cluster.base_port={port}"])
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is not available"):
            check_local_ports(plan_placement(cfg))


def test_http_port_inside_the_rank_ports_is_refused():
    """server.port on a port rank 1 binds would fail rank 1 on every restart; refused up front."""
    cfg = load_config(None, ["hosts=[{host: localhost, ranks: 2}]", "cluster.base_port=6000", "server.port=6001"])
    with pytest.raises(ConfigError, match=r"server.port=6001 is also a port .*6000-6003.*outside that range"):
        plan_placement(cfg)
    plan_placement(load_config(None, ["hosts=[{host: localhost, ranks: 2}]", "cluster.base_port=6000"]))  # 8000: fine


def test_hostfile_is_mlx_launch_format():
    cfg = load_config(None, ["hosts=[{host: localhost, ranks: 2}]", "cluster.env={A: b}"])
    data = json.loads(write_hostfile(cfg))
    assert data["backend"] == "ring" and data["envs"] == ["A=b"]
    assert data["hosts"] == [{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 2


def test_tensor_parallel_size_is_checked_before_anything_starts(tmp_path, tiny_model_path):
    from mlx_cluster.launcher.supervisor import Supervisor

    cfg = load_config(
        None, ["hosts=[{host: localhost, ranks: 3}]", f"model.path={tiny_model_path}", f"cluster.run_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"4 KV heads, which 3 ranks cannot split evenly.*\(1, 2, 4\)"):
        Supervisor(cfg, None)._check_model()


def test_ring_and_jaccl_are_refused_on_nvidia_gpus_naming_nccl():
    from mlx_cluster.launcher.placement import backend_device_error

    for backend in ("ring", "jaccl", "jaccl-ring"):
        error = backend_device_error(backend, world_size=2, cuda_available=True)
        assert f"cluster.backend: {backend}" in error and "set cluster.backend: nccl" in error
        assert backend_device_error(backend, world_size=2, cuda_available=False) is None  # Macs, CPUs
        assert backend_device_error(backend, world_size=1, cuda_available=True) is None  # no collectives
    assert backend_device_error("nccl", world_size=2, cuda_available=True) is None
