"""Sampler: greedy/random sampling, truncation, seeds, penalties, biases, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from test_int8 import assert_tests_pass_on_build, skip_unless_host_runs

from atomr_trio.executor.sampler import NativeSample, Sampler, SampleRow, argmax_rows, draw_rows, top_k_top_p
from atomr_trio.model import native
from atomr_trio.sampling_params import SamplingParams

EOS = 3
V = 16


def row(
    params: SamplingParams,
    seed: int | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
) -> SampleRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = list(output or [])
    return SampleRow(params, gen, list(prompt or []), out, len(out))


# the two implementations of a step's random draws (temperature, the top_k / top_p / min_p cut, the
# draw): the sampler's torch ops, and the native op (model/csrc/sampling.cpp) that float32 CPU
# logits take when the kernels are built
PATHS = ["torch", "native"]


def native_sample(path: str) -> NativeSample | None:
    if path == "torch":
        return None
    k = native.kernels()
    if k is None or k.sample_rows is None:
        pytest.skip("the native kernels did not build here")
    return k.sample_rows


def native_cut(logits: torch.Tensor, ks: list[int], ps: list[float], min_ps: list[float] | None = None) -> torch.Tensor:
    """The native op's cut at temperature 1 (top_k 0: none), read from the logits it leaves."""
    op = native_sample("native")
    assert op is not None
    n = logits.shape[0]
    op(logits, [1.0] * n, ks, ps, min_ps or [0.0] * n, [0.5] * n)
    return logits


def cut_rows(path: str, logits: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    """top_k_top_p's contract (ks[i] = vocab: no top_k) through either path."""
    if path == "torch":
        return top_k_top_p(logits, ks, ps)
    vocab = logits.shape[1]
    return native_cut(logits, [k if k < vocab else 0 for k in ks], ps)


def sample(logits: torch.Tensor | list[list[float]], rows: list[SampleRow], path: str = "torch") -> list[int]:
    t = torch.as_tensor(logits, dtype=torch.float32).clone()
    return Sampler((EOS,), native_sample=native_sample(path))(t, rows).token_ids


def draws(logits: list[float], params: SamplingParams, n: int = 400, path: str = "torch") -> list[int]:
    """n independent samples of one distribution, each from its own seeded row (deterministic)."""
    return sample([logits] * n, [row(params, seed=i) for i in range(n)], path)


def effective_logit_exceeds(
    params: SamplingParams, token: int, logit: float, ref: float, **hist: list[int]
) -> bool:
    """Whether, after penalties/bias, `token` (raw logit `logit`) beats an untouched token at `ref`.

    Greedy picks the larger one, which brackets the adjusted logit without reading internals."""
    logits = [-1000.0] * V
    logits[token] = logit
    logits[15] = ref  # token 15 never appears in any history below
    return sample([logits], [row(params, **hist)])[0] == token


def assert_adjusted_logit(
    params: SamplingParams, token: int, logit: float, expected: float, **hist: list[int]
) -> None:
    assert effective_logit_exceeds(params, token, logit, expected - 1e-3, **hist)
    assert not effective_logit_exceeds(params, token, logit, expected + 1e-3, **hist)


GREEDY = SamplingParams(temperature=0.0)


# ---- greedy and truncation ------------------------------------------------------------------
def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [row(GREEDY) for _ in range(6)]) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("path", PATHS)
def test_greedy_row_is_argmax_inside_a_random_batch(path: str) -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    rows = [row(SamplingParams(temperature=1.0)), row(SamplingParams(temperature=0.0, top_k=2, top_p=0.1)),
            row(SamplingParams(temperature=2.0, top_p=0.5)), row(GREEDY)]
    tokens = sample(logits, rows, path)
    expected = logits.argmax(dim=-1).tolist()
    assert (tokens[1], tokens[3]) == (expected[1], expected[3])


@pytest.mark.parametrize("path", PATHS)
def test_top_k_1_is_greedy_even_at_temperature_1(path: str) -> None:
    logits = torch.randn(32, V, generator=torch.Generator().manual_seed(2))
    rows = [row(SamplingParams(temperature=1.0, top_k=1), seed=i) for i in range(32)]
    assert sample(logits, rows, path) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("path", PATHS)
