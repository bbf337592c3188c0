"""Units without a server: stop-string holding (engine/output.py), the frontend's event stream
(engine/frontend.py) and the sampling helpers (engine/sampling.py)."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_cluster.engine.decode import (
    RowSampling,
    _needs_sort,
    _RowArrays,
    _sample_plain,
    _sample_sorted,
    _uniform,
)
from mlx_cluster.engine.executor import TokenOutput
from mlx_cluster.engine.frontend import DoneEvent, ErrorEvent, Frontend, GenerationRequest, TokenEvent
from mlx_cluster.engine.output import TextAssembler
from mlx_cluster.engine.plan import SamplingParams
from mlx_cluster.engine.sampling import make_logits_processors, top_logprobs

# ---- fakes -------------------------------------------------------------------------------------


class FakeDetokenizer:
    """Maps token ids to text; `lag` holds each token back until the next one (like BPE's spaces)."""

    def __init__(self, pieces: dict[int, str], lag: bool = False, explode_on: int | None = None):
        self.pieces, self.lag, self.explode_on = pieces, lag, explode_on
        self.text, self.offset, self.pending = "", 0, ""

    def add_token(self, token: int) -> None:
        if token == self.explode_on:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        if self.lag:
            self.text, self.pending = self.text + self.pending, self.pieces[token]
        else:
            self.text += self.pieces[token]

    def finalize(self) -> None:
        self.text, self.pending = self.text + self.pending, ""

    @property
    def last_segment(self) -> str:
        segment, self.offset = self.text[self.offset :], len(self.text)
        return segment


class FakeTokenizer:
    eos_token_ids = {0}
    all_special_ids = [0]

    def __init__(self, pieces: dict[int, str], explode_on: int | None = None):
        self.pieces, self.explode_on = pieces, explode_on

    @property
    def detokenizer(self):
        return FakeDetokenizer(self.pieces, explode_on=self.explode_on)


def feed(assembler: TextAssembler, tokens: list[int]) -> tuple[list[str], list[bool]]:
    deltas, stops = [], []
    for t in tokens:
        delta, stopped = assembler.add(t)
        deltas.append(delta)
        stops.append(stopped)
    return deltas, stops


# ---- TextAssembler -----------------------------------------------------------------------------

PIECES = {1: "Hello ", 2: "wor", 3: "ld. ST", 4: "OP", 5: " more", 6: "ART", 7: "xcd", 8: "b", 9: "STOP!"}


def test_without_stop_strings_text_flows_at_once():
    a = TextAssembler(FakeDetokenizer(PIECES), [], set())
    deltas, stops = feed(a, [1, 2, 3])
    assert deltas == ["Hello ", "wor", "ld. ST"] and not any(stops)
    assert a.finish() == ""


def test_stop_string_split_across_tokens_is_never_emitted():
    a = TextAssembler(FakeDetokenizer(PIECES), ["STOP"], set())
    deltas, stops = feed(a, [1, 2, 3, 4])
    assert stops == [False, False, False, True]
    assert "".join(deltas) == "Hello world. "
    assert not any("S" in d for d in deltas)
    # Text that might begin the stop string is held back, everything before it goes out.
    assert "".join(deltas[:3]) == "Hello world. ST"[:-3]
    # After the stop nothing more comes out, not even from finish().
    assert a.add(5) == ("", True)
    assert a.finish() == ""


def test_held_text_that_is_not_a_stop_string_is_released():
    a = TextAssembler(FakeDetokenizer(PIECES), ["STOP"], set())
    deltas, stops = feed(a, [1, 2, 3, 6, 5])
    assert not any(stops)
    assert "".join(deltas) + a.finish() == "Hello world. START more"


def test_stop_string_inside_one_token_and_the_earliest_of_several_wins():
    a = TextAssembler(FakeDetokenizer(PIECES), ["STOP"], set())
    assert a.add(9) == ("", True)
    a = TextAssembler(FakeDetokenizer(PIECES), ["b", "cd"], set())
    assert a.add(7) == ("x", True)
    a = TextAssembler(FakeDetokenizer({1: "ab", 2: "cd"}), ["never", "bc"], set())
    deltas, stops = feed(a, [1, 2])
    assert "".join(deltas) == "a" and stops == [False, True]


def test_empty_stop_strings_are_ignored():
    a = TextAssembler(FakeDetokenizer(PIECES), ["", "STOP"], set())
    deltas, _ = feed(a, [1])
    assert a.hold_chars == 3
    assert "".join(deltas) + a.finish() == "Hello "


def test_hidden_tokens_add_no_text():
    a = TextAssembler(FakeDetokenizer({1: "a", 2: "b"}), [], {0})
    deltas, _ = feed(a, [1, 0, 2, 0])
    assert deltas == ["a", "", "b", ""]


def test_finish_flushes_held_text_and_finds_a_stop_completed_by_the_flush():
    a = TextAssembler(FakeDetokenizer({1: "xx S", 2: "TOP", 3: "TAR"}, lag=True), ["STOP"], set())
    deltas, stops = feed(a, [1, 2])  # "TOP" is still inside the detokenizer
    assert not any(stops) and "".join(deltas) == "x"
    assert a.finish() == "x " and a.stopped
    b = TextAssembler(FakeDetokenizer({1: "xx S", 2: "TOP", 3: "TAR"}, lag=True), ["STOP"], set())
    deltas, _ = feed(b, [1, 3])
    assert "".join(deltas) + b.finish() == "xx STAR" and not b.stopped


def test_stop_strings_with_the_real_tokenizer(tiny_model_path):
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(Path(tiny_model_path))
    ids = tokenizer.encode("hello world, lists of dicts END and more", add_special_tokens=False)
    full = tokenizer.decode(ids)
    for stop in ("END", "lo wo", "s of d", ", "):
        assert stop in full
        a = TextAssembler(tokenizer.detokenizer, [stop], set())
        deltas, stops = feed(a, ids)
        assert any(stops), stop
        assert "".join(deltas) == full[: full.index(stop)], stop


# ---- Frontend events -------------------------------------------------------------------------


def frontend(pieces=None, explode_on=None) -> Frontend:
    pieces = pieces or {i: chr(ord("a") + i) for i in range(1, 26)}
    return Frontend(FakeTokenizer(pieces, explode_on), max_batch_size=8, max_new_per_step=8, max_queue=8)


def request(rid: str, events: list, *, n: int = 1, max_tokens: int = 10, stop=()) -> GenerationRequest:
    return GenerationRequest(
        rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens, seed=1), events.append, n=n, stop=list(stop)
    )


