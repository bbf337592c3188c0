"""The deployment files under launch/ and the configuration docs stay true to the code.

* YAML/JSON/plist files parse; the Grafana dashboard and the alert rules reference only metric
  names that `mlx_cluster.server.metrics.Metrics` registers (with prometheus_client's suffixes);
* the Kubernetes manifests probe /livez and /readyz, and give rank 0 time to drain;
* the systemd unit and the launchd plist wait longer than the launcher's drain deadline;
* the Kubernetes entrypoint produces the launcher's environment contract, and (slow) two ranks
  started through it on loopback form a group, serve, and exit 0 on SIGTERM;
* docs/configuration.md mentions every key of cluster.yaml and its default example is valid.
"""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mlx_cluster.config import ClusterConfig, SupervisorSection, load_config, parse_config
from tests.cluster import free_port, free_port_block, pid_alive

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
K8S = LAUNCH / "k8s"
DASHBOARD = LAUNCH / "grafana" / "mlx-cluster.json"
METRIC_TOKEN = re.compile(r"\bmlx_cluster_[a-z0-9_]+")
# The launcher SIGKILLs ranks drain_timeout_s + 15 s after a stop began (supervisor.stop_group);
# a service manager must wait at least that long before killing the launcher itself.
LAUNCHER_GRACE_S = 15


def exposed_metric_names() -> set[str]:
    """Every sample name /metrics can contain, from the real registry."""
    from mlx_cluster.server.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = set()
    for family in Metrics("m").registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]


# ---- files parse --------------------------------------------------------------------------


def test_yaml_and_json_files_parse():
    yaml_files = sorted([*LAUNCH.rglob("*.yaml"), *LAUNCH.rglob("*.yml")])
    assert len(yaml_files) >= 8
    for path in yaml_files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
    for path in LAUNCH.rglob("*.json"):
        json.loads(path.read_text())
    for path in LAUNCH.rglob("*.plist"):
        plistlib.loads(path.read_bytes())


def test_k8s_cluster_yaml_is_a_valid_config():
    config = load_config(K8S / "cluster.yaml")
    assert config.hosts is None and config.hostfile is None  # entrypoint.py fills hosts: itself


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = list(kustomization["resources"])
    for generator in kustomization["configMapGenerator"]:
        files += generator["files"]
    for name in files:
        assert (K8S / name).is_file(), name
    assert {"entrypoint.py", "probe.py", "cluster.yaml"} <= set(files)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"StatefulSet", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


# ---- metric names -----------------------------------------------------------------------------


def test_dashboard_uses_only_defined_metric_names():
    exposed = exposed_metric_names()
    used = {token for expr in dashboard_exprs() for token in METRIC_TOKEN.findall(expr)}
    assert used, "the dashboard references no metric"
    unknown = sorted(used - exposed)
    assert not unknown, f"not defined in mlx_cluster/server/metrics.py: {unknown}"