def test_top_k_limits_choices_to_the_k_best(path: str) -> None:
    logits = [0.0, 1.0, 3.0, 2.9, 2.8] + [-1.0] * (V - 5)
    assert set(draws(logits, SamplingParams(top_k=3), path=path)) == {2, 3, 4}


@pytest.mark.parametrize("path", PATHS)
def test_temperature_scales_the_distribution(path: str) -> None:
    logits = [math.log(3.0), 0.0] + [-1e4] * (V - 2)  # p = (0.75, 0.25) at temperature 1
    n = 4000
    for temperature, p0 in ((1.0, 0.75), (2.0, math.sqrt(3) / (math.sqrt(3) + 1))):
        freq = draws(logits, SamplingParams(temperature=temperature), n, path).count(0) / n
        assert freq == pytest.approx(p0, abs=0.03)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_smallest_set_reaching_mass_p(top_p: float, kept: set[int], path: str) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs] + [-1e4] * (V - 4)
    assert set(draws(logits, SamplingParams(top_p=top_p), path=path)) == kept


@pytest.mark.parametrize("path", PATHS)
def test_top_p_boundary_keeps_the_smallest_set(path: str) -> None:
    # Four equally likely tokens (p = 0.25 each, exact in binary): top_p = 0.5 is reached by two.
    assert len(set(draws([0.0] * 4 + [-1e4] * (V - 4), SamplingParams(top_p=0.5), path=path))) == 2


@pytest.mark.parametrize("path", PATHS)
def test_min_p_drops_tokens_below_a_fraction_of_the_best(path: str) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs] + [-1e4] * (V - 4)
    assert set(draws(logits, SamplingParams(min_p=0.4), path=path)) == {0, 1}  # floor 0.2
    assert set(draws(logits, SamplingParams(min_p=0.2), path=path)) == {0, 1, 2}  # floor 0.1


# ---- seeds -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_seeded_row_is_reproducible_alone_and_inside_a_batch(path: str) -> None:
    logits = torch.zeros(1, V)  # uniform: every token is possible
    params = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler((EOS,), native_sample=native_sample(path))

    def run(batch: bool) -> list[int]:
        r = row(params, seed=7)
        got = []
        for _ in range(20):
            if batch:  # unseeded random neighbours on both sides
                rows = [row(SamplingParams(temperature=0.7)), r, row(SamplingParams(temperature=1.3))]
                got.append(sampler(torch.zeros(3, V), rows).token_ids[1])
            else:
                got.append(sampler(logits.clone(), [r]).token_ids[0])
        return got

    torch.manual_seed(0)
    alone = run(batch=False)
    torch.manual_seed(123)  # the global RNG state must not matter to a seeded row
    assert run(batch=True) == alone
    assert len(set(alone)) > 1  # it is random, not constant

    r8 = row(params, seed=8)
    assert [sampler(logits.clone(), [r8]).token_ids[0] for _ in range(20)] != alone


# ---- penalties and biases -----------------------------------------------------------------
def test_presence_and_frequency_penalties_subtract_exact_amounts() -> None:
    p = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = [4, 4, 4, 5]
    assert_adjusted_logit(p, 4, 2.0, 2.0 - 0.5 - 3 * 0.25, output=out)
    assert_adjusted_logit(p, 5, 2.0, 2.0 - 0.5 - 1 * 0.25, output=out)
    # Tokens only in the prompt are not penalized by presence/frequency.
    assert_adjusted_logit(p, 6, 2.0, 2.0, prompt=[6], output=out)


def test_negative_presence_penalty_encourages_repeats() -> None:
    p = SamplingParams(temperature=0.0, presence_penalty=-1.5)
    assert_adjusted_logit(p, 4, 1.0, 2.5, output=[4])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert_adjusted_logit(p, 4, 3.0, 1.5, prompt=[4])  # seen in the prompt
    assert_adjusted_logit(p, 5, 3.0, 1.5, output=[5])  # seen in the output
    assert_adjusted_logit(p, 6, -1.0, -2.0, prompt=[6])
    assert_adjusted_logit(p, 7, 3.0, 3.0, prompt=[4], output=[5])  # unseen: unchanged


