"""cluster.yaml: the validated description of a cluster.

Everything the launcher, the ranks and the server need comes from one `ClusterConfig`.
Validation happens here, at the edge: unknown keys are rejected with their dotted path,
bad values say what is allowed, and `--set a.b=value` overrides are applied before
validation so they get the same checks.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

Backend = Literal["ring", "jaccl", "jaccl-ring", "nccl", "mpi"]
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


class ConfigError(ValueError):
    """A cluster.yaml problem, worded for the person who has to fix the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParallelSection(_Strict):
    """cluster.parallel: tensor x pipeline = world size; give one and the other follows."""

    tensor: int | None = Field(None, ge=1, le=1024)
    pipeline: int | None = Field(None, ge=1, le=1024)
    # Decode micro-batches in flight across the stages (engine/microbatch.py): 1 (one forward
    # pass at a time) or the pipeline size; None: the pipeline size when tensor is 1, else 1.
    microbatches: int | None = Field(None, ge=1, le=1024)


class ClusterSection(_Strict):
    name: str = Field("mlx-cluster", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    backend: Backend = "ring"
    python: str | None = None
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    base_port: int = Field(5500, ge=1024, le=65000)
    connections_per_ip: int = Field(1, ge=1, le=8)
    run_dir: str = "~/.cache/mlx-cluster/runs"
    cpu_blas: str = "auto"  # auto | bundled | a library path: what mlx's CPU matmuls run on (runtime/cpu_blas.py)
    # None: all tensor parallel (as before); auto: measured at start-up (launcher/layout.py)
    parallel: ParallelSection | Literal["auto"] | None = None

    @field_validator("parallel", mode="before")
    @classmethod
    def _parallel(cls, v: Any) -> Any:
        # One message naming the key instead of one per member of the union.
        if v is None or v == "auto" or isinstance(v, ParallelSection):
            return v
        if not isinstance(v, dict):
            raise ValueError("must be auto or {tensor: T, pipeline: P}")
        try:
            return ParallelSection.model_validate(v)
        except ValidationError as e:
            raise ValueError(f"{_first_message(e)}; write {{tensor: T, pipeline: P}} or auto") from None

    @field_validator("cpu_blas")
    @classmethod
    def _cpu_blas(cls, v: str) -> str:
        if v in ("auto", "bundled") or v.startswith(("/", "~")):
            return v
        raise ValueError("must be auto, bundled, or the absolute path of a BLAS library (e.g. libopenblas.so.0)")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not key.replace("_", "").isalnum() or key[0].isdigit():
                raise ValueError(f"environment variable name {key!r} must be letters, digits and _")
        return env


class HostSection(_Strict):
    host: str
    ranks: int = Field(1, ge=1, le=64)
    ips: list[str] = Field(default_factory=list)
    rdma: list[str | None | list[str]] = Field(default_factory=list)
    gpus: list[int] | None = None
    # Uneven pipeline stages: the stages on this host get these many layers in all, or a
    # share of the layers in proportion to this memory (see launcher/layout.py).
    layers: int | None = Field(None, ge=1)
    memory_gb: float | None = Field(None, gt=0)

    @field_validator("ips")
    @classmethod
    def _ips(cls, ips: list[str]) -> list[str]:
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"{ip!r} is not an IP address (ips: takes addresses, not names)") from None
        return ips

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS


class SshSection(_Strict):
    user: str | None = None
    port: int = Field(22, ge=1, le=65535)
    key_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    strict_host_keys: bool = True
    connect_timeout_s: float = Field(10.0, gt=0, le=300)


class ModelSection(_Strict):
    path: str = "builtin:tiny"
    revision: str | None = None
    adapter_path: str | None = None
    name: str | None = None  # the id clients send as "model"; defaults to path
    builtin_dir: str = "~/.cache/mlx-cluster/models"
    trust_remote_code: bool = False
    max_adapters: int = Field(8, ge=0, le=256)  # LoRA adapter slots (adapter_path, adapters:, runtime loads)
    tool_parser: str = "auto"  # auto | none | an mlx-lm tool parser (json_tools/hermes, mistral, ...)
    reasoning_parser: str = "auto"  # auto | none | think | qwen3 | deepseek_r1

    @field_validator("tool_parser")
    @classmethod
    def _tool_parser(cls, v: str) -> str:
        from mlx_cluster.agent.formats import tool_parser_names

        names = tool_parser_names()
        if v not in ("auto", "none", *names):
            raise ValueError(f"unknown tool parser {v!r}; choose one of: auto, none, {', '.join(names)}")
        return v

    @field_validator("reasoning_parser")
    @classmethod
    def _reasoning_parser(cls, v: str) -> str:
        from mlx_cluster.agent.formats import REASONING_PARSERS

        if v not in ("auto", "none", *REASONING_PARSERS):
            raise ValueError(
                f"unknown reasoning parser {v!r}; choose one of: auto, none, {', '.join(REASONING_PARSERS)}"
            )
        return v

    @property
    def served_name(self) -> str:
        return self.name or self.path


