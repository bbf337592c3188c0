"""Speculative decoding in one process (engine/speculate.py): the output is the plain output.

Greedy and seeded sampled rows, alone and mixed with rows that never speculate (penalties,
logit_bias), with n-gram lookup, a draft model, and a scripted proposer whose proposals are
partly wrong (so rows accept different lengths and the KV rollback rolls rows). Builtin models
have random weights: their text rarely repeats, so the n-gram cases use prompts of one repeated
token, after which random models fall into loops. Checkpoints of real architectures (llama,
qwen3_moe) are built as tests/test_checkpoints.py builds them.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cluster.cache.testing import load_tiny, make_executor, random_prompt
from mlx_cluster.config import ConfigError, SpeculativeSection, parse_config
from mlx_cluster.engine.plan import NewSequence, SamplingParams, StepPlan
from mlx_cluster.engine.speculate import (
    DraftModelError,
    NgramIndex,
    NgramProposer,
    Proposer,
    Speculator,
    make_speculator,
    ngram_lookup,
)
from mlx_cluster.engine.verify_cost import VerifyCost, measure_verify_cost

_ids = itertools.count(1000)
N = 32


def run(executor, requests) -> list[list[int]]:
    """(prompt, SamplingParams) pairs in one batch, stepped to the end; token ids per request."""
    seqs = [NewSequence(next(_ids), tuple(p), params) for p, params in requests]
    executor.apply(StepPlan(step=0, new=tuple(seqs)))
    out = {s.seq_id: [] for s in seqs}
    running = set(out)
    while running:
        for o in executor.step():
            out[o.seq_id].append(o.token)
            if o.finish_reason is not None:
                running.discard(o.seq_id)
    return [out[s.seq_id] for s in seqs]


def greedy(n: int = N) -> SamplingParams:
    return SamplingParams(max_tokens=n, seed=0, temperature=0.0)


def repetitive_prompts(count: int) -> list[list[int]]:
    return [[100 + 37 * i] * 48 for i in range(count)]


class ScriptedProposer(Proposer):
    """Proposes each request's known plain continuation, with every third proposal's last token wrong."""

    def __init__(self, truths: list[tuple[list[int], list[int]]]):
        self.truths = truths
        self.calls = 0

    def propose(self, uids, contexts, ks):
        out = []
        for context, k in zip(contexts, ks):
            full = next((p + t for p, t in self.truths if context[: len(p)] == p), None)
            guess = list(full[len(context) : len(context) + k]) if full else []
            self.calls += 1
            if guess and self.calls % 3 == 0:
                guess[-1] = (guess[-1] + 1) % 2000
            out.append(guess)
        return out


@pytest.fixture(scope="module")
def tiny(models_dir):
    return load_tiny(models_dir)


@pytest.fixture(scope="module")
def plain(tiny):
    return make_executor(tiny, None)


def spec_executor(loaded, proposer, num_tokens=4, max_batch_size=8):
    speculator = Speculator(proposer, num_tokens, max_batch_size)
    return make_executor(loaded, None, speculator=speculator), speculator


MIXED = [
    SamplingParams(max_tokens=N, seed=0, temperature=0.0),
    SamplingParams(max_tokens=N, seed=7, temperature=0.8),
    SamplingParams(max_tokens=N, seed=9, temperature=1.0, top_p=0.9),
    SamplingParams(max_tokens=N, seed=3, temperature=0.0, repetition_penalty=1.3),  # never speculates
    SamplingParams(max_tokens=N - 13, seed=5, temperature=0.7, top_k=20, min_p=0.02, logprobs=True),
    SamplingParams(max_tokens=N, seed=4, temperature=0.0, logit_bias=((7, 0.0),)),  # never speculates
]


def test_ngram_lookup_prefers_the_longest_latest_match_and_extends_loops():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], 2, 2, 4) == [8, 5]  # latest match of (2, 3)
    assert ngram_lookup([5, 6, 5, 6], 5, 2, 4) == [5, 6, 5, 6, 5]  # a loop, copied forward
    assert ngram_lookup([1, 2, 3, 4], 3, 2, 4) == []
    assert ngram_lookup([7, 1, 2, 8, 3, 1, 2], 2, 2, 2) == [8, 3]


def scan_lookup(tokens, k, n_min, n_max):
    """The definition, by brute force: latest earlier occurrence of the longest suffix."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                out = []
                for j in range(k):
                    i = start + n + j
                    out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
                return out
    return []


