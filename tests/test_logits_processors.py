"""Penalties, logit_bias and min_tokens change logits exactly as a reference of their
definitions over the same logits says, on the rows that set them and no others."""

from __future__ import annotations

import torch

from kvstore.sampling_params import SamplingParams
from workers.logits_processors import apply_logits_processors, steers_logits
from workers.request import Request

VOCAB = 50


def request(prompt, output, eos=frozenset({2}), **params) -> Request:
    sampling = SamplingParams(max_tokens=16, temperature=0.0, **params)
    r = Request("r", list(prompt), sampling, 0.0, eos_token_ids=eos)
    r.token_ids.extend(output)
    return r


def reference(logits: list[float], r: Request) -> list[float]:
    """The definitions, one token at a time."""
    p, out = r.params, r.output_token_ids
    x = list(logits)
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if r.num_output_tokens < p.min_tokens:
        for token in r.stop_token_ids:
            x[token] = float("-inf")
    for token in set(r.token_ids):
        if p.repetition_penalty != 1.0:
            penalty = p.repetition_penalty
            x[token] = x[token] / penalty if x[token] > 0 else x[token] * penalty
    for token in set(out):
        x[token] -= p.frequency_penalty * out.count(token) + p.presence_penalty
    return x


def test_each_setting_matches_its_definition_and_leaves_other_rows_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    rows = [
        request([3, 4, 5], [7, 7, 9]),  # nothing set
        request([3, 4, 5], [7, 7, 9], presence_penalty=0.5, frequency_penalty=-1.0),
        request([3, 4, 5, 11], [7, 11], repetition_penalty=1.3),
        request([3], [8], logit_bias={8: -100.0, 9: 5.5}),
        request([3], [8], min_tokens=4, stop_token_ids=[9]),  # EOS 2 and 9 banned
        request([3], [8, 8, 8, 8], min_tokens=4, presence_penalty=2.0, logit_bias={1: 1.0}),
    ]
    expected = [reference(logits[i].tolist(), r) for i, r in enumerate(rows)]
    out = apply_logits_processors(logits.clone(), rows)
    for i, want in enumerate(expected):
        assert torch.allclose(out[i], torch.tensor(want), atol=1e-6), i
    assert torch.equal(out[0], logits[0])  # a row that sets nothing is untouched
    assert out[4, 2] == out[4, 9] == float("-inf")  # min_tokens not reached: no stop
    assert torch.isfinite(out[5, 2])  # reached: EOS allowed again


def test_greedy_choice_follows_the_steering():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 3.0
    assert apply_logits_processors(logits.clone(), [request([1], [])]).argmax() == 7
    biased = request([1], [], logit_bias={12: 10.0})
    assert apply_logits_processors(logits.clone(), [biased]).argmax() == 12
    repeated = request([1], [7, 7], frequency_penalty=2.0)  # 3 - 2 * 2 < 0
    assert apply_logits_processors(logits.clone(), [repeated]).argmax() != 7


def test_only_requests_that_set_something_are_steered():
    assert not steers_logits(SamplingParams())
    assert steers_logits(SamplingParams(min_tokens=1))
    assert steers_logits(SamplingParams(repetition_penalty=1.1))
    assert steers_logits(SamplingParams(logit_bias={1: 0.5}))