def test_penalties_apply_only_to_their_own_row() -> None:
    logits = [[0.0] * V, [0.0] * V]
    logits[0][4] = logits[1][4] = 1.0
    rows = [row(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[4]), row(GREEDY, output=[4])]
    tokens = sample(logits, rows)
    assert tokens[0] != 4 and tokens[1] == 4


def test_logit_bias_adds_to_the_logit() -> None:
    assert_adjusted_logit(SamplingParams(temperature=0.0, logit_bias={9: 1.5}), 9, 0.25, 1.75)
    banned = SamplingParams(temperature=0.0, logit_bias={2: -100.0})
    logits = [0.0] * V
    logits[2] = 50.0
    assert sample([logits], [row(banned)]) != [2]


def test_logit_bias_with_temperature_sampling() -> None:
    logits = [0.0] * V
    assert set(draws(logits, SamplingParams(logit_bias={5: 100.0}), 50)) == {5}


# ---- min_tokens ---------------------------------------------------------------------------
def test_min_tokens_blocks_eos_and_stop_tokens_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])
    logits = [0.0] * V
    logits[EOS], logits[7], logits[9] = 10.0, 9.0, 1.0
    assert sample([logits], [row(params, output=[])]) == [9]
    assert sample([logits], [row(params, output=[1])]) == [9]
    assert sample([logits], [row(params, output=[1, 1])]) == [EOS]
    logits[EOS] = 0.0
    assert sample([logits], [row(params, output=[1, 1])]) == [7]


@pytest.mark.parametrize("path", PATHS)
def test_min_tokens_blocks_eos_for_random_sampling(path: str) -> None:
    logits = [0.0] * V
    logits[EOS] = 5.0
    assert EOS not in draws(logits, SamplingParams(min_tokens=1), 100, path)


def test_min_tokens_leaves_eos_alone_with_ignore_eos() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    logits = [0.0] * V
    logits[EOS] = 10.0
    assert sample([logits], [row(params)]) == [EOS]


# ---- which steps may take the lm_head's argmax instead of logits ----------------------------------
ARGMAX_ROWS = [  # (params, outputs so far, constrained, whether the raw argmax is the row's token)
    (SamplingParams(temperature=0.0), [], False, True),
    (SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), [], False, True),  # nothing forbidden
    (SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7]), [1, 1], False, True),  # reached
    (SamplingParams(temperature=0.0, min_tokens=2), [], False, False),  # EOS forbidden yet
    (SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[7]), [1], False, False),
    (SamplingParams(temperature=0.0, logprobs=0), [], False, False),  # reads the logits
    (SamplingParams(temperature=0.0, presence_penalty=0.5), [], False, False),
    (SamplingParams(temperature=0.0, repetition_penalty=1.2), [], False, False),
    (SamplingParams(temperature=0.0, logit_bias={5: 1.0}), [], False, False),
    (SamplingParams(temperature=0.0), [], True, False),  # a grammar masks the logits
    (SamplingParams(temperature=0.7), [], False, False),  # draws
]


@pytest.mark.parametrize(("params", "output", "constrained", "argmax"), ARGMAX_ROWS)
def test_takes_argmax_only_where_the_token_is_the_raw_argmax(params: SamplingParams, output: list[int],
                                                             constrained: bool, argmax: bool) -> None:
    """`takes_argmax` lets a step skip logits and the sampler (ModelRunner: the lm_head's argmax)
    only when every row is one whose token is its raw logits' argmax; one row that is not keeps
    the whole step on logits."""
    r = row(params, output=output)
    if constrained:
        r.matcher = object()  # type: ignore[assignment]  # (only its presence is read)
    plain = row(SamplingParams(temperature=0.0))
    sampler = Sampler((EOS,))
    assert sampler.takes_argmax([plain, r]) is argmax
    if argmax:  # the sampler itself gives the argmax there
        g = torch.Generator().manual_seed(len(output))
        logits = torch.randn(2, V, generator=g)
        logits[:, EOS] = 9.0  # EOS the best: a row that still forbade it would take another token
        assert sampler(logits.clone(), [plain, r]).token_ids == logits.argmax(dim=-1).tolist()


