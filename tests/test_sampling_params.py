"""SamplingParams: defaults, validation messages, normalisation."""

import pytest

from kvstore.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (
        1,
        16,
        1.0,
        1.0,
        -1,
        0.0,
    )
    assert p.seed is None and p.stop == [] and p.stop_token_ids is None
    assert p.logprobs is None and not p.ignore_eos
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [3, -1]),
    ],
)
def test_invalid_value_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value) or field == "stop"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", 1.0),
        ("top_k", 1),
        ("min_p", 0.0),
        ("min_p", 1.0),
        ("logprobs", 0),
        ("logprobs", 20),
    ],
)
def test_boundary_values_accepted(field: str, value: object) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_top_k_zero_means_off() -> None:
    assert SamplingParams(top_k=0).top_k == -1


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, []), ("###", ["###"]), (["a", "bc"], ["a", "bc"]), (("x",), ["x"])],
)
def test_stop_normalised_to_list(stop: object, expected: list[str]) -> None:
    assert SamplingParams(stop=stop).stop == expected


def test_stop_list_is_copied() -> None:
    stop = ["a"]
    params = SamplingParams(stop=stop)
    stop.append("b")
    assert params.stop == ["a"]


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)]
)
def test_greedy_means_temperature_below_epsilon(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy
