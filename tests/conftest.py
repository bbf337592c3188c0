"""Shared fixtures: one built-in model directory per session, clusters started via `mlx-cluster up`."""

from __future__ import annotations

import pytest

from mlx_cluster.runtime.cpu_blas import use_cpu_blas

# The ranks the tests start load the system's BLAS (cluster.cpu_blas: auto); so does this process,
# before anything imports mlx, so that references computed here (mlx-lm's generate) multiply alike.
use_cpu_blas("auto")

from tests.cluster import Cluster  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """Materialize builtin:tiny once for the whole session."""
    from mlx_cluster.models.builtin import resolve_model_path

    path = tmp_path_factory.mktemp("models")
    resolve_model_path("builtin:tiny", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_path(models_dir):
    from mlx_cluster.models.builtin import resolve_model_path

    return resolve_model_path("builtin:tiny", str(models_dir))


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    """One single-rank cluster shared by a test module."""
    cluster = Cluster(
        tmp_path_factory.mktemp("server"), ranks=1, models_dir=models_dir, config={"scheduler": {"max_batch_size": 8}}
    )
    with cluster:  # stops it even when a test (or the start) fails
        yield cluster


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory, models_dir):
    """One two-rank ring cluster on loopback shared by a test module (the agent API tests)."""
    cluster = Cluster(
        tmp_path_factory.mktemp("cluster2"), ranks=2, models_dir=models_dir, config={"scheduler": {"max_batch_size": 8}}
    )
    with cluster:  # stops it even when a test (or the start) fails
        yield cluster