# ---- logprobs -----------------------------------------------------------------------------
def test_logprobs_are_raw_log_softmax_with_rank_and_sorted_top() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 3.0, 0.0, 0.2, 0.1]])
    raw = torch.log_softmax(logits, dim=-1)[0]
    # Penalties and bias make token 1 the choice; the logprobs still describe the raw logits.
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0, logit_bias={1: 5.0}, logprobs=3)
    out = Sampler((EOS,))(logits.clone(), [row(params, prompt=[4, 7], output=[3])])
    assert out.token_ids == [1]
    lp = out.logprobs[0]
    assert lp is not None
    assert lp.token_id == 1
    assert lp.logprob == pytest.approx(float(raw[1]))
    assert lp.rank == 2  # only token 4 has a larger raw logit
    assert [t for t, _ in lp.top] == [4, 1, 3]
    assert [v for _, v in lp.top] == pytest.approx([float(raw[4]), float(raw[1]), float(raw[3])])


def test_logprobs_zero_gives_only_the_sampled_token_and_none_when_not_asked() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.5], [1.0, 2.0, 0.0, 0.5]])
    rows = [row(SamplingParams(temperature=0.0, logprobs=0)), row(GREEDY)]
    out = Sampler((EOS,))(logits.clone(), rows)
    assert out.logprobs[1] is None
    lp = out.logprobs[0]
    assert lp is not None and lp.top == [] and lp.rank == 1
    assert lp.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))


