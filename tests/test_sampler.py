"""Sampler: greedy, filters against a loop-and-sort reference, seeds, distribution, logprobs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.sampling_params import SamplingParams
from workers.sampler import (
    Sampler,
    SamplingBatch,
    apply_top_k_top_p_min_p,
    make_generator,
    probs_from_logits,
    sample_from_probs,
)


def reference_kept(
    row: list[float], top_k: int, top_p: float, min_p: float, min_p_slack: float = 0.0
) -> set[int]:
    """Token ids one row keeps, by sorting and loops in float64 over scaled logits; the
    nucleus also keeps every token whose logit ties its last token's. min-p compares logits,
    p_i >= min_p * p_max as logit_i - logit_max >= log(min_p) (+ `min_p_slack`): in
    probabilities, float64 rounds away logit gaps that float32 logits still hold."""
    kept = set(range(len(row)))
    if 0 < top_k < len(row):
        kth = sorted(row, reverse=True)[top_k - 1]
        kept = {i for i in kept if row[i] >= kth}

    def probs() -> dict[int, float]:
        top = max(row[i] for i in kept)
        weights = {i: math.exp(row[i] - top) for i in kept}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    if top_p < 1.0:
        p = probs()
        order = sorted(kept, key=lambda i: -row[i])
        mass, last = 0.0, order[-1]
        for i in order:
            mass += p[i]
            if mass >= top_p:
                last = i
                break
        kept = {i for i in kept if row[i] >= row[last]}
    if min_p > 0.0:
        top = max(row[i] for i in kept)
        bound = math.log(min_p) + min_p_slack
        kept = {i for i in kept if row[i] == top or row[i] - top >= bound}
    return kept


def reference_bounds(row: list[float], params: SamplingParams) -> tuple[set[int], set[int]]:
    """(kept set with slightly stricter, with slightly looser top-p/min-p): float32 rounding
    may land either way only at those exact boundaries."""
    top_k = params.top_k
    strict_p = max(params.top_p - 1e-5, 1e-9) if params.top_p < 1.0 else 1.0
    loose_p = min(params.top_p + 1e-5, 1.0)
    return (
        reference_kept(row, top_k, strict_p, params.min_p, 1e-4),
        reference_kept(row, top_k, loose_p, params.min_p, -1e-4),
    )


def kept_sets(logits: torch.Tensor, batch: SamplingBatch) -> list[set[int]]:
    """Kept token ids per row, from the same calls the sampler makes."""
    masked = apply_top_k_top_p_min_p(
        logits / batch.temperatures.unsqueeze(-1),
        top_k=batch.top_k,
        top_p=batch.top_p,
        min_p=batch.min_p,
    )
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in masked]


def check_against_reference(logits: torch.Tensor, params: list[SamplingParams]) -> int:
    """Asserts each sampling row's kept set lies within the reference bounds; returns how
    many rows matched the reference exactly."""
    batch = SamplingBatch.from_params(params, [None] * len(params), logits.shape[-1])
    scaled = logits / batch.temperatures.unsqueeze(-1)
    exact = 0
    for row, p, kept in zip(scaled.tolist(), params, kept_sets(logits, batch)):
        if p.greedy:
            continue
        strict, loose = reference_bounds(row, p)
        assert strict <= kept <= loose, (row, p, kept, strict, loose)
        exact += strict == kept == loose
    return exact


values = st.sampled_from([-3.0, -1.0, 0.0, 0.0, 0.5, 2.0]) | st.floats(-8.0, 8.0, width=32)
row_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.05, 3.0),
    top_k=st.sampled_from([-1, 0, 1, 2]) | st.integers(1, 45),
    top_p=st.sampled_from([1.0, 0.5, 0.9]) | st.floats(0.01, 1.0),
    min_p=st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), vocab=st.integers(1, 40), rows=st.integers(1, 4))
def test_filters_match_reference(data: st.DataObject, vocab: int, rows: int) -> None:
    logits = torch.tensor(
        data.draw(
            st.lists(st.lists(values, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows)
        )
    )
    params = data.draw(st.lists(row_params, min_size=rows, max_size=rows))
    check_against_reference(logits, params)


@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])
def test_filters_on_large_vocab(scale: float) -> None:
    """Nuclei of hundreds of tokens force the candidate search to widen."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=gen) * scale
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.3, temperature=0.8),
        SamplingParams(top_k=500, top_p=0.97),
        SamplingParams(top_k=40),
        SamplingParams(min_p=0.2, top_p=0.95),
        SamplingParams(temperature=0.0, top_p=0.5),
    ]
    assert check_against_reference(logits, params) == 5


