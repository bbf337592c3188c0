"""Two pipeline stages on two "hosts" (network namespaces started over SSH) whose veth links
are shaped to 1 Gbit/s with tc: the group serves the same tokens as one rank, and `auto`
measures that link at start-up and says what it chose and why.

(A rate limit only: tests/test_slow_link.py adds delay too, with a userspace delay line, since
this kernel has no netem qdisc.)
"""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.cluster import REPO, Cluster
from tests.netns import needs_netns, ssh_hosts  # noqa: F401  (fixture)
from tests.test_multihost import API_KEY, multihost_cluster

pytestmark = [needs_netns, pytest.mark.slow]
PROMPTS = ["Hello there", "1 2 3 4 5 6"]


def shape(hosts, rate: str = "1gbit") -> None:
    for i in range(len(hosts.ips)):
        hosts.run_in(
            i, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"
        )


def tokens(cluster, prompt, api_key="none"):
    r = cluster.openai(api_key=api_key).completions.create(
        model="builtin:tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    return r.choices[0].logprobs.tokens


@pytest.mark.parametrize("parallel", [{"pipeline": 2}])
def test_two_stages_over_a_shaped_link_match_one_rank(parallel, tmp_path, models_dir, ssh_hosts):  # noqa: F811
    shape(ssh_hosts)
    with Cluster(tmp_path / "one", ranks=1, models_dir=models_dir) as one:
        expected = [tokens(one, p) for p in PROMPTS]
    cluster = multihost_cluster(tmp_path / "two", models_dir, ssh_hosts)
    cluster.config["cluster"]["parallel"] = parallel
    # The remote ranks run this checkout (SSH sessions do not inherit PYTHONPATH).
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    cluster.config["cluster"]["python"] = str(python)
    cluster.config_path.write_text(yaml.safe_dump(cluster.config))
    with cluster:
        assert [tokens(cluster, p, API_KEY) for p in PROMPTS] == expected
        out = cluster.output()
    if parallel == "auto":
        assert "why: auto: link" in out and "T2xP1" in out and "T1xP2" in out
    else:
        assert "layout: tensor=1 x pipeline=2" in out
