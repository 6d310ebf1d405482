"""Speculative verification: greedy prefixes, and rejection sampling keeping the target's law."""

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.sampling_params import SamplingParams
from workers.sampler import SamplingBatch, make_generator, probs_from_logits
from workers.spec_decode.rejection import verify_greedy, verify_sampled

V = 7
TRIALS = 20_000
# Target and draft of the first position: q puts mass where p has none and the reverse.
P0 = torch.tensor([0.30, 0.05, 0.20, 0.00, 0.15, 0.25, 0.05])
Q0 = torch.tensor([0.10, 0.30, 0.00, 0.25, 0.15, 0.20, 0.00])
Trials = tuple[list[list[int]], torch.Tensor]  # emitted tokens per request, p_1(. | first)


def logits_with_argmax(argmaxes: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.randn(len(argmaxes), vocab)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


def reference_greedy(logits: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
    out, row = [], 0
    for tokens in drafts:
        argmaxes = logits[row : row + len(tokens) + 1].argmax(-1).tolist()
        emitted = []
        for draft, target in zip(tokens + [None], argmaxes):
            emitted.append(target)
            if draft != target:
                break
        out.append(emitted)
        row += len(tokens) + 1
    return out


def test_greedy_accepts_matching_prefix_then_target_token() -> None:
    logits = logits_with_argmax([3, 1, 2, 5, 6])
    assert verify_greedy(logits, [[3, 1, 4, 1]]) == [[3, 1, 2]]


def test_greedy_all_accepted_adds_bonus() -> None:
    logits = logits_with_argmax([3, 1, 4, 6])
    assert verify_greedy(logits, [[3, 1, 4]]) == [[3, 1, 4, 6]]


def test_greedy_without_drafts_takes_row_zero() -> None:
    assert verify_greedy(logits_with_argmax([5]), [[]]) == [[5]]


def test_greedy_batch_of_different_k() -> None:
    # Requests: k=2 all accepted, k=0, k=3 rejected at its first draft, k=1 all accepted.
    argmaxes = [1, 2, 7] + [4] + [0, 5, 5, 5] + [6, 3]
    drafts = [[1, 2], [], [1, 5, 5], [6]]
    expected = [[1, 2, 7], [4], [0], [6, 3]]
    assert verify_greedy(logits_with_argmax(argmaxes), drafts) == expected
    assert verify_greedy(torch.empty(0, 8), []) == []


def test_wrong_row_count_raises() -> None:
    with pytest.raises(ValueError):
        verify_greedy(torch.zeros(3, 8), [[1, 2, 3]])
    with pytest.raises(ValueError):
        verify_sampled(torch.full((2, 8), 0.125), [[1]], [None], [None, None])


@settings(max_examples=60, deadline=None)
@given(
    ks=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_greedy_matches_reference_and_sampled_on_one_hot_targets(ks: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(sum(ks) + len(ks), 4, generator=gen)
    drafts = [torch.randint(0, 4, (k,), generator=gen).tolist() for k in ks]
    expected = reference_greedy(logits, drafts)
    assert verify_greedy(logits, drafts) == expected
    # Greedy rows' probs are one-hot, and rejection sampling then reduces to greedy.
    params = [SamplingParams(temperature=0.0)] * logits.shape[0]
    batch = SamplingBatch.from_params(params, [None] * len(params), vocab_size=4)
    probs = probs_from_logits(logits, batch)
    q = [None if i % 2 else torch.softmax(torch.randn(k, 4), -1) for i, k in enumerate(ks)]
    assert verify_sampled(probs, drafts, q, [None] * len(ks)) == expected


@pytest.fixture
def rng() -> Iterator[None]:
    """A fixed global random stream for the test, restored afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def test_single_nonzero_target_always_emitted(rng: None) -> None:
    n, t = 300, 4
    p = torch.zeros(3 * n, V)
    p[:, t] = 1.0
    drafts = torch.randint(0, V, (n, 2)).tolist()
    q = [torch.softmax(torch.randn(2, V), -1) if i % 2 else None for i in range(n)]
    for out, d in zip(verify_sampled(p, drafts, q, [None] * n), drafts):
        assert set(out) == {t}
        assert len(out) == 1 + (d[0] == t) * (1 + (d[1] == t))


def test_empty_residual_falls_back_to_target() -> None:
    # q == p, and the drafted token has no mass under either: it is rejected, max(0, p - q) = 0.
    p = torch.zeros(2, V)
    p[:, 3] = 1.0
    assert verify_sampled(p, [[5]], [p[:1].clone()], [None]) == [[3]]


def test_seeded_request_independent_of_batch(rng: None) -> None:
    probs = torch.softmax(torch.randn(4, V) * 0.3, -1)
    drafts = [2, 2, 2]
    outputs = set()
    for seed in range(20):
        for q in (None, torch.softmax(torch.randn(3, V), -1)):
            alone = verify_sampled(probs, [drafts], [q], [make_generator(seed)])[0]
            others = torch.softmax(torch.randn(2 + 1 + 3, V), -1)
            batch = torch.cat([others[:2], probs, others[2:3], others[3:]])
            out = verify_sampled(
                batch,
                [[1], drafts, [], [0, 6]],
                [None, q, None, torch.softmax(torch.randn(2, V), -1)],
                [None, make_generator(seed), make_generator(seed + 1), None],
            )
            assert out[1] == alone
            outputs.add(tuple(alone))
    assert len(outputs) > 5  # the seed matters, so the check above is not vacuous


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probs (both flat); cells of zero probability must be
    empty and are left out of the statistic."""
    counts, probs = counts.double(), probs.double()
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    expected = probs[kept] / probs.sum() * counts.sum()
    stat = ((counts[kept] - expected) ** 2 / expected).sum()
    df = torch.tensor(kept.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


def check_distribution(tokens: torch.Tensor, probs: torch.Tensor, max_tv: float = 0.02) -> None:
    """Total-variation distance below max_tv and a chi-square test that passes."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert 0.5 * (counts / counts.sum() - probs.double()).abs().sum() < max_tv
    assert chi_square_p_value(counts, probs) > 1e-3


@pytest.fixture(scope="module", params=["draft_probs", "deterministic"])
def trials(request: pytest.FixtureRequest) -> Trials:
    """TRIALS requests of two drafts in one batch, the second position's target and draft
    depending on the first draft; returns the emitted tokens and the table p_1(. | first)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        p1 = torch.softmax(torch.randn(V, V), -1)
        p1[:, 6] = 0.0  # a token the target never takes at position 1
        p1 /= p1.sum(-1, keepdim=True)
        q1 = torch.softmax(torch.randn(V, V) * 2, -1)
        p2 = torch.softmax(torch.randn(V), -1)
        if request.param == "draft_probs":
            first = torch.multinomial(Q0, TRIALS, replacement=True)
            second = torch.multinomial(q1[first], 1).squeeze(-1)
            q = [torch.stack((Q0, q1[a])) for a in first.tolist()]
        else:
            first = torch.arange(TRIALS) % V
            second = (first * 3 + 1) % V
            q = [None] * TRIALS
        target = torch.stack((P0.expand(TRIALS, V), p1[first], p2.expand(TRIALS, V)), 1)
        drafts = torch.stack((first, second), 1).tolist()
        out = verify_sampled(target.reshape(-1, V), drafts, q, [None] * TRIALS)
    return out, p1


def test_first_token_has_target_distribution(trials: Trials) -> None:
    out, _ = trials
    assert 0.5 * (P0 - Q0).abs().sum() > 0.4  # drafts alone would fail the check
    check_distribution(torch.tensor([o[0] for o in out]), P0)


def test_second_token_given_accepted_first_has_target_distribution(trials: Trials) -> None:
    out, p1 = trials
    pairs = torch.tensor([o[:2] for o in out if len(o) >= 2])
    # A deterministic draft of r % V is accepted with probability 1/V, so fewer samples here.
    assert len(pairs) > TRIALS // 10
    mixture = (torch.bincount(pairs[:, 0], minlength=V) / len(pairs)) @ p1
    check_distribution(pairs[:, 1], mixture, max_tv=0.04)
    for a in range(V):
        seconds = pairs[pairs[:, 0] == a, 1]
        if len(seconds) > 200:
            counts = torch.bincount(seconds, minlength=V)
            assert chi_square_p_value(counts, p1[a]) > 1e-3


def test_two_tokens_jointly_have_target_distribution(trials: Trials, rng: None) -> None:
    # Where a step stopped after one token, the next step would sample from p_1(. | first).
    out, p1 = trials
    firsts = torch.tensor([o[0] for o in out])
    seconds = torch.tensor([o[1] if len(o) >= 2 else -1 for o in out])
    short = seconds < 0
    seconds[short] = torch.multinomial(p1[firsts[short]], 1).squeeze(-1)
    check_distribution(firsts * V + seconds, (P0.unsqueeze(-1) * p1).flatten())


def test_without_drafts_samples_row_zero(rng: None) -> None:
    n = TRIALS
    out = verify_sampled(P0.expand(n, V), [[]] * n, [None] * n, [None] * n)
    assert all(len(o) == 1 for o in out)
    check_distribution(torch.tensor([o[0] for o in out]), P0)