def test_off_filters_are_no_ops() -> None:
    logits = torch.randn(3, 20)
    assert torch.equal(apply_top_k_top_p_min_p(logits), logits)
    off = apply_top_k_top_p_min_p(
        logits, top_k=torch.full((3,), 20), top_p=torch.ones(3), min_p=torch.zeros(3)
    )
    assert torch.equal(off, logits)


def test_ties_are_kept_together() -> None:
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert apply_top_k_top_p_min_p(logits, top_k=torch.tensor([2])).isfinite().tolist() == [
        [True, True, True, True, False]
    ]
    uniform = torch.zeros(1, 4)
    assert apply_top_k_top_p_min_p(uniform, top_p=torch.tensor([0.3])).isfinite().all()
    assert apply_top_k_top_p_min_p(uniform, min_p=torch.tensor([1.0])).isfinite().all()


def test_from_params_builds_neutral_greedy_rows() -> None:
    gens = [make_generator(1), make_generator(2), None]
    params = [
        SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=1),
        SamplingParams(temperature=0.7, top_k=100, min_p=0.1, seed=2, logprobs=3),
        SamplingParams(top_k=4, logprobs=0),
    ]
    batch = SamplingBatch.from_params(params, gens, vocab_size=50)
    assert batch.temperatures.tolist() == pytest.approx([1.0, 0.7, 1.0])
    assert batch.top_k.tolist() == [50, 50, 4]
    assert batch.top_p.tolist() == [1.0, 1.0, 1.0]
    assert batch.greedy.tolist() == [True, False, False]
    assert batch.generators == [None, gens[1], None]
    assert (batch.all_greedy, batch.all_random) == (False, False)
    assert (batch.any_top_k, batch.any_top_p, batch.any_min_p) == (True, False, True)
    assert (batch.max_top_k, batch.max_num_logprobs) == (4, 3)
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch.from_params(params, gens[:2], vocab_size=50)


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = torch.randn(5, 30)
    logits[0, [4, 9]] = 100.0
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.2)] * 5
    batch = SamplingBatch.from_params(params, [None] * 5, 30)
    out = Sampler()(logits, batch)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[0] == 4
    assert out.logprobs is None and out.top_logprobs is None


def test_mixed_batch_greedy_and_sampled_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 16)
    params = [
        SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.5, top_k=2)
        for i in range(40)
    ]
    batch = SamplingBatch.from_params(params, [None] * 40, 16)
    tokens = Sampler()(logits, batch).token_ids
    top2 = logits.topk(2, dim=-1).indices
    for i, token in enumerate(tokens.tolist()):
        if i % 2:
            assert token == int(logits[i].argmax())
        else:
            assert token in top2[i].tolist()
    probs = probs_from_logits(logits, batch)
    assert torch.allclose(probs.sum(-1), torch.ones(40))
    assert torch.equal(
        probs[1::2], torch.nn.functional.one_hot(logits[1::2].argmax(-1), 16).float()
    )
    assert (probs[::2] > 0).sum(-1).tolist() == [2] * 20