@pytest.mark.parametrize("path", PATHS)
def test_logprobs_rank_of_a_random_sample(path: str) -> None:
    """Logprobs are of the raw logits, which the native op then scales and cuts in place."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 64)
    rows = [row(SamplingParams(logprobs=2, temperature=0.5, top_k=3), seed=i) for i in range(64)]
    out = Sampler((EOS,), native_sample=native_sample(path))(logits.clone(), rows)
    assert len(set(out.token_ids)) > 1
    raw = torch.log_softmax(logits[0], dim=0)
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp is not None
        assert lp.rank == 4 - tok  # token 3 is the best
        assert [t for t, _ in lp.top] == [3, 2]
        assert lp.logprob == pytest.approx(raw[tok].item())


def test_row_argmax_is_torch_s_on_ties_nan_infinities_and_strided_rows() -> None:
    """The sampler's CPU argmax (through NumPy) picks what torch.argmax picks: the first of equal
    maxima, a NaN over any number, and any finite value over -inf."""
    nan, inf = float("nan"), float("inf")
    cases = [
        torch.tensor([[1.0, 3.0, 3.0, 0.0], [nan, 1.0, nan, 2.0], [-inf, -inf, -inf, -inf], [-inf, -5.0, -inf, -5.0]]),
        torch.randn(16, 49152),
        torch.randn(7, 33).t(),  # not contiguous
        torch.randn(5, 9)[:, ::2],
    ]
    for x in cases:
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    x = torch.randn(3, 11, dtype=torch.bfloat16)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))  # other dtypes stay with torch


def test_a_repetition_penalty_too_small_for_float32_keeps_masked_tokens_out() -> None:
    """1e-139 rounds to 0 in float32: the penalty once divided by zero and multiplied -inf (a
    masked token) by zero, and the NaN that made was sampled (a fuzzed request, 503)."""
    logits = torch.full((1, V), float("-inf"))
    logits[0, 4], logits[0, 6] = 2.0, -1.0  # only 4 and 6 allowed; 0 masked but seen
    params = SamplingParams(temperature=0.0, repetition_penalty=1e-139)
    out = Sampler((EOS,))(logits.clone(), [row(params, prompt=[0, 4, 6])])
    assert out.token_ids == [4]
    sampled = SamplingParams(temperature=1.0, repetition_penalty=1e-139, seed=1)
    assert Sampler((EOS,))(logits.clone(), [row(sampled, prompt=[0, 4, 6])]).token_ids[0] in (4, 6)


# ---- the large-vocabulary paths (no sort, one random number per row) --------------------------
def sorted_cut(logits: torch.Tensor, top_k: int, top_p: float, tol: float = 0.0) -> tuple[set[int], set[int]]:
    """The tokens a whole-row sort keeps (the top_k best, then the smallest best-first prefix
    whose probability after top_k reaches top_p), exactly; and the tokens whose mass before them
    lies within `tol` of top_p, where float32 rounding may decide either way."""
    order = logits.argsort(descending=True, stable=True)[:top_k]  # ties: by index
    probs = torch.softmax(logits[order].double(), dim=0)
    before = probs.cumsum(0) - probs
    return set(order[before < top_p].tolist()), set(order[(before - top_p).abs() <= tol].tolist())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat (the histogram path) to peaked (the candidates)
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (0, 0.5), (0, 0.999), (40, 0.9), (600, 0.95), (7, 1.0)])
def test_top_k_top_p_over_a_large_vocabulary_keeps_what_a_sort_keeps(
        scale: float, top_k: int, top_p: float, path: str) -> None:
    vocab = 49152
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(int(scale * 10) + top_k)) * scale
    logits[5, 1000:] = float("-inf")  # a row that a grammar masked down to 1000 tokens
    ks = [top_k if top_k else vocab] * 6
    out = cut_rows(path, logits.clone(), ks, [top_p] * 6)
    for i in range(6):
        kept = set(torch.isfinite(out[i]).nonzero().squeeze(1).tolist())
        expected, either = sorted_cut(logits[i], ks[i], top_p, tol=1e-5)  # float32 probabilities
        assert kept - either == expected - either
        assert len(either) < vocab // 100  # the check above still covers nearly every token
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])  # kept logits untouched


@pytest.mark.parametrize("path", PATHS)
def test_top_p_over_a_large_vocabulary_keeps_the_first_ties_that_fit(path: str) -> None:
    logits = torch.zeros(2, 4096)  # 4096 equally likely tokens (2**-12 each): 0.375 is reached by 1536
    logits[1, :10] = 2.0
    out = cut_rows(path, logits.clone(), [4096, 4096], [0.375, 0.375])
    assert torch.isfinite(out[0]).nonzero().squeeze(1).tolist() == list(range(1536))
    assert torch.isfinite(out[1]).sum().item() == len(sorted_cut(logits[1], 4096, 0.375)[0])


def test_draw_rows_follows_the_probabilities_and_never_draws_a_zero() -> None:
    vocab = 3000  # three chunks, the last one padded
    probs = torch.zeros(4, vocab)
    probs[0, [5, 1500, 2999]] = torch.tensor([0.2, 0.3, 0.5])
    probs[1, 2999] = 1.0  # the very last entry
    probs[2, 0] = 1.0  # the very first
    probs[3] = torch.rand(vocab, generator=torch.Generator().manual_seed(0))
    probs[3, ::2] = 0.0
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        tokens = draw_rows(probs[i].expand(n, vocab), u)
        assert set(tokens.tolist()) <= set(probs[i].nonzero().squeeze(1).tolist())
    freq = torch.bincount(draw_rows(probs[0].expand(n, vocab), u), minlength=vocab)[[5, 1500, 2999]] / n
    assert torch.allclose(freq, torch.tensor([0.2, 0.3, 0.5]), atol=0.015)
    assert torch.all(draw_rows(probs[3].expand(n, vocab), u) % 2 == 1)
    edges = torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64)  # the ends of [0, 1)
    assert draw_rows(probs[0].expand(2, vocab), edges).tolist() == [5, 2999]


def test_penalties_over_a_large_vocabulary_change_only_each_row_s_seen_tokens() -> None:
    """Rows of different history lengths (one with none, one with repeats and a masked token) get
    exactly the dense formula: seen tokens divided or multiplied by the repetition penalty, output
    tokens lowered by frequency x count + presence, every other logit untouched."""
    vocab, gen = 49152, torch.Generator().manual_seed(3)
    logits = torch.randn(4, vocab, generator=gen) * 4
    logits[2, 7] = float("-inf")
    histories = [([5, 9, 9000], [9000, 9000, 12]), ([], []), ([7, 7, 100], [100, 7, 40000, 40000]), ([1], [])]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
              SamplingParams(temperature=0.0, repetition_penalty=1.2),
              SamplingParams(temperature=0.0, repetition_penalty=0.8, frequency_penalty=-0.5),
              SamplingParams(temperature=0.0)]  # no penalties: left alone
    rows = [row(p, prompt=h[0], output=h[1]) for p, h in zip(params, histories, strict=True)]
    got = Sampler._penalize(logits.clone(), rows)
    want = logits.clone()
    for i, ((prompt, output), p) in enumerate(zip(histories, params, strict=True)):
        if not p.uses_penalties:
            continue
        for t in set(prompt) | set(output):
            x = want[i, t]
            if torch.isfinite(x):
                want[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(output):
            want[i, t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[2, 7], torch.tensor(float("-inf")))
    assert torch.equal(got[1], logits[1]) and torch.equal(got[3], logits[3])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=1.0, top_k=5, top_p=0.5, min_p=0.1)])
def test_a_row_with_nothing_to_draw_still_gets_a_token_of_the_vocabulary(params: SamplingParams, path: str) -> None:
    """NaN logits or every token masked: the draw has no mass. The token is then the row's argmax
    (a NaN first, as greedy takes it), never an index past the vocabulary's end (3000 tokens are
    not a whole number of chunks)."""
    logits = torch.randn(3, 3000)
    logits[0] = float("nan")
    logits[1] = float("-inf")
    rows = [row(params, seed=i) for i in range(3)]
    tokens = sample(logits, rows, path)
    assert tokens[:2] == [0, 0] and 0 <= tokens[2] < 3000


@pytest.mark.parametrize("path", PATHS)
def test_a_top_p_that_rounds_to_zero_keeps_the_best_token(path: str) -> None:
    logits = torch.randn(8, 3000, generator=torch.Generator().manual_seed(4))
    rows = [row(SamplingParams(temperature=1.0, top_p=1e-50), seed=i) for i in range(8)]
    assert sample(logits, rows, path) == logits.argmax(dim=-1).tolist()


def test_top_p_over_float64_logits_keeps_what_float32_keeps() -> None:
    logits = torch.randn(2, 4096, generator=torch.Generator().manual_seed(5)) * 0.3  # flat: no candidate cut
    out32 = top_k_top_p(logits.clone(), [4096, 4096], [0.6, 0.6])
    out64 = top_k_top_p(logits.double(), [4096, 4096], [0.6, 0.6])
    assert torch.equal(torch.isfinite(out32), torch.isfinite(out64))


@pytest.mark.parametrize("path", PATHS)
def test_which_ties_a_row_keeps_does_not_depend_on_its_neighbours(path: str) -> None:
    """4096 equal logits under top_p 0.375: the row keeps 1536 of them, the same ones alone and
    beside a row whose top_k of 2000 widens the batch's candidates."""
    tied = torch.zeros(1, 4096)
    alone = cut_rows(path, tied.clone(), [4096], [0.375])
    other = torch.randn(1, 4096, generator=torch.Generator().manual_seed(6))
    batched = cut_rows(path, torch.cat([tied, other]), [4096, 2000], [0.375, 0.9])
    assert torch.equal(torch.isfinite(batched[0]), torch.isfinite(alone[0]))
    assert torch.isfinite(alone[0]).sum().item() == 1536
    assert torch.isfinite(batched[1]).nonzero().squeeze(1).tolist() == sorted(
        cut_rows(path, other.clone(), [2000], [0.9])[0].isfinite().nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("path", PATHS)
def test_min_p_over_a_large_vocabulary_drops_what_the_probabilities_say(path: str) -> None:
    """min_p compares logits with max + log(min_p); that is p < min_p * p_max, token for token."""
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(7)) * 3
    logits[3, 100:] = float("-inf")
    min_ps = [0.05, 0.3, 0.0, 1.0]
    if path == "torch":
        out = Sampler._truncate(logits.clone(), [row(SamplingParams(min_p=m)) for m in min_ps])
    else:
        out = native_cut(logits.clone(), [0] * 4, [1.0] * 4, min_ps)
    ratio = torch.softmax(logits.double(), dim=-1)
    ratio = ratio / ratio.max(dim=-1, keepdim=True).values
    for i, m in enumerate(min_ps):
        sure = (ratio[i] - m).abs() > 1e-5
        assert torch.equal(torch.isfinite(out[i])[sure], (ratio[i] >= m)[sure] & torch.isfinite(logits[i])[sure])
    assert torch.isfinite(out[2]).all() and torch.isfinite(out[3]).sum().item() == 1