def text_of(events, index: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent) and e.index == index)


def test_stop_string_on_the_last_allowed_token_reports_stop():
    fe = frontend({1: "ab", 2: "cS", 3: "TOP"})
    events = []
    assert fe.submit(request("r", events, max_tokens=3, stop=["STOP"]))
    seq = fe.next_plan(0, 0).new[0].seq_id
    fe.emit([TokenOutput(seq, 1, None)])
    fe.emit([TokenOutput(seq, 2, None)])
    fe.emit([TokenOutput(seq, 3, "length")])  # the batcher's length limit and the stop string coincide
    assert text_of(events) == "abc"
    assert [e.finish_reason for e in events if isinstance(e, TokenEvent) and e.finish_reason] == ["stop"]
    assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 3


def test_n_choices_count_the_prompt_once():
    fe = frontend()
    events = []
    assert fe.submit(request("r", events, n=2, max_tokens=2))
    plan = fe.next_plan(0, 0)
    assert len(plan.new) == 2
    assert plan.new[0].params.seed != plan.new[1].params.seed
    a, b = (s.seq_id for s in plan.new)
    fe.emit([TokenOutput(a, 1, None), TokenOutput(b, 2, None)])
    fe.emit([TokenOutput(a, 3, "length"), TokenOutput(b, 4, "length")])
    assert (text_of(events, 0), text_of(events, 1)) == ("bd", "ce")
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.prompt_tokens == 3 and done.completion_tokens == 4


