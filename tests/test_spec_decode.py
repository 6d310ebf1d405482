"""Speculative decoding never changes greedy output, keeps the pool whole through rollbacks,
and speculates only when it pays."""

from __future__ import annotations

import pytest

from workers import LLM, SamplingParams
from workers.model.draft_pair import make_draft_pair
from workers.spec_decode.config import SpeculativeConfig
from workers.spec_decode.policy import SpeculationPolicy, expected_tokens

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6],  # repeats itself: n-gram lookup finds drafts
    [100, 200, 300],
    [42] * 20,
    list(range(300, 370)),  # crosses several blocks; chunked under a small budget
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A draft that agrees with its target about half the time (upper_scale 0.1)."""
    target, draft = make_draft_pair(
        tmp_path_factory.mktemp("pair"), "tiny", draft_layers=1, upper_scale=0.1,
        initializer_range=0.1,
    )  # fmt: skip
    return str(target), str(draft)


@pytest.fixture(scope="module")
def expected(pair):
    llm = LLM(pair[0], num_blocks=256)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def speculative(method: str, pair, k) -> dict:
    spec = {"method": method, "num_speculative_tokens": k}
    return {**spec, "model": pair[1]} if method == "draft" else spec


def assert_pools_whole(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    draft = llm.engine.spec.draft
    if draft is not None:
        assert draft.kv.num_free_blocks == draft.kv.pool.num_blocks


SCENARIOS = {
    "plain": dict(num_blocks=256),
    "block-size-4": dict(num_blocks=256, block_size=4),  # rollbacks cross block boundaries
    "chunked": dict(num_blocks=256, max_num_batched_tokens=24, max_num_seqs=4),
    "preemption": dict(num_blocks=14, block_size=8, max_num_batched_tokens=64),
    "no-prefix-cache": dict(num_blocks=256, enable_prefix_caching=False),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method,k", [("ngram", 3), ("draft", 4), ("draft", "auto")])
def test_greedy_output_is_identical(pair, expected, method, k, scenario):
    llm = LLM(pair[0], speculative=speculative(method, pair, k), **SCENARIOS[scenario])
    # Twice: the second pass also runs over prefix-cached prompts (target and draft).
    for _ in range(2):
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.stats()
    assert stats["spec_decode_proposed_tokens"] > 0
    if method == "draft":  # a half-agreeing draft: both outcomes really happened
        assert 0 < stats["spec_decode_accepted_tokens"] < stats["spec_decode_proposed_tokens"]
    if scenario == "preemption":
        assert stats["num_preemptions"] > 0
    assert_pools_whole(llm)


def test_sampling_with_speculation_is_seeded_and_leaks_nothing(pair):
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(pair[0], num_blocks=128, speculative=speculative("draft", pair, 3))
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)])
        assert all(len(tokens) == 30 for tokens in runs[-1])
        assert_pools_whole(llm)
    assert runs[0] == runs[1]


def test_stop_conditions_inside_accepted_drafts(pair, expected):
    # The stop token can sit in the middle of an accepted run of drafts: nothing after it leaks.
    stop_at = expected[2][7]
    llm = LLM(pair[0], num_blocks=64, speculative=speculative("draft", pair, 4))
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_at])
    out = llm.generate(PROMPTS[2], params)[0].outputs[0]
    assert out.token_ids == expected[2][: expected[2].index(stop_at) + 1]
    short = llm.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert short.outputs[0].token_ids == expected[2][:5]
    assert_pools_whole(llm)


def test_policy_speculates_only_when_it_pays():
    policy = SpeculationPolicy(fixed_k=None, max_k=8, prior_acceptance=0.8)
    # Batch 1 on a machine where a step is mostly fixed cost (weights read): speculate deep.
    assert policy.choose(["a"], overhead_s=0.03, per_token_s=0.0005, draft_step_s=0.002) >= 4
    # 64 decoding requests where each token costs real compute: verifying drafts loses.
    many = [str(i) for i in range(64)]
    assert policy.choose(many, overhead_s=0.03, per_token_s=0.002, draft_step_s=0.002) == 0
    # A request whose drafts are always rejected stops being speculated.
    for _ in range(20):
        policy.observe("bad", 4, 4, 0)
    assert policy.choose(["bad"], overhead_s=0.03, per_token_s=0.0005, draft_step_s=0.01) == 0
    stats = policy.stats()
    assert stats["spec_decode_proposed_tokens"] == 80 and stats["spec_decode_acceptance_rate"] == 0
    # Empty proposals (no n-gram match) count against a request like rejections do.
    for _ in range(20):
        policy.observe("empty", 4, 0, 0)
    assert policy.acceptance("empty") < 0.01
    # Runs where every draft passes drive the per-token estimate to 1, not to accepted/k.
    for _ in range(30):
        policy.observe("good", 4, 4, 4)
    assert policy.acceptance("good") > 0.99


def test_policy_explores_after_a_long_stretch_at_zero_only_where_it_could_pay():
    policy = SpeculationPolicy(fixed_k=None, max_k=4, explore_every=5)
    for _ in range(30):
        policy.observe("old", 4, 4, 0)  # drafts have been worthless so far
    few = ["a", "b"]
    picks = [policy.choose(few, 0.03, 0.0005, 0.002) for _ in range(10)]
    assert picks == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    many = [str(i) for i in range(64)]  # even perfect drafts would not pay here
    assert [policy.choose(many, 0.03, 0.002, 0.002) for _ in range(10)] == [0] * 10


def test_new_requests_start_from_what_drafts_have_been_worth():
    policy = SpeculationPolicy(fixed_k=None, max_k=4)
    for i in range(60):
        policy.observe(f"r{i}", 4, 4, 4)
    assert policy.acceptance("new") > 0.9
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4


def test_bad_speculative_settings_are_named():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="needs 'model'"):
        SpeculativeConfig.from_dict({"method": "draft"})
    with pytest.raises(ValueError, match="unknown speculative settings"):
        SpeculativeConfig.from_dict({"method": "ngram", "depth": 3})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 0})


def test_each_request_reports_its_own_speculation(pair):
    """The finishing delta counts the drafts proposed for its request and accepted (the
    worker's decode span reports them); over all requests they add up to the engine's."""
    llm = LLM(pair[0], num_blocks=256, speculative=speculative("draft", pair, 4))
    engine = llm.engine
    ids = {engine.add_request(p, GREEDY).request_id for p in PROMPTS}
    finals = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finished:
                finals[delta.request_id] = delta
    assert set(finals) == ids
    stats = llm.stats()
    assert sum(d.num_spec_proposed for d in finals.values()) == stats["spec_decode_proposed_tokens"]
    assert sum(d.num_spec_accepted for d in finals.values()) == stats["spec_decode_accepted_tokens"]
    assert all(0 <= d.num_spec_accepted <= d.num_spec_proposed for d in finals.values())
    assert 0 < sum(d.num_spec_accepted for d in finals.values())
