#!/usr/bin/env python3
"""Entrypoint of one mlx-cluster rank in a Kubernetes StatefulSet pod.

`mlx-cluster up` is not used in Kubernetes: the StatefulSet starts one pod per rank and this
script gives each pod the environment the launcher would have given it, then execs
`python -m mlx_cluster.runtime.rank` (which becomes the container's main process, so
SIGTERM from the kubelet reaches it directly: rank 0 drains, workers wait for rank 0).

What it does:

1. rank = the ordinal at the end of the pod's hostname (`mlx-cluster-2` -> rank 2);
2. resolves every rank's IP with `getent hosts <statefulset>-<i>.<headless service>`
   (mx.distributed's ring backend takes IP addresses, not names), waiting until every pod
   has one; its own IP comes from POD_IP (downward API) when set;
3. reads cluster.yaml (a ConfigMap), forces server.host/server.port from the pod spec, and
   writes the peers into `hosts:` (one rank per pod);
4. computes the rank's environment with the launcher's own `plan_placement()`, so ports,
   the ring hostfile, the doorbell and the NCCL variables are exactly what `mlx-cluster up`
   would produce;
5. refuses to serve beyond loopback without an API key (as the launcher does), removes the
   API key from every rank but 0, and execs the rank.

Environment read here (set in statefulset.yaml):

  MLX_CLUSTER_WORLD_SIZE     number of ranks; must equal the StatefulSet's replicas
  MLX_CLUSTER_SERVICE        name of the headless Service (pod DNS: <pod>.<service>)
  MLX_CLUSTER_CONFIG_FILE    cluster.yaml path (default /etc/mlx-cluster/cluster.yaml)
  MLX_CLUSTER_HTTP_HOST      server.host for rank 0 (default 0.0.0.0)
  MLX_CLUSTER_HTTP_PORT      server.port for rank 0 (default: the value in cluster.yaml)
  MLX_CLUSTER_BUS_TOKEN      doorbell token, the same on every rank (from a Secret)
  MLX_CLUSTER_API_KEY        API key(s), comma-separated (from a Secret); kept on rank 0 only
  POD_IP                     this pod's IP (downward API), optional
  MLX_CLUSTER_DNS_TIMEOUT_S  how long to wait for peers' DNS names (default 600)

`entrypoint.py --print-env` prints the environment it would exec with (secrets redacted)
and exits, for debugging a pod: `kubectl exec mlx-cluster-1 -- python3 /opt/mlx-cluster/entrypoint.py --print-env`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time

CONFIG_FILE = "/etc/mlx-cluster/cluster.yaml"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECRET_NAMES = ("MLX_CLUSTER_BUS_TOKEN", "MLX_CLUSTER_API_KEY")


def fail(message: str, code: int = 2) -> None:
    print(f"mlx-cluster entrypoint: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def say(message: str) -> None:
    print(f"mlx-cluster entrypoint: {message}", file=sys.stderr, flush=True)


def pod_identity(hostname: str) -> tuple[str, int]:
    """(statefulset name, ordinal) from a StatefulSet pod's hostname, e.g. ('mlx-cluster', 1)."""
    match = re.fullmatch(r"(.+)-(\d+)", hostname)
    if not match:
        fail(f"hostname {hostname!r} does not end in -<ordinal>; run this in a StatefulSet pod")
    return match.group(1), int(match.group(2))