def expected_distribution(logits: list[float], params: SamplingParams) -> list[float]:
    row = [x / params.temperature for x in logits]
    kept = reference_kept(row, params.top_k, params.top_p, params.min_p)
    weights = [math.exp(x) if i in kept else 0.0 for i, x in enumerate(row)]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=2.0, min_p=0.3),
    ],
)
def test_unseeded_sampling_follows_distribution(params: SamplingParams) -> None:
    draws = 20_000
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, float("-inf")]  # the last one: padding
    want = expected_distribution(logits, params)
    batch = SamplingBatch.from_params([params] * draws, [None] * draws, 8)
    torch.manual_seed(1234)
    tokens = Sampler()(torch.tensor([logits] * draws), batch).token_ids
    counts = torch.bincount(tokens, minlength=8).tolist()
    assert all(c == 0 for c, w in zip(counts, want) if w == 0.0)
    chi2 = sum((c - draws * w) ** 2 / (draws * w) for c, w in zip(counts, want) if w > 0.0)
    assert chi2 < 24.3  # 99.9% quantile of chi-square with 7 degrees of freedom
    assert 0.5 * sum(abs(c / draws - w) for c, w in zip(counts, want)) < 0.015
    one_row = SamplingBatch.from_params([params], [None], 8)
    assert probs_from_logits(torch.tensor([logits]), one_row)[0].tolist() == pytest.approx(want)


def seeded_run(position: int, others: list[SamplingParams], global_seed: int) -> list[int]:
    """Tokens the seeded target request gets over 8 steps at `position` among `others`."""
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7)
    params = others[:position] + [target] + others[position:]
    generators = [make_generator(p.seed) for p in params]
    steps = torch.randn(8, 64, generator=torch.Generator().manual_seed(99))
    torch.manual_seed(global_seed)
    sampler, tokens = Sampler(), []
    for step in steps:
        logits = torch.randn(len(params), 64)
        logits[position] = step
        batch = SamplingBatch.from_params(params, generators, 64)
        tokens.append(int(sampler(logits, batch).token_ids[position]))
    return tokens


def test_seeded_sampling_is_independent_of_batch() -> None:
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(temperature=0.5, top_p=0.3, seed=3),
        SamplingParams(top_k=2),
    ]
    alone = seeded_run(0, [], global_seed=0)
    assert seeded_run(0, [], global_seed=1) == alone
    assert seeded_run(3, others, global_seed=2) == alone
    assert seeded_run(5, others, global_seed=3) == alone


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(1, 1000)
    batch = SamplingBatch.from_params(
        [SamplingParams()] * 2, [make_generator(1), make_generator(2)], 1000
    )
    draws = [Sampler()(logits.expand(2, -1), batch).token_ids.tolist() for _ in range(5)]
    assert any(a != b for a, b in draws)


def test_sample_from_unnormalised_probs_never_picks_zero() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 3.0, 0.0, 1.0]]).expand(500, -1)
    tokens = sample_from_probs(probs, [make_generator(0)] + [None] * 499)
    assert set(tokens.tolist()) == {1, 3}


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 25)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=3, logprobs=0),
        SamplingParams(temperature=2.0, logprobs=1),
        SamplingParams(),
    ]
    batch = SamplingBatch.from_params(params, [None] * 4, 25)
    out = Sampler()(logits, batch, num_logprobs=batch.max_num_logprobs)
    want = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, want.gather(-1, out.token_ids.unsqueeze(-1)).squeeze(-1))
    values, ids = out.top_logprobs
    assert values.shape == ids.shape == (4, 3)
    assert torch.allclose(values, want.topk(3, dim=-1).values)
    assert torch.allclose(want.gather(-1, ids), values)
    only_chosen = Sampler()(logits, batch, num_logprobs=0)
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None


def test_non_float32_logits_are_upcast() -> None:
    logits = torch.randn(2, 10).to(torch.bfloat16)
    batch = SamplingBatch.from_params([SamplingParams(temperature=0.0)] * 2, [None] * 2, 10)
    out = Sampler()(logits, batch, num_logprobs=2)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.token_ids, logits.float().argmax(-1))


def test_a_min_p_below_float32s_range_still_filters():
    """min_p = 7e-66 would round to 0 in float32 and turn the filter off; at temperature
    0.05 the weaker token lies 157 nats below the top, past log(min_p) = -150."""
    params = [SamplingParams(temperature=0.05078125, min_p=7.040694555068826e-66)]
    logits = torch.tensor([[-3.0, 5.0]])
    assert check_against_reference(logits, params) == 1
    batch = SamplingBatch.from_params(params, [None], 2)
    assert kept_sets(logits, batch) == [{1}]