# ---- the native op (model/csrc/sampling.cpp): its cut against a sort where its buckets are strained ----
@pytest.mark.parametrize(("case", "top_k", "top_p"), [
    ("far outlier", 300, 0.95),  # one finite logit 1e30 below: the span is capped, the rest still spread
    ("far outlier", 0, 0.9),  # ... and in the mass that top_p reads (its exp is 0, not inf or NaN)
    ("lowest float mask", 0, 0.9),  # the HF way of masking: float32's lowest instead of -inf
    ("lowest float mask", 5, 0.5),
    ("tiny span", 0, 0.5),  # logits 1e-38 apart: buckets per logit unit past float32's range
    ("very spread", 50, 1.0),  # scale 60: the 50th best lies past the capped span, in the last bucket
    ("very spread", 20000, 1.0),  # the top_k boundary among the thousands of tokens of the last bucket
    ("all tied", 1000, 0.5),  # one bucket holds every token: ties by index
    ("odd vocabulary", 17, 0.8),  # 3001 tokens: every vector loop's remainder
])
def test_native_cut_keeps_what_a_sort_keeps_where_buckets_are_strained(case: str, top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(11)
    vocab = 3001 if case == "odd vocabulary" else 49152
    logits = torch.randn(3, vocab, generator=gen) * (60.0 if case == "very spread" else 2.0)
    if case == "far outlier":
        logits[:, 123] = -1e30
    if case == "all tied":
        logits[:] = 0.5
    if case == "lowest float mask":
        logits[:, 10:] = torch.finfo(torch.float32).min
    if case == "tiny span":
        logits = logits.sign() * 1e-38
    logits[2, vocab // 2:] = float("-inf")  # a masked half
    out = native_cut(logits.clone(), [top_k] * 3, [top_p] * 3)
    for i in range(3):
        kept = set(torch.isfinite(out[i]).nonzero().squeeze(1).tolist())
        if top_p < 1:
            expected, either = sorted_cut(logits[i], top_k or vocab, top_p, tol=1e-5)
        else:  # no top_p: the top_k best, ties by index (a float64 cumulative sum may reach 1 early)
            expected, either = set(logits[i].argsort(descending=True, stable=True)[:top_k].tolist()), set()
        expected = {t for t in expected if math.isfinite(logits[i, t])}
        assert kept - either == expected - either
        assert len(either) < vocab // 100 or case == "all tied" and kept == expected
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_native_op_leaves_rows_it_cannot_order_alone_and_combines_min_p() -> None:
    op = native_sample("native")
    assert op is not None
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(12))
    logits[0, 7] = float("nan")
    logits[1] = float("-inf")
    logits[2, 9] = float("inf")
    out = logits.clone()
    tokens = op(out, [1.0] * 4, [5] * 4, [0.9] * 4, [0.2] * 4, [0.5] * 4).tolist()
    assert torch.equal(out[:3].nan_to_num(), logits[:3].nan_to_num())  # left as they are
    assert tokens[:3] == [0, 0, 0]  # what the torch path's argmax of NaN probabilities gives
    best = logits[3].topk(5).values
    probs = torch.softmax(best.double(), dim=0)
    by_p = int(((probs.cumsum(0) - probs) < 0.9).sum())
    by_min_p = int((best[:by_p] >= logits[3].max() + math.log(0.2)).sum())
    assert set(torch.isfinite(out[3]).nonzero().squeeze(1).tolist()) == set(logits[3].topk(by_min_p).indices.tolist())
    assert tokens[3] in logits[3].topk(by_min_p).indices.tolist()


def test_native_draws_follow_the_probabilities_and_never_draw_a_zero() -> None:
    """The op's draw: one point u of [0, 1) inverted through the kept tokens' cumulative
    probabilities in index order; tokens outside the cut, or of probability 0, never come."""
    op = native_sample("native")
    assert op is not None
    vocab, n = 3000, 20000  # three chunks of 1024, the last one short
    base = torch.full((vocab,), float("-inf"))
    base[[5, 1500, 2999]] = torch.tensor([0.2, 0.3, 0.5]).log()
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).tolist()
    tokens = op(base.expand(n, vocab).contiguous(), [1.0] * n, [0] * n, [1.0] * n, [0.0] * n, u)
    assert set(tokens.tolist()) == {5, 1500, 2999}
    freq = torch.bincount(tokens, minlength=vocab)[[5, 1500, 2999]] / n
    assert torch.allclose(freq, torch.tensor([0.2, 0.3, 0.5], dtype=freq.dtype), atol=0.015)
    edges = op(base.expand(2, vocab).contiguous(), [1.0] * 2, [0] * 2, [1.0] * 2, [0.0] * 2, [0.0, 1.0 - 2**-53])
    assert edges.tolist() == [5, 2999]  # the ends of [0, 1): the first and the last token
    flat = torch.zeros(2, vocab)  # the cut (top_k 2: tokens 0 and 1) bounds what the draw sees
    assert set(op(flat, [1.0] * 2, [2, 2], [1.0] * 2, [0.0] * 2, [0.3, 0.7]).tolist()) == {0, 1}
    hot = torch.tensor([[0.0, 3.0, 1.0, 3.0]])  # temperature 0: the first of the largest, uncut
    assert op(hot.clone(), [0.0], [1], [0.1], [0.5], [0.9]).tolist() == [1]
    # a tiny temperature leaves every other token ~1e5 below the best: probability 0 on every build
    # (the AVX2 exp answers 1.6e-38 there, not 0), so even u = 0 draws the best
    peaked = torch.zeros(2, 16)
    peaked[:, 5] = 1.0
    assert op(peaked, [1e-5] * 2, [0, 2], [1.0] * 2, [0.0] * 2, [0.0, 0.0]).tolist() == [5, 5]