def test_a_request_whose_text_fails_ends_alone_with_an_error():
    fe = frontend(explode_on=13)
    bad, good = [], []
    assert fe.submit(request("bad", bad))
    assert fe.submit(request("good", good, max_tokens=3))
    s_bad, s_good = (s.seq_id for s in fe.next_plan(0, 0).new)
    fe.emit([TokenOutput(s_bad, 1, None), TokenOutput(s_good, 1, None)])
    fe.emit([TokenOutput(s_bad, 13, None), TokenOutput(s_good, 2, None)])  # detokenizing 13 raises
    assert isinstance(bad[-1], ErrorEvent) and bad[-1].status == 500 and "UnicodeDecodeError" in bad[-1].message
    # The broken sequence leaves the batch on every rank at the next step; the other one goes on.
    assert fe.next_plan(1, 0).drop == (s_bad,)
    n_bad = len(bad)
    fe.emit([TokenOutput(s_bad, 4, None), TokenOutput(s_good, 3, "length")])
    assert len(bad) == n_bad  # nothing after the error
    assert text_of(good) == "bcd" and isinstance(good[-1], DoneEvent)
    assert not fe.has_work_threadsafe()
    assert fe.stats.seqs_running == 0


def test_abort_drops_the_sequence_and_silences_it():
    fe = frontend()
    events = []
    assert fe.submit(request("r", events))
    seq = fe.next_plan(0, 0).new[0].seq_id
    fe.emit([TokenOutput(seq, 1, None)])
    fe.abort("r")
    assert fe.next_plan(1, 0).drop == (seq,)
    n = len(events)
    fe.emit([TokenOutput(seq, 2, None)])
    assert len(events) == n
    assert not fe.has_work_threadsafe() and fe.queue_depth == 0


# ---- sampling helpers -----------------------------------------------------------------------------


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 8, "seed": 0, **kw})


