"""Real multi-host: one rank in each of two network namespaces, started over SSH (paramiko,
host-key checking on) by `mlx-cluster up`, talking ring over veth pairs and a bridge."""

import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.cluster import REPO, Cluster, free_port, survivors
from tests.netns import needs_netns, ssh_hosts  # noqa: F401  (fixture)

pytestmark = [needs_netns, pytest.mark.slow]
API_KEY = "sk-test-multihost-7f3a"


def multihost_cluster(tmp_path, models_dir, hosts, **ssh_overrides) -> Cluster:
    port = free_port()
    ssh = hosts.ssh_section(**ssh_overrides).model_dump()
    cluster = Cluster(
        tmp_path,
        models_dir=models_dir,
        env={"MLX_CLUSTER_API_KEY": API_KEY},
        config={
            "cluster": {"python": sys.executable, "cwd": str(REPO), "base_port": 5600},
            "hosts": [{"host": ip, "ips": [ip]} for ip in hosts.ips],
            "ssh": ssh,
            "server": {"host": hosts.ips[0], "port": port},
        },
    )
    cluster.url = f"http://{hosts.ips[0]}:{port}"
    return cluster


def test_two_hosts_over_ssh_serve_requests(tmp_path, models_dir, ssh_hosts):  # noqa: F811
    cluster = multihost_cluster(tmp_path, models_dir, ssh_hosts)
    with cluster:
        pids = cluster.rank_pids()
        # Each rank really runs inside its own namespace (its own "host").
        assert [ssh_hosts.namespace_of(p) for p in pids] == ssh_hosts.namespaces
        client = cluster.openai(api_key=API_KEY)
        r = client.chat.completions.create(
            model="builtin:tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )
        assert r.usage.completion_tokens == 8
        assert httpx.get(cluster.url + "/v1/models", timeout=5).status_code == 401
        # The API key is on no command line and in no log.
        for pid in pids:
            assert API_KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert API_KEY not in cluster.output()
        for log in (Path(cluster.config["cluster"]["run_dir"]) / cluster.name).glob("rank*.log"):
            assert API_KEY not in log.read_text()
    assert not survivors(pids, 10), "remote ranks outlived `up`"


def test_remote_ranks_die_with_their_launcher(tmp_path, models_dir, ssh_hosts):  # noqa: F811
    with multihost_cluster(tmp_path, models_dir, ssh_hosts) as cluster:
        pids = cluster.rank_pids()
        cluster.proc.send_signal(signal.SIGKILL)
        cluster.proc.wait()
        assert not survivors(pids, 15), "remote ranks outlived their launcher"


def test_unknown_host_key_is_refused(tmp_path, models_dir, ssh_hosts):  # noqa: F811
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cluster = multihost_cluster(tmp_path, models_dir, ssh_hosts, known_hosts=str(empty))
    cluster.config["supervisor"]["restart"] = "never"
    import yaml

    cluster.config_path.write_text(yaml.safe_dump(cluster.config))
    try:
        cluster.start(wait=False)
        assert cluster.proc.wait(60) != 0
        out = cluster.output()
        assert "known_hosts" in out and ssh_hosts.ips[0] in out and "ssh-keyscan" in out
        assert "Traceback" not in out
    finally:
        cluster.stop()
