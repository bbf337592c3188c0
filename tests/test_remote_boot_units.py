"""Pure units of the SSH launcher's boot protocol: no SSH server or network namespace needed,
so they run everywhere (test_ssh.py, which needs both, skips on machines without them)."""

from __future__ import annotations

import pytest

from mlx_cluster.config import HostSection, SshSection
from mlx_cluster.launcher.remote_boot import parse_spec
from mlx_cluster.launcher.ssh import RemoteRankProcess

SECRET = "sk-mlxc-test-7f3a9c"


def _ignore(*_args) -> None:
    pass


def test_parse_spec_rejects_bad_boot_lines():
    assert parse_spec(b'{"env": {"A": "1"}, "cwd": null, "argv": ["x"]}') == ({"A": "1"}, None, ["x"])
    for bad in (b"", b"[]", b'{"argv": []}', b'{"argv": ["x"], "env": {"A": 1}}'):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_boot_command_carries_no_env_and_expands_home():
    proc = RemoteRankProcess(
        0, HostSection(host="h"), SshSection(), ["~/venv/bin/python", "-m", "x"], {"K": SECRET}, None, _ignore
    )
    assert proc.boot_command() == 'exec "$HOME"/venv/bin/python -m mlx_cluster.launcher.remote_boot'
    assert SECRET in proc.boot_line().decode() and SECRET not in proc.boot_command()