class ModelEntry(ModelSection):
    """One of several models (`models:`): served under `name`, loaded on first use or at start-up."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")
    preload: bool = False  # load at start-up and never unload (the first entry when none says so)


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_file: str | None = None
    allow_insecure: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    max_request_bytes: int = Field(1 << 20, ge=1024)
    request_timeout_s: float = Field(600.0, gt=0)
    open_probes: bool = True
    open_metrics: bool = True
    wedged_after_s: float = Field(30.0, gt=0)  # /readyz fails when work waits this long without a finished step
    # /v1/responses keeps stored responses (for previous_response_id and GET) in rank 0's memory
    responses_store_max: int = Field(1000, ge=0, le=1_000_000)  # 0 turns storing off
    responses_store_ttl_s: float = Field(3600.0, gt=0)
    otlp_endpoint: str | None = None  # OTLP/HTTP traces endpoint; needs the `otel` extra (server/tracing.py)


class SchedulerSection(_Strict):
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(128, ge=1, le=100_000)
    max_prompt_tokens: int = Field(8192, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_cap: int = Field(32768, ge=1)
    prefill_chunk_tokens: int = Field(512, ge=16, le=65536)
    prefill_batch_size: int = Field(8, ge=1, le=256)
    max_kv_tokens: int = Field(65536, ge=256)  # live KV budget: prompt + max_tokens reserved per sequence


def _size_gb(value: Any) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError("must be a size in decimal GB (a number >= 0) or auto")


SizeGb = Annotated[float | str, BeforeValidator(_size_gb)]


class SsdSection(_Strict):
    dir: str = "~/.cache/mlx-cluster/kv"
    max_gb: SizeGb = "auto"  # auto: a share of free disk (cache/sizing.py)
    ttl_days: float = Field(7, gt=0)
    enabled: bool = True
    policy: Literal["write_back", "write_through"] = "write_back"


class CacheSection(_Strict):
    block_size: int = Field(16, ge=1, le=4096)
    ram_gb: SizeGb = "auto"  # auto: a share of free memory (cache/sizing.py)
    kv_bits: Literal[4, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = 64
    # The running batch's KV: "auto" follows kv_bits (full precision, with a warning, on a model
    # that cannot use it); null keeps it at full precision; 4 or 8 require it (engine/kv_quant.py).
    live_kv_bits: Literal[4, 8, "auto"] | None = "auto"
    ssd: SsdSection = Field(default_factory=SsdSection)


class SupervisorSection(_Strict):
    restart: Literal["never", "on-failure"] = "on-failure"
    max_restarts: int = Field(3, ge=0, le=1000)
    backoff_s: float = Field(1.0, ge=0, le=600)
    restart_window_s: float = Field(600, gt=0)  # a group up this long counts as healthy: restarts reset
    collective_timeout_s: float = Field(60, gt=0, le=3600)
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    drain_timeout_s: float = Field(30, ge=0, le=3600)
    startup_timeout_s: float = Field(600, gt=0)


class SpeculativeSection(_Strict):
    """Speculative decoding (engine/speculate.py): proposals verified in one forward of the batch."""

    method: Literal["ngram", "draft"]
    num_tokens: int = Field(4, ge=1, le=16)  # most proposals per row and step (K); dynamic per row below it
    draft_model: str | None = None  # method: draft: a local mlx-lm directory, HF repo id or builtin:NAME
    max_batch_size: int = Field(8, ge=1, le=1024)  # speculation pauses while more rows run
    prompt_lookup_min: int = Field(2, ge=1, le=16)  # method: ngram: shortest suffix looked up
    prompt_lookup_max: int = Field(4, ge=1, le=16)  # method: ngram: longest suffix looked up
    # What a verify step costs in plain decode steps, [with 1 proposal, with num_tokens];
    # measured at start-up when absent. Pin it for reproducible runs or a noisy host.
    verify_cost: list[float] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _method_fields(self) -> SpeculativeSection:
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative.draft_model is required with method: draft (a model with the same tokenizer)")
        if self.method == "ngram" and self.draft_model:
            raise ValueError("speculative.draft_model is only used with method: draft; remove it or set method: draft")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative.prompt_lookup_min must be at most speculative.prompt_lookup_max")
        if self.verify_cost is not None and not all(0 < c <= 100 for c in self.verify_cost):
            raise ValueError(
                "speculative.verify_cost must be two numbers of plain decode steps in (0, 100], "
                "e.g. [1.6, 1.6]; leave it out to measure at start-up"
            )
        return self


class AdapterEntry(_Strict):
    """A LoRA adapter served under its own name (requests choose it with "model")."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")
    path: str


