"""Pipeline parallelism (P=2) on random-weight checkpoints of real architectures gives mlx-lm's
own greedy tokens (tests/test_checkpoints.py builds them and its reference).

Each stage computes whole layers, so the arithmetic is that of one rank: the reference is
mlx-lm's one-rank stream_generate. One 2-rank cluster per architecture: the module is slow.
"""

from __future__ import annotations

import pytest

from tests.test_checkpoints import checkpoints, complete_on_two_ranks, prompt, references  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_two_stages_match_mlx_lm(arch, checkpoints, references, prompt, tmp_path, models_dir):  # noqa: F811
    from mlx_lm.utils import load_tokenizer

    ref, path = references[arch], checkpoints[arch]
    config = {"model": {"path": str(path)}, "cluster": {"parallel": {"pipeline": 2}}}
    response, log = complete_on_two_ranks(tmp_path, models_dir, config, prompt)
    assert "layout: tensor=1 x pipeline=2" in log
    assert "stage 0 of 2: layers 0-0" in log and "stage 1 of 2: layers 1-1" in log
    choice = response.json()["choices"][0]
    assert choice["text"] == ref.text
    tokenizer = load_tokenizer(path)
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in ref.tokens]
