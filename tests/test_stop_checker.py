"""StopChecker: stop strings across deltas, hold-back, include flag, flush."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.stop_checker import StopChecker


def expected_output(text: str, stop: list[str], include: bool) -> tuple[str, bool]:
    """Reference: cut at the earliest-ending stop string (longest among ties)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            longest = max(hits, key=len)
            return (text[:end] if include else text[: end - len(longest)]), True
    return text, False


def run(deltas: list[str], stop: list[str], include: bool = False) -> tuple[str, bool]:
    """Feeds deltas like the engine does and returns (all emitted text, stopped)."""
    checker = StopChecker(stop, include)
    emitted = ""
    for delta in deltas:
        out, stopped = checker.push(delta)
        emitted += out
        if stopped:
            return emitted, True
    return emitted + checker.flush(), False


@pytest.mark.parametrize("include", [False, True])
def test_stop_split_at_every_point(include: bool) -> None:
    text = "Hello world<|end|>ignored"
    want = "Hello world<|end|>" if include else "Hello world"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert run([text[:i], text[i:j], text[j:]], ["<|end|>"], include) == (want, True)


def test_partial_stop_string_is_held_back_then_released() -> None:
    checker = StopChecker(["STOP"])
    assert checker.push("abc ST") == ("abc ", False)
    assert checker.push("O") == ("", False)
    assert checker.push("P!") == ("", True)
    assert checker.stop_str == "STOP"
    checker = StopChecker(["STOP"])
    assert checker.push("abc ST") == ("abc ", False)
    assert checker.push("OMP") == ("STOMP", False)


def test_overlapping_prefixes() -> None:
    assert run(["ab", "abc", "zz"], ["abc"]) == ("ab", True)
    assert run(list("ababc"), ["abc"]) == ("ab", True)
    assert run(list("aaab"), ["aab"]) == ("a", True)
    assert run(list("abab"), ["abc"]) == ("abab", False)


def test_multiple_stop_strings_earliest_end_wins() -> None:
    assert run(["say yes or no"], ["no", "yes"]) == ("say ", True)
    assert run(["xabcd"], ["abcd", "bc"]) == ("xa", True)
    assert run(list("xabcd"), ["abcd", "bc"]) == ("xa", True)
    assert run(["xabc"], ["bc", "abc"], include=True) == ("xabc", True)
    assert run(["xabc"], ["bc", "abc"]) == ("x", True)


def test_flush_returns_held_text_and_empties() -> None:
    checker = StopChecker(["</s>"])
    assert checker.push("done </") == ("done ", False)
    assert checker.flush() == "</"
    assert checker.flush() == ""


def test_no_stop_strings_passes_everything_through() -> None:
    checker = StopChecker([])
    assert checker.push("anything") == ("anything", False)
    assert checker.flush() == ""


def test_pushes_after_stop_emit_nothing() -> None:
    checker = StopChecker(["x"])
    assert checker.push("abxcd") == ("ab", True)
    assert checker.push("more") == ("", True)
    assert checker.flush() == ""


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


alphabet = st.sampled_from("abc ")
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=0, max_size=3)


@settings(max_examples=400, deadline=None)
@given(
    deltas=st.lists(st.text(alphabet, max_size=5), max_size=8),
    stop=stop_lists,
    include=st.booleans(),
)
def test_emitted_text_is_the_truncated_text(
    deltas: list[str], stop: list[str], include: bool
) -> None:
    want, want_stopped = expected_output("".join(deltas), stop, include)
    checker = StopChecker(stop, include)
    emitted, stopped = "", False
    for delta in deltas:
        out, stopped = checker.push(delta)
        emitted += out
        # Never emit anything beyond the final answer, even mid-stream.
        assert want.startswith(emitted)
        if stopped:
            break
    if not stopped:
        emitted += checker.flush()
    assert (emitted, stopped) == (want, want_stopped)


def test_long_periodic_stop_strings_match_in_small_deltas() -> None:
    """KMP fallbacks on strings that nearly match many times (the worst case of naive
    matching): 4,001-character stop strings over text streamed three characters at a time."""
    stop = ["ab" * 2000 + "c", "ab" * 1999 + "d"]
    text = "x" + "ab" * 2500 + "ab" * 1999 + "d" + "tail"
    deltas = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert run(deltas, stop) == expected_output(text, stop, False)
    checker = StopChecker(stop)
    released, _ = checker.push("ab" * 3000)
    assert released == "ab" * 1000  # exactly the longest partial match is held back