def logprobs_row(values) -> mx.array:
    logits = mx.array([values], dtype=mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


ROW = logprobs_row([2.0, 1.9, 1.8, 1.7, 1.6, 0.0, -1.0, -2.0])


def sample_batch(rows: list[SamplingParams], logprobs: mx.array, steps: int) -> list[list[int]]:
    """`steps` tokens per row from the batched sampler, each step on the same logprobs."""
    samplings = [RowSampling(p, logprobs.shape[-1]) for p in rows]
    arrays = _RowArrays.of(samplings)
    sample = _sample_sorted if _needs_sort(samplings) else _sample_plain
    out = []
    for _ in range(steps):
        a = arrays
        out.append(sample(logprobs, a.inv_temp, a.greedy, a.top_p, a.top_k, a.min_p, a.seed_lo, a.seed_hi, a.counter))
        arrays.counter = arrays.counter + 1
    return mx.stack(out, axis=1).tolist()


def draws(p: SamplingParams, n: int = 40) -> list[int]:
    return sample_batch([p], ROW, n)[0]


def test_batched_sampler_is_reproducible_and_seed_dependent():
    a, b, c = draws(params(seed=42)), draws(params(seed=42)), draws(params(seed=43))
    assert a == b
    assert a != c
    assert len(set(a)) > 2  # it really samples


def test_a_rows_tokens_do_not_depend_on_its_neighbours_or_position():
    mine = params(seed=7, temperature=0.9, top_p=0.9)
    alone = sample_batch([mine], ROW, 30)[0]
    others = [params(seed=s, temperature=t) for s, t in ((1, 0.0), (2, 1.5), (3, 0.3))]
    batch = mx.repeat(ROW, 4, axis=0)
    assert sample_batch([*others[:2], mine, others[2]], batch, 30)[2] == alone
    assert sample_batch([mine, *others], batch, 30)[0] == alone


def test_the_batched_sampler_draws_from_the_softmax():
    n = 4000
    got = sample_batch([params(seed=11, temperature=1.0)], ROW, n)[0]
    probs = mx.exp(ROW)[0].tolist()
    for token, p in enumerate(probs):
        freq = got.count(token) / n
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (token, freq, p)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    batch = mx.repeat(ROW, 2, axis=0)
    greedy, sampled = sample_batch([params(temperature=0.0), params(seed=3, temperature=1.5)], batch, 40)
    assert set(greedy) == {0} and len(set(sampled)) > 2


def test_the_noise_is_finite_for_every_hash_so_a_masked_token_is_never_drawn():
    """float32 rounded the top uniform draw to 1.0 and its noise to +inf: one draw in 2**24 won
    the argmax whatever its probability, grammar mask or not (a strict tool call came back broken)."""
    u = _uniform(mx.array([0, 1, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFFFF], dtype=mx.uint32))
    assert mx.all((u > 0) & (u < 1)).item()
    assert mx.all(mx.isfinite(-mx.log(-mx.log(u)))).item()
    # seed 0, token counter 20: the hash of vocabulary id 203,550 was the one that became +inf.
    vocab = 1 << 20
    only = mx.where(mx.arange(vocab) == 5, 0.0, -math.inf)[None, :]
    a = _RowArrays.of([RowSampling(params(seed=0, temperature=1.0), vocab)])
    a.counter = mx.array([20], dtype=mx.uint32)
    token = _sample_plain(only, a.inv_temp, a.greedy, a.top_p, a.top_k, a.min_p, a.seed_lo, a.seed_hi, a.counter)
    assert token.item() == 5


@pytest.mark.parametrize("temperature", [1e-20, 1e-40, 1e-300])
def test_a_vanishing_temperature_is_greedy_not_noise(temperature):
    # 1/T overflowing float32 used to turn the logits into inf/NaN and sample at random.
    for seed in range(3):
        assert set(draws(params(seed=seed, temperature=temperature), 20)) == {0}


@pytest.mark.parametrize("knob", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_restrictive_filters_leave_only_the_best_token(knob):
    for seed in range(3):
        assert set(draws(params(seed=seed, temperature=2.0, **knob), 20)) == {0}


def test_top_k_top_p_and_min_p_limit_the_candidates():
    assert set(draws(params(seed=1, temperature=5.0, top_k=3), 80)) <= {0, 1, 2}
    probs = mx.exp(ROW)[0].tolist()
    # The smallest set of best tokens holding 50% of the mass.
    cut = next(i for i in range(8) if sum(probs[: i + 1]) >= 0.5) + 1
    assert set(draws(params(seed=2, temperature=5.0, top_p=0.5), 80)) <= set(range(cut))
    # min_p: tokens at least 0.5x as likely as the best one (values 2.0 .. 1.4 here).
    allowed = {t for t, p in enumerate(probs) if p >= 0.5 * probs[0]}
    got = set(draws(params(seed=3, temperature=5.0, min_p=0.5), 80))
    assert got <= allowed and len(got) > 1


def test_logit_bias_processor():
    [bias] = make_logits_processors(params(logit_bias=((1, 5.0), (3, -100.0))), prompt_len=0)
    out = bias(mx.array([], dtype=mx.uint32), mx.zeros((1, 4)))
    assert out.tolist() == [[0.0, 5.0, 0.0, -100.0]]


def test_repetition_penalty_scales_seen_tokens_only():
    [rep] = make_logits_processors(params(repetition_penalty=2.0), prompt_len=1)
    logits = mx.array([[4.0, -4.0, 4.0, -4.0]])
    out = rep(mx.array([0, 1, 1]), logits)  # token 1 repeated: penalized once, not twice
    assert out.tolist() == [[2.0, -8.0, 4.0, -4.0]]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    [pf] = make_logits_processors(params(presence_penalty=0.5, frequency_penalty=0.25), prompt_len=2)
    logits = mx.zeros((1, 4))
    context = mx.array([3, 3, 1, 1, 2])  # prompt [3, 3], generated [1, 1, 2]
    assert pf(context, logits).tolist() == [[0.0, -1.0, -0.75, 0.0]]
    assert pf(mx.array([3, 3]), logits).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_no_processors_without_penalties():
    assert make_logits_processors(params(), prompt_len=3) == []


def test_top_logprobs_are_the_best_sorted():
    ids, values = top_logprobs(ROW[0], 3)
    assert ids == [0, 1, 2]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(ROW[0, 0].item())
    ids, _ = top_logprobs(ROW[0], 100)
    assert sorted(ids) == list(range(8))
