"""cluster.yaml validation: unknown keys and bad values are rejected with the key's name."""

import json

import pytest

from mlx_cluster.config import ConfigError, apply_overrides, load_config, parse_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_one_local_rank():
    cfg = load_config(None)
    assert cfg.world_size == 1
    assert cfg.model.path == "builtin:tiny"
    assert cfg.server.port == 8000


def test_unknown_key_is_named_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'server.prot'"):
        load_config(write(tmp_path, "server: {prot: 8000}\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'hosts.0.rnaks'"):
        load_config(write(tmp_path, "hosts: [{host: localhost, rnaks: 2}]\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'servre'"):
        load_config(write(tmp_path, "servre: {}\n"))


def test_bad_values_say_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.backend: must be 'ring', 'jaccl', 'jaccl-ring', 'nccl' or 'mpi'"):
        load_config(write(tmp_path, "cluster: {backend: tcp}\n"))
    with pytest.raises(ConfigError, match=r"server.port"):
        load_config(write(tmp_path, "server: {port: 99999}\n"))
    with pytest.raises(ConfigError, match=r"cache.kv_bits"):
        load_config(write(tmp_path, "cache: {kv_bits: 3}\n"))
    with pytest.raises(ConfigError, match=r"not an IP address"):
        load_config(write(tmp_path, "hosts: [{host: a, ips: [mac-b.local]}]\n"))
    with pytest.raises(ConfigError, match=r"supervisor.restart"):
        load_config(write(tmp_path, "supervisor: {restart: always}\n"))


def test_every_error_is_listed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "server: {port: -1, colour: red}\nscheduler: {max_batch_size: 0}\n"))
    text = str(e.value)
    assert "server.port" in text and "server.colour" in text and "scheduler.max_batch_size" in text


def test_yaml_syntax_and_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: {port: 80\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides_apply_before_validation(tmp_path):
    cfg = load_config(
        write(tmp_path, "server: {port: 8000}\n"),
        ["server.port=8001", "cache.ssd.max_gb=1.5", "hosts=[{host: localhost, ranks: 2}]"],
    )
    assert cfg.server.port == 8001
    assert cfg.cache.ssd.max_gb == 1.5
    assert cfg.world_size == 2
    with pytest.raises(ConfigError, match="server.port"):
        load_config(None, ["server.port=notaport"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["server.port"])


def test_hosts_and_hostfile_are_exclusive_and_hostfile_is_read(tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps([{"ssh": "localhost", "ips": ["127.0.0.1"]}, {"ssh": "localhost", "ips": ["127.0.0.1"]}]))
    cfg = load_config(write(tmp_path, "hostfile: hosts.json\n"))
    assert cfg.world_size == 2
    with pytest.raises(ConfigError, match="either hosts: or hostfile:"):
        load_config(write(tmp_path, "hostfile: hosts.json\nhosts: [{host: localhost}]\n"))
    hf.write_text('[{"ips": []}]')
    with pytest.raises(ConfigError, match="needs an 'ssh' key"):
        load_config(write(tmp_path, "hostfile: hosts.json\n"))


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError):
        parse_config([1, 2])