def getent(name: str) -> str | None:
    """The first address `getent hosts` gives for name (NSS, like the C library), or None."""
    try:
        out = subprocess.run(["getent", "hosts", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields:
            try:
                return str(ipaddress.ip_address(fields[0]))
            except ValueError:
                continue
    return None


def resolve_peers(names: list[str], own_rank: int, own_ip: str | None, timeout_s: float) -> list[str]:
    """Every rank's IP, in rank order; waits for pods that have no DNS record yet."""
    ips: list[str | None] = [None] * len(names)
    if own_ip:
        ips[own_rank] = own_ip
    deadline = time.monotonic() + timeout_s
    next_report = 0.0
    while True:
        for i, name in enumerate(names):
            if ips[i] is None:
                ips[i] = getent(name)
        missing = [names[i] for i, ip in enumerate(ips) if ip is None]
        if not missing:
            return [ip for ip in ips if ip is not None]
        now = time.monotonic()
        if now > deadline:
            fail(
                f"no address for {', '.join(missing)} after {timeout_s:.0f} s; are those pods scheduled, and does "
                "the headless Service set publishNotReadyAddresses: true?",
                code=1,
            )
        if now >= next_report:
            say(f"waiting for DNS records of {', '.join(missing)}")
            next_report = now + 10
        time.sleep(1.0)


def build_environment(environ: dict[str, str]) -> tuple[int, dict[str, str]]:
    """(rank, the environment to exec the rank with). Exits with a message on bad input."""
    import yaml

    from mlx_cluster.config import ConfigError, dump_config, load_config
    from mlx_cluster.launcher.placement import plan_placement
    from mlx_cluster.server.auth import load_api_keys

    hostname = environ.get("HOSTNAME") or socket.gethostname()
    statefulset, rank = pod_identity(hostname.split(".")[0])
    try:
        world = int(environ["MLX_CLUSTER_WORLD_SIZE"])
    except (KeyError, ValueError):
        fail("set MLX_CLUSTER_WORLD_SIZE to the number of ranks (the StatefulSet's replicas)")
    if not 0 <= rank < world:
        fail(f"pod {hostname} has ordinal {rank}, but MLX_CLUSTER_WORLD_SIZE is {world}: keep it equal to replicas")
    service = environ.get("MLX_CLUSTER_SERVICE")
    if world > 1 and not service:
        fail("set MLX_CLUSTER_SERVICE to the headless Service's name")

    path = environ.get("MLX_CLUSTER_CONFIG_FILE", CONFIG_FILE)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read {path}: {e}")
    if isinstance(raw, dict) and (raw.get("hosts") is not None or raw.get("hostfile") is not None):
        fail(f"{path}: remove hosts:/hostfile: — in Kubernetes the StatefulSet decides where ranks run")

    names = [f"{statefulset}-{i}.{service}" for i in range(world)] if world > 1 else [hostname]
    if world > 1:
        timeout_s = float(environ.get("MLX_CLUSTER_DNS_TIMEOUT_S", "600"))
        ips = resolve_peers(names, rank, environ.get("POD_IP") or None, timeout_s)
    else:
        ips = [environ.get("POD_IP") or "127.0.0.1"]
    # gpus: [0]: the device plugin shows each pod its own GPU as device 0 (nccl only).
    hosts = [{"host": f"{statefulset}-{i}", "ranks": 1, "ips": [ip], "gpus": [0]} for i, ip in enumerate(ips)]
    overrides = [f"server.host={environ.get('MLX_CLUSTER_HTTP_HOST', '0.0.0.0')}", f"hosts={json.dumps(hosts)}"]
    if environ.get("MLX_CLUSTER_HTTP_PORT"):
        overrides.append(f"server.port={environ['MLX_CLUSTER_HTTP_PORT']}")
    try:
        config = load_config(path, overrides)
        placement = plan_placement(config)
    except ConfigError as e:
        fail(str(e))

    token = environ.get("MLX_CLUSTER_BUS_TOKEN", "")
    if world > 1 and len(token) < 16:
        fail("set MLX_CLUSTER_BUS_TOKEN (at least 16 characters, from a Secret) on every rank")
    if rank == 0:
        server = config.server
        try:
            keys = load_api_keys(server.api_key_file, environ)
        except ValueError as e:
            fail(str(e))
        if not keys and server.host not in LOOPBACK and not server.allow_insecure:
            fail(
                f"server.host is {server.host}, reachable from other pods, but no API key is set: set "
                "MLX_CLUSTER_API_KEY from a Secret (or server.api_key_file), or server.allow_insecure: true"
            )

    spec = placement.ranks[rank]
    env = {k: v for k, v in environ.items() if rank == 0 or k != "MLX_CLUSTER_API_KEY"}
    env.update(config.cluster.env)
    env.update(spec.env)
    env["MLX_CLUSTER_CONFIG"] = dump_config(config)
    env["MLX_CLUSTER_BUS_TOKEN"] = token
    env["PYTHONUNBUFFERED"] = "1"
    say(
        f"rank {rank} of {world} ({config.cluster.backend}); ranks at {', '.join(ips)}; "
        f"doorbell {env['MLX_CLUSTER_DOORBELL']}"
    )
    return rank, env


def main(argv: list[str]) -> None:
    rank, env = build_environment(dict(os.environ))
    if "--print-env" in argv:
        shown = {
            k: ("<redacted>" if k in SECRET_NAMES and v else v)
            for k, v in env.items()
            if k.startswith(("MLX_", "NCCL_", "CUDA_"))
        }
        print(json.dumps(shown, indent=2, sort_keys=True))
        return
    argv = [sys.executable, "-m", "mlx_cluster.runtime.rank"]
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