def test_the_incremental_index_finds_what_a_full_scan_finds():
    import random

    rng = random.Random(0)
    for trial in range(40):
        n_min = rng.randint(1, 3)
        n_max = rng.randint(n_min, 5)
        index = NgramIndex(n_min, n_max)
        tokens = []
        for _ in range(120):  # a row growing a token (or an accepted run) at a time
            tokens = tokens + [rng.randrange(6) for _ in range(rng.choice((1, 1, 3)))]
            k = rng.randint(1, 5)
            assert index.lookup(tokens, k) == scan_lookup(tokens, k, n_min, n_max), (trial, tokens)
        other = [9, 9, 1, 2, 9, 9]  # not an extension of what it indexed: indexed afresh
        assert index.lookup(other, 2) == scan_lookup(other, 2, n_min, n_max)


class PendingOnDevice:
    """A batch whose pending tokens must not be read (reading them would drain the pipeline)."""

    def __init__(self, tokens):
        self.uids, self.tokens = [1], [tokens]
        self.prompt_cache = []
        self.samplers = [type("Row", (), {"constraint": None})()]
        self.logits_processors = [None]
        self.max_tokens, self._num_tokens = [100], [0]

    @property
    def _next_tokens(self):
        raise AssertionError("the step waited for the pending tokens")


def test_a_row_whose_known_tokens_promise_nothing_costs_no_wait_and_no_back_off():
    speculator = Speculator(NgramProposer(2, 4), 4, 8)
    batch = PendingOnDevice([5, 6, 7, 8, 9, 10])  # no n-gram recurs
    for _ in range(3):
        assert speculator.step(batch) is None
        assert speculator._rows[1].wait == 0  # looks again on the very next step
    batch.tokens = [[5, 6, 7, 5, 6, 7]]  # (6, 7) recurs: worth waiting for the pending token
    with pytest.raises(AssertionError, match="waited"):
        speculator.step(batch)


def test_a_verify_is_chosen_only_where_its_expected_tokens_beat_its_cost():
    gpu = VerifyCost(1.6, 1.6, 4)  # about any width on an H200
    assert gpu.best_k(0.9, 4) == 4  # a flat cost: the widest verify yields the most
    assert gpu.best_k(0.5, 4) == 4  # 1.94 tokens for 1.6 steps
    assert gpu.best_k(0.3, 4) == 0  # 1.42 tokens: a plain step does better
    cpu = VerifyCost(1.8, 3.8, 4)  # a compute-bound BLAS: cost grows with width
    assert cpu.best_k(0.95, 4) == 4
    assert 1 <= cpu.best_k(0.85, 4) < 4  # narrower where later proposals rarely survive
    assert cpu.best_k(0.6, 4) == 0
    assert VerifyCost(1.0, 1.0, 4).best_k(0.05, 2) == 2  # a free verify always pays
    assert gpu.best_k(0.9, 1) == 1  # never more than the row has room for


def test_a_row_that_stops_paying_sits_out_then_probes_with_one_proposal():
    speculator = Speculator(NgramProposer(2, 4), 4, 8, VerifyCost(1.6, 1.6, 4))
    speculator._state(1)
    speculator.account([1], [[5, 5, 5, 5]], [4])
    assert speculator._rows[1].k == 4 and speculator._rows[1].wait == 0
    state = speculator._rows[1]
    rejections = 0
    while state.wait == 0:  # rejected at once, again and again: p falls until a verify stops paying
        speculator.account([1], [[5] * state.k], [0])
        rejections += 1
    assert rejections == 3 and state.k == 1 and state.wait == 1 and state.p < 0.3
    for wait in (2, 4):  # each rejected probe (one proposal) doubles the time sat out
        speculator.account([1], [[5]], [0])
        assert state.wait == wait and state.k == 1
    speculator.account([1], [[5]], [1])  # an accepted probe: the row is hopeful again
    assert state.k == 4 and state.backoff == 1