def test_native_and_torch_paths_sample_the_same_tokens() -> None:
    """A batch mixing temperatures, every truncation and greedy rows (never cut) draws the same
    seeded tokens through either path (both invert the same cumulative probabilities at the same
    point; only float rounding at a token's edge, ~1e-7 of the mass, could tell them apart)."""
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(12, 5000, generator=gen) * torch.tensor([0.5, 2.0, 8.0]).repeat(4).unsqueeze(1)
    params = [SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(temperature=1.0, top_k=40),
              SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.05),
              SamplingParams(temperature=1.2, top_k=300, top_p=0.8, min_p=0.01), SamplingParams(temperature=1.0)]
    for step in range(10):
        def rows() -> list[SampleRow]:  # the same seeds for both paths
            return [row(params[i % len(params)], seed=100 * step + i) for i in range(12)]  # noqa: B023

        assert sample(logits, rows(), "torch") == sample(logits, rows(), "native")
        logits = logits.roll(1, dims=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64", "haswell"])
def test_other_builds_pass_the_native_sampler_tests(arch: str) -> None:
    """The sampler's op built for a baseline x86-64 CPU (portable loops: the polynomial exp in a
    loop the compiler vectorizes, as on Arm) and for an AVX2-only CPU (the AVX2 vector exp, which
    answers 1.6e-38 below -87) passes this file's native cases, in a subprocess whose library is a
    second cached build (skipped where this machine's own build takes the same branches)."""
    skip_unless_host_runs(arch)
    assert_tests_pass_on_build(arch, [__file__], "native and not other_builds")
