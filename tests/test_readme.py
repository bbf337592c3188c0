"""README's quick start and CI must not drift apart: .ci/run runs README's test command verbatim."""

from pathlib import Path

import yaml

from mlx_cluster.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _code_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line.strip())
    return lines


def test_ci_runs_readme_test_command_verbatim():
    readme = _code_lines((REPO / "README.md").read_text())
    ci = [
        line.strip()
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    test_commands = [line for line in readme if "pytest" in line]
    assert len(test_commands) == 1, test_commands
    assert test_commands[0] in ci


def test_readme_run_command_uses_demo_config():
    readme = _code_lines((REPO / "README.md").read_text())
    assert "python3 -m pip install -e . && mlx-cluster up configs/demo.yaml" in readme


def test_shipped_configs_are_valid_and_hostfiles_match():
    from mlx_cluster.launcher.placement import write_hostfile

    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        hostfile = REPO / "hostfiles" / (path.stem + ".json")
        assert hostfile.exists(), f"run: mlx-cluster hostfile {path} -o {hostfile}"
        assert hostfile.read_text() == write_hostfile(config), f"{hostfile} is stale"
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_failure_bounds_are_stated_once_in_the_same_words():
    from mlx_cluster.launcher.supervisor import FAILURE_GRACE_S
    from mlx_cluster.runtime.rank import FAIL_FLUSH_S
    from mlx_cluster.runtime.watchdog import POLL_S
    from tests.cluster import FAIL_PATH_S, FAILURE_BOUNDS, GROUP_STOP_S, WATCHDOG_POLL_S

    for doc in ("README.md", "docs/operations.md"):
        assert _words(FAILURE_BOUNDS) in _words((REPO / doc).read_text()), (
            f"{doc} must state tests/cluster.py's FAILURE_BOUNDS"
        )
    # The numbers those words name are the tests' constants, and those are the code's.
    for phrase in (f"+ {WATCHDOG_POLL_S:g} s`", f"exits {FAIL_PATH_S:g} s later", f"at most {GROUP_STOP_S:g} s more"):
        assert phrase in _words(FAILURE_BOUNDS), phrase
    assert (POLL_S, FAIL_FLUSH_S, FAILURE_GRACE_S) == (WATCHDOG_POLL_S, FAIL_PATH_S, GROUP_STOP_S)