def test_dashboard_covers_the_essentials():
    exprs = dashboard_exprs()
    text = "\n".join(exprs)
    for name in (
        "mlx_cluster_generation_tokens_total",
        "mlx_cluster_num_requests_running",
        "mlx_cluster_num_requests_waiting",
        "mlx_cluster_kv_cache_usage_perc",
        "mlx_cluster_prefix_cache_hits_total",
        "mlx_cluster_prefix_cache_queries_total",
        "mlx_cluster_ranks_up",
        "mlx_cluster_request_failure_total",
        "mlx_cluster_request_success_total",
    ):
        assert name in text, name
    for histogram in ("time_to_first_token", "time_per_output_token", "inter_token_latency"):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate(mlx_cluster_{histogram}_seconds_bucket" in text
    assert all('model_name=~"$model_name"' in expr for expr in exprs), "every query filters on $model_name"
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert {"model_name", "datasource"} <= variables


def test_alert_rules_use_only_defined_metric_names():
    exposed = exposed_metric_names()
    rules = yaml.safe_load((LAUNCH / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {token for expr in exprs for token in METRIC_TOKEN.findall(expr)}
    assert used and not sorted(used - exposed)


def test_prometheus_scrapes_metrics():
    config = yaml.safe_load((LAUNCH / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["mlx-cluster"]["metrics_path"] == "/metrics"
    assert "alerts.yml" in config["rule_files"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_config_and_rules():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        out = subprocess.run(["promtool", *args], cwd=LAUNCH / "prometheus", capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


# ---- kubernetes ----------------------------------------------------------------------------------


def _probe_target(probe: dict) -> str:
    if "httpGet" in probe:
        return probe["httpGet"]["path"]
    return " ".join(probe["exec"]["command"])


def test_statefulset_probes_and_drain_time():
    sts = yaml.safe_load((K8S / "statefulset.yaml").read_text())
    assert sts["kind"] == "StatefulSet"
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "/livez" in _probe_target(container["livenessProbe"])
    assert "/readyz" in _probe_target(container["readinessProbe"])
    assert "/readyz" in _probe_target(container["startupProbe"])  # not live-checked before load + warm-up
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # supervisor.startup_timeout_s
    drain_s = load_config(K8S / "cluster.yaml").supervisor.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > drain_s

    env = {e["name"]: e for e in container["env"]}
    assert int(env["MLX_CLUSTER_WORLD_SIZE"]["value"]) == sts["spec"]["replicas"]
    assert env["MLX_CLUSTER_SERVICE"]["value"] == sts["spec"]["serviceName"]
    for secret in ("MLX_CLUSTER_BUS_TOKEN", "MLX_CLUSTER_API_KEY"):
        assert "secretKeyRef" in env[secret]["valueFrom"], f"{secret} must come from a Secret"
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"  # no rolling update inside a TP group

    # The SSD KV tier lives on the per-rank PVC.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    ssd_dir = load_config(K8S / "cluster.yaml").cache.ssd.dir
    assert ssd_dir.startswith(mount["mountPath"] + "/")


def test_services():
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "services.yaml").read_text())}
    headless = docs["mlx-cluster-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    api = docs["mlx-cluster-api"]["spec"]
    assert api["selector"]["statefulset.kubernetes.io/pod-name"] == "mlx-cluster-0"  # rank 0 only


# ---- service managers --------------------------------------------------------------------------


def _systemd_seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?", value):
        total += float(number) * {"ms": 0.001, "min": 60, "m": 60, "h": 3600}.get(unit, 1)
    return total


def test_systemd_unit_outlasts_the_drain():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(LAUNCH / "systemd" / "mlx-cluster@.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("mlx-cluster up /etc/mlx-cluster/%i.yaml")
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the launcher only; it drains the ranks in order
    assert service["Restart"] == "on-failure"
    assert "EnvironmentFile" in service
    default_drain_s = SupervisorSection().drain_timeout_s
    assert _systemd_seconds(service["TimeoutStopSec"]) > default_drain_s + LAUNCHER_GRACE_S


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    text = (LAUNCH / "systemd" / "mlx-cluster@.service").read_text()
    unit = tmp_path / "mlx-cluster@demo.service"
    unit.write_text(text.replace("/opt/mlx-cluster/venv/bin/mlx-cluster", sys.executable))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_launchd_plist_outlasts_the_drain():
    plist = plistlib.loads((LAUNCH / "launchd" / "com.mlx-cluster.demo.plist").read_bytes())
    assert plist["Label"] == "com.mlx-cluster.demo"
    assert plist["ProgramArguments"][1] == "up"
    assert plist["ExitTimeOut"] > SupervisorSection().drain_timeout_s + LAUNCHER_GRACE_S
    assert plist["KeepAlive"] == {"SuccessfulExit": False}


# ---- the Kubernetes entrypoint ---------------------------------------------------------------


def _fake_getent(bin_dir: Path, ips: dict[str, str]) -> None:
    """A `getent` that knows only the pods' names (no cluster DNS here)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cases = "".join(f'  {name}) echo "{ip}  {name}";;\n' for name, ip in ips.items())
    script = bin_dir / "getent"
    script.write_text(f'#!/bin/sh\ncase "$2" in\n{cases}  *) exit 2;;\nesac\n')
    script.chmod(0o755)


def _pod_env(tmp_path: Path, hostname: str, world: int, config: dict, **extra: str) -> dict[str, str]:
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env.update(
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        HOSTNAME=hostname,
        MLX_CLUSTER_WORLD_SIZE=str(world),
        MLX_CLUSTER_SERVICE="mlx-cluster-headless",
        MLX_CLUSTER_CONFIG_FILE=str(config_file),
        MLX_CLUSTER_BUS_TOKEN="0123456789abcdef0123456789abcdef",
        MLX_CLUSTER_DNS_TIMEOUT_S="5",
    )
    env.update(extra)
    return env


def _print_env(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(K8S / "entrypoint.py"), "--print-env"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_entrypoint_ring_environment(tmp_path):
    ips = {f"mlx-cluster-{i}.mlx-cluster-headless": f"10.0.0.{i + 1}" for i in range(3)}
    _fake_getent(tmp_path / "bin", ips)
    config = {"cluster": {"backend": "ring", "base_port": 5500}, "server": {"port": 8000}}
    shown = {}
    for rank in range(3):
        env = _pod_env(tmp_path, f"mlx-cluster-{rank}", 3, config, MLX_CLUSTER_API_KEY="k1,k2")
        out = _print_env(env)
        assert out.returncode == 0, out.stderr
        shown[rank] = json.loads(out.stdout)
    for rank, env in shown.items():
        assert env["MLX_RANK"] == str(rank)
        assert env["MLX_CLUSTER_WORLD_SIZE"] == "3"
        assert env["MLX_CLUSTER_BACKEND"] == "ring"
        assert env["MLX_CLUSTER_DOORBELL"] == "10.0.0.1:5503"  # after the ring ports, on rank 0
        assert env["MLX_CLUSTER_BUS_TOKEN"] == "<redacted>"
        files = json.loads(env["MLX_CLUSTER_FILES"])
        assert json.loads(files["MLX_HOSTFILE"]) == [["10.0.0.1:5500"], ["10.0.0.2:5501"], ["10.0.0.3:5502"]]
        config_json = ClusterConfig.model_validate_json(env["MLX_CLUSTER_CONFIG"])
        assert config_json.server.host == "0.0.0.0" and config_json.world_size == 3
    assert shown[0]["MLX_CLUSTER_API_KEY"] == "<redacted>"
    assert "MLX_CLUSTER_API_KEY" not in shown[1] and "MLX_CLUSTER_API_KEY" not in shown[2]


def test_entrypoint_nccl_environment(tmp_path):
    _fake_getent(tmp_path / "bin", {f"gpu-{i}.mlx-cluster-headless": f"10.1.0.{i + 1}" for i in range(2)})
    config = {"cluster": {"backend": "nccl", "base_port": 6000, "env": {"NCCL_NVLS_ENABLE": "0"}}}
    out = _print_env(_pod_env(tmp_path, "gpu-1", 2, config, MLX_CLUSTER_API_KEY="k"))
    assert out.returncode == 0, out.stderr
    env = json.loads(out.stdout)
    assert env["NCCL_HOST_IP"] == "10.1.0.1" and env["NCCL_PORT"] == "6000" and env["MLX_WORLD_SIZE"] == "2"
    assert env["MLX_CLUSTER_DOORBELL"] == "10.1.0.1:6001"
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["NCCL_NVLS_ENABLE"] == "0"
    assert "MLX_CLUSTER_FILES" not in env


def test_entrypoint_refuses_unsafe_setups(tmp_path):
    ips = {f"mlx-cluster-{i}.mlx-cluster-headless": f"10.0.0.{i + 1}" for i in range(2)}
    _fake_getent(tmp_path / "bin", ips)
    config = {"cluster": {"backend": "ring"}}
    out = _print_env(_pod_env(tmp_path, "mlx-cluster-0", 2, config))  # no API key, listening on 0.0.0.0
    assert out.returncode == 2 and "no API key is set" in out.stderr
    out = _print_env(_pod_env(tmp_path, "mlx-cluster-0", 2, config, MLX_CLUSTER_BUS_TOKEN="", MLX_CLUSTER_API_KEY="k"))
    assert out.returncode == 2 and "MLX_CLUSTER_BUS_TOKEN" in out.stderr
    out = _print_env(_pod_env(tmp_path, "mlx-cluster-2", 2, config, MLX_CLUSTER_API_KEY="k"))
    assert out.returncode == 2 and "ordinal 2" in out.stderr
    out = _print_env(_pod_env(tmp_path, "mlx-cluster-1", 2, {**config, "hosts": [{"host": "localhost"}]}))
    assert out.returncode == 2 and "remove hosts:" in out.stderr


def test_probe_on_workers_never_depends_on_rank_0(tmp_path):
    env = {**os.environ, "HOSTNAME": "mlx-cluster-1", "MLX_CLUSTER_HTTP_PORT": str(free_port())}
    probe = [sys.executable, str(K8S / "probe.py")]
    assert subprocess.run([*probe, "/livez"], env=env, timeout=30).returncode == 0
    assert subprocess.run([*probe, "/readyz", "--startup"], env=env, timeout=30).returncode == 0
    env["HOSTNAME"] = "mlx-cluster-0"  # rank 0 with nothing listening: fails
    assert subprocess.run([*probe, "/livez"], env=env, capture_output=True, timeout=30).returncode == 1


@pytest.mark.slow
def test_entrypoint_starts_a_two_rank_group(tmp_path, models_dir):
    """Two 'pods' on loopback: join, serve with the API key, probes pass, SIGTERM to both → exit 0."""
    _fake_getent(tmp_path / "bin", {f"mlx-cluster-{i}.mlx-cluster-headless": "127.0.0.1" for i in range(2)})
    port = free_port()
    config = {
        "cluster": {"backend": "ring", "base_port": free_port_block(4)},
        "model": {"path": "builtin:tiny", "builtin_dir": str(models_dir)},
        "cache": {"ssd": {"dir": str(tmp_path / "kv")}},
        "supervisor": {"drain_timeout_s": 10, "collective_timeout_s": 30},
    }
    procs, logs = [], []
    try:
        for rank in (1, 0):
            env = _pod_env(
                tmp_path,
                f"mlx-cluster-{rank}",
                2,
                config,
                MLX_CLUSTER_API_KEY="sekrit",
                MLX_CLUSTER_HTTP_HOST="127.0.0.1",  # the pods use 0.0.0.0; tests stay on loopback
                MLX_CLUSTER_HTTP_PORT=str(port),
            )
            log = open(tmp_path / f"rank{rank}.log", "wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(K8S / "entrypoint.py")],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        probe_env = {**env, "HOSTNAME": "mlx-cluster-0"}
        deadline = time.monotonic() + 180
        while subprocess.run(
            [sys.executable, str(K8S / "probe.py"), "/readyz"], env=probe_env, capture_output=True
        ).returncode:
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.5)
        assert subprocess.run([sys.executable, str(K8S / "probe.py"), "/livez"], env=probe_env).returncode == 0
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "hello", "max_tokens": 4}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        for p in procs:  # what the kubelet does when the StatefulSet's pods are deleted
            p.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()
        assert not any(pid_alive(p.pid) for p in procs)


# ---- docs/configuration.md -------------------------------------------------------------------


def _leaf_keys(model: type, prefix: str = "") -> list[str]:
    """Dotted paths of every setting (not of the sections that hold them)."""
    from pydantic import BaseModel

    def models_in(annotation) -> list[type]:  # HostSection inside list[HostSection] | None, ...
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in getattr(annotation, "__args__", ()) for m in models_in(arg)]

    keys = []
    for name, field in model.model_fields.items():
        sections = models_in(field.annotation)
        if sections:
            for section in sections:
                keys += _leaf_keys(section, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def test_configuration_doc_names_every_key():
    """Each setting has a row in its section's table: `key` (or `ssd.key` under cache)."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = []
    for key in _leaf_keys(ClusterConfig):
        parts = key.split(".")
        row = ".".join(parts[1:]) if len(parts) > 1 else parts[0]
        # list sections (models:) are documented as `models[].key`
        if f"| `{row}` |" not in doc and f"| `{parts[0]}[].{row}` |" not in doc:
            missing.append(key)
    assert not missing, f"docs/configuration.md does not document: {missing}"


def test_configuration_doc_defaults_example_is_valid():
    doc = (REPO / "docs" / "configuration.md").read_text()
    example = re.search(r"```yaml\n(cluster:\n.*?)```", doc, re.S).group(1)
    data = yaml.safe_load(example)
    config = parse_config(data, "docs/configuration.md")
    defaults = parse_config({"hosts": data["hosts"]})
    assert config == defaults, "the spelt-out defaults in docs/configuration.md differ from config.py"