class ClusterConfig(_Strict):
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    hosts: list[HostSection] | None = None
    hostfile: str | None = None
    ssh: SshSection = Field(default_factory=SshSection)
    model: ModelSection = Field(default_factory=ModelSection)
    server: ServerSection = Field(default_factory=ServerSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    speculative: SpeculativeSection | None = None  # off when absent
    adapters: list[AdapterEntry] = Field(default_factory=list)
    # Several models instead of one (engine/models.py): give either model: or models:.
    models: list[ModelEntry] | None = None
    idle_unload_s: float | None = Field(None, gt=0)  # unload a model nobody used for this long

    @model_validator(mode="after")
    def _several_models(self) -> ClusterConfig:
        from mlx_cluster.engine.models import check_models_config

        primary = check_models_config(self)
        if primary is not None:
            # The rest of the code (launcher checks, placement report) reads model:, which is
            # the first model loaded at start-up.
            object.__setattr__(self, "model", primary)
        return self

    @model_validator(mode="after")
    def _adapter_names(self) -> ClusterConfig:
        names = [a.name for a in self.adapters]
        for name in names:
            if name == self.model.served_name or names.count(name) > 1:
                raise ValueError(f"adapters: the name {name!r} is used twice (adapters and model.name must differ)")
        slots = len(self.adapters) + (self.model.adapter_path is not None)
        if slots > self.model.max_adapters:
            raise ValueError(
                f"adapters: {slots} adapters need {slots} slots but model.max_adapters is {self.model.max_adapters}; "
                "raise model.max_adapters"
            )
        return self

    @model_validator(mode="after")
    def _hosts_or_hostfile(self) -> ClusterConfig:
        if self.hosts is not None and self.hostfile is not None:
            raise ValueError("give either hosts: or hostfile:, not both")
        if self.hosts is not None and not self.hosts:
            raise ValueError("hosts: must list at least one host")
        if self.hosts is not None:
            from mlx_cluster.launcher.layout import check_parallel_config

            check_parallel_config(self)
        return self

    @property
    def world_size(self) -> int:
        return sum(h.ranks for h in self.host_list())

    def host_list(self) -> list[HostSection]:
        """The hosts, in rank order, whether given inline or through a hostfile."""
        if self.hostfile is not None:
            return read_hostfile(Path(self.hostfile).expanduser())
        return list(self.hosts or [HostSection(host="localhost", ranks=1, ips=["127.0.0.1"])])


def read_hostfile(path: Path) -> list[HostSection]:
    """Read mlx.launch's JSON hostfile (a list of hosts, or {"hosts": [...]}), one rank per entry."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"hostfile {path}: cannot read it as JSON ({e})") from e
    entries = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"hostfile {path}: expected a non-empty list of hosts")
    hosts = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "ssh" not in entry:
            raise ConfigError(f"hostfile {path}: host {i} needs an 'ssh' key")
        try:
            hosts.append(HostSection(host=entry["ssh"], ranks=1, ips=entry.get("ips", []), rdma=entry.get("rdma", [])))
        except ValidationError as e:
            raise ConfigError(f"hostfile {path}: host {i}: {_first_message(e)}") from e
    return hosts


def _parse_scalar(text: str) -> Any:
    """Values in --set are YAML scalars or flow collections: 8000, true, null, [a, b]."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a raw config mapping (before validation)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set server.port=8001")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _first_message(e: ValidationError) -> str:
    return _describe(e.errors()[0])


def _describe(err: dict) -> str:
    where = _loc(err)
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}: remove it or check its spelling (see docs/configuration.md)"
    if err["type"] == "literal_error":
        return f"{where}: {err['msg'].replace('Input should be', 'must be')} (got {err['input']!r})"
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a whole-file check: its message names the keys; the input is the whole file
        return message
    return f"{where}: {message} (got {err.get('input')!r})"


def parse_config(data: Any, source: str = "cluster.yaml") -> ClusterConfig:
    """Validate a raw mapping; errors name every bad key and how to fix it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (cluster:, hosts:, model:, ...)")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  - {_describe(err)}" for err in e.errors()]
        raise ConfigError(f"{source} is not valid:\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ClusterConfig:
    """Read cluster.yaml (or start from defaults when path is None) and apply --set overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if data.get("hostfile"):
            # A relative hostfile is relative to the YAML file, not to the current directory.
            hf = Path(str(data["hostfile"])).expanduser()
            if not hf.is_absolute():
                data["hostfile"] = str((path.parent / hf).resolve())
    data = apply_overrides(data, list(overrides))
    config = parse_config(data, source)
    if config.hostfile is not None:
        config.host_list()  # surface hostfile errors now, not at launch
    return config


def dump_config(config: ClusterConfig) -> str:
    """The config as JSON, used to hand it to rank processes unchanged."""
    # With models:, model: is derived from it (see ClusterConfig._several_models), not given.
    return config.model_dump_json(exclude={"model"} if config.models is not None else None)


def config_from_json(text: str) -> ClusterConfig:
    return ClusterConfig.model_validate_json(text)
