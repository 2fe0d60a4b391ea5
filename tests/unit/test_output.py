"""Detokenization deltas and stop strings."""

from __future__ import annotations

from flashserve.chat.output import ChoiceOutput, IncrementalDetokenizer, StopStringMatcher


class ByteDecoder:
    """Token i is byte i; decoding is UTF-8 with replacement, like a byte-level BPE."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def test_multibyte_characters_are_released_whole() -> None:
    d = IncrementalDetokenizer(ByteDecoder())
    emitted = [d.add([b]) for b in ids("añ€😀")]
    assert "".join(emitted) == "añ€😀"
    assert all("\ufffd" not in e for e in emitted)
    assert emitted[1] == "" and emitted[2] == "ñ"


def test_flush_releases_an_incomplete_tail() -> None:
    d = IncrementalDetokenizer(ByteDecoder())
    assert d.add(ids("ab")) == "ab"
    assert d.add([0xE2]) == ""
    assert d.flush() == "\ufffd"


def test_stop_string_is_cut_and_never_emitted() -> None:
    m = StopStringMatcher(["STOP"])
    out = m.feed("hello S") + m.feed("TO") + m.feed("P and more")
    assert out == "hello " and m.stopped
    assert m.feed("later") == "" and m.flush() == ""


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    m = StopStringMatcher(["\n\n", "END"])
    assert m.feed("abc\n") == "abc"
    assert m.feed("x") == "\nx"
    assert m.feed("EN") == ""
    assert m.feed("d") == "ENd"
    assert m.flush() == ""


def test_earliest_stop_wins() -> None:
    m = StopStringMatcher(["world", "lo"])
    assert m.feed("hello world") == "hel"


def test_held_text_is_flushed_at_the_end() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("ends with ST") == "ends with "
    assert m.flush() == "ST"


def test_choice_output_combines_both() -> None:
    c = ChoiceOutput(ByteDecoder(), ["é!"])
    text = "".join(c.add([b]) for b in ids("café! more"))
    assert text == "caf" and c.stopped
    c = ChoiceOutput(ByteDecoder(), ["zz"])
    text = "".join(c.add([b]) for b in ids("no stop z")) + c.finish()
    assert text == "no stop z" and not c.stopped
