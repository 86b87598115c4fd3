"""The stop-sequence matcher that streaming relies on."""

from __future__ import annotations

from genai_server.embedded.stop_strings import StopMatcher


def test_stop_split_across_pieces_is_never_emitted() -> None:
    matcher = StopMatcher(["STOP"])
    emitted = []
    for piece in ["Hello S", "T", "OP and more"]:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "Hello "
    assert stopped


def test_held_text_is_released_when_it_cannot_start_a_stop() -> None:
    matcher = StopMatcher(["xyz"])
    assert matcher.feed("abcx") == ("abc", False)  # "x" may begin "xyz"
    assert matcher.feed("y") == ("", False)  # "xy" still may
    assert matcher.feed("q") == ("xyq", False)  # "xyq" cannot
    assert matcher.feed("xy") == ("", False)
    assert matcher.flush() == "xy"


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == ("hel", True)


def test_no_stops_passes_everything_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""