def test_the_verify_cost_is_measured_without_a_trace_and_agreed_as_the_largest(tiny, plain):
    executor, speculator = spec_executor(tiny, NgramProposer(2, 4))
    cost = measure_verify_cost(executor, speculator)
    assert 0 < cost.narrow < 100 and 0 < cost.wide < 100 and cost.num_tokens == 4
    assert executor.active == 0 and executor.digest == 0 and speculator.stats.spec_steps == 0
    prompt = [(repetitive_prompts(1)[0], greedy())]
    assert run(executor, prompt) == run(plain, prompt)  # the throwaway sequence left nothing behind
    speculator.cost = VerifyCost(1.5, 2.0, 4)
    others = [[-1900, -1700]]  # another rank measured 1.9 and 1.7: each figure's largest wins
    speculator.agree(lambda mine: [min(a, b) for a, b in zip(mine, others[0])])
    assert (speculator.cost.narrow, speculator.cost.wide) == (1.9, 2.0)


def test_config_section_is_validated_with_the_key_named():
    assert parse_config({"speculative": {"method": "ngram"}}).speculative.num_tokens == 4
    assert parse_config({}).speculative is None
    bad = [
        ({"method": "draft"}, "speculative.draft_model is required"),
        ({"method": "ngram", "draft_model": "x"}, "only used with method: draft"),
        ({"method": "medusa"}, "speculative.method"),
        ({"method": "ngram", "num_tokens": 0}, "speculative.num_tokens"),
        ({"method": "ngram", "max_batch_size": 0}, "speculative.max_batch_size"),
        ({"method": "ngram", "prompt_lookup_min": 5}, "prompt_lookup_min must be at most"),
        ({"method": "ngram", "lookahead": 3}, "unknown key 'speculative.lookahead'"),
        ({"method": "ngram", "verify_cost": [1.6]}, "speculative.verify_cost"),
        ({"method": "ngram", "verify_cost": [0, 2]}, "speculative.verify_cost must be two numbers"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({"speculative": section})


def test_partly_wrong_proposals_give_the_plain_output_in_a_mixed_batch(tiny, plain):
    """Greedy and seeded sampling (top-p, top-k, min-p, logprobs) next to rows that never speculate."""
    prompts = [random_prompt(12 + 3 * i, i) for i in range(len(MIXED))]
    requests = list(zip(prompts, MIXED))
    reference = run(plain, requests)
    proposer = ScriptedProposer(list(zip(prompts, reference)))
    executor, speculator = spec_executor(tiny, proposer)
    assert run(executor, requests) == reference
    s = speculator.stats
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # some rejected: rows rolled back unevenly
    assert s.spec_steps < N  # several tokens per step


def test_ngram_greedy_alone_and_batched_matches_plain(tiny, plain):
    prompts = repetitive_prompts(4)
    executor, speculator = spec_executor(tiny, NgramProposer(2, 4))
    for p in prompts:
        assert run(executor, [(p, greedy())]) == run(plain, [(p, greedy())])
    assert speculator.stats.num_accepted_tokens > 0
    requests = [(p, greedy()) for p in prompts] + [(random_prompt(20, 9), MIXED[3]), (prompts[0], MIXED[1])]
    assert run(executor, requests) == run(plain, requests)


def test_seeded_sampling_is_reproducible_and_equals_plain_sampling(tiny, plain):
    executor, speculator = spec_executor(tiny, NgramProposer(2, 4))
    requests = [
        (p, SamplingParams(max_tokens=N, seed=11 + i, temperature=0.3)) for i, p in enumerate(repetitive_prompts(3))
    ]
    first = run(executor, requests)
    assert run(executor, requests) == first
    assert first == run(plain, requests)
    assert speculator.stats.num_accepted_tokens > 0


def test_speculation_pauses_above_max_batch_size(tiny, plain):
    requests = [(p, greedy(16)) for p in repetitive_prompts(3)]
    executor, speculator = spec_executor(tiny, NgramProposer(2, 4), max_batch_size=2)
    assert run(executor, requests) == run(plain, requests)
    assert speculator.stats.num_draft_tokens == 0


def test_draft_model_matches_plain(tiny, plain, models_dir):
    section = SpeculativeSection(method="draft", draft_model="builtin:tiny", num_tokens=3)
    speculator = make_speculator(section, tiny.tokenizer, tiny.config["vocab_size"], str(models_dir))
    executor = make_executor(tiny, None, speculator=speculator)
    prompts = [random_prompt(12 + 3 * i, i) for i in range(len(MIXED))]
    requests = list(zip(prompts, MIXED))
    assert run(executor, requests) == run(plain, requests)
    assert speculator.stats.num_accepted_tokens > 0
    p = [(prompts[0], greedy())]
    speculator.reset_stats()
    assert run(executor, p) == run(plain, p)
    assert speculator.stats.acceptance_rate == 1.0  # the draft is the target itself


def test_draft_model_with_another_tokenizer_is_refused(tiny, tiny_model_path, tmp_path, models_dir):
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_model_path, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    section = SpeculativeSection(method="draft", draft_model=str(other))
    with pytest.raises(DraftModelError, match="speculative.draft_model .*tokenizer differs.*2 differ"):
        make_speculator(section, tiny.tokenizer, tiny.config["vocab_size"], str(models_dir))
    missing = SpeculativeSection(method="draft", draft_model=str(tmp_path / "missing"))
    with pytest.raises(DraftModelError, match="speculative.draft_model .*missing.*cannot load it"):
        make_speculator(missing, tiny.tokenizer, tiny.config["vocab_size"], str(models_dir))


# ---------------------------------------------------------------------------
# Checkpoints of real architectures (built like tests/test_checkpoints.py)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    from tests.test_checkpoints import SPECS, build_checkpoint, silent_tokens

    root, tokenizer_dir = tmp_path_factory.mktemp("spec-checkpoints"), Path(tiny_model_path)
    silent = silent_tokens(tokenizer_dir)
    return {name: build_checkpoint(root / name, SPECS[name], tokenizer_dir, silent) for name in ("llama", "qwen3_moe")}


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_checkpoints_match_plain_with_ngram_and_a_draft(arch, checkpoints):
    from mlx_cluster.models.loader import load_model_shard
    from tests.test_checkpoints import PROMPT_TEXT

    loaded = load_model_shard(str(checkpoints[arch]), mx.distributed.init())
    vocab = loaded.config["vocab_size"]
    prompt = list(loaded.tokenizer.encode(PROMPT_TEXT))
    # 64 tokens: llama's greedy text falls into a loop after a few dozen.
    requests = [(prompt, greedy(64)), (prompt[:5] * 6, greedy(64)), (prompt, MIXED[1]), (prompt[3:], MIXED[3])]
    reference = run(make_executor(loaded, None), requests)
    ngram, s_ngram = spec_executor(loaded, NgramProposer(2, 4))
    assert run(ngram, requests) == reference
    draft_path = str(checkpoints["llama" if arch == "qwen3_moe" else "qwen3_moe"])
    section = SpeculativeSection(method="draft", draft_model=draft_path)
    s_draft = make_speculator(section, loaded.tokenizer, vocab, "/nonexistent")
    assert run(make_executor(loaded, None, speculator=s_draft), requests) == reference
    assert s_draft.stats.num_draft_tokens > 0
    if arch == "llama":  # its greedy text loops: n-gram lookup finds it
        assert s_ngram.stats.num_accepted_tokens > 0
