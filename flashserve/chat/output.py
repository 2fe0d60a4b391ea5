"""Token stream -> text deltas for one choice: incremental detokenization and
stop strings.

Text is released only when it is final: a token that ends inside a UTF-8
sequence waits for the next one, and text that could be the start of a stop
string is held back until it either completes the stop string (then it is
cut, and never reaches the client) or proves not to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas.

    Decoding a window that starts a few tokens back (not the whole sequence
    each time) keeps the cost per token constant, while still letting
    byte-level tokens merge into whole characters.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (an incomplete character included)."""
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix) :]


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must be non-empty"
        self.stops = list(stops)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that matched (the earliest in the text)

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        buffer = self._pending + text
        if not self.stops:
            self._pending = ""
            return buffer
        cut, self.matched = min(((i, s) for s, i in ((s, buffer.find(s)) for s in self.stops) if i >= 0),
                                default=(-1, None))
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buffer[:cut]
        hold = self._partial_match_length(buffer)
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that begins some stop string."""
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class ChoiceOutput:
    """One choice's text pipeline: tokens in, final text deltas out."""

    def __init__(self, tokenizer: Decoder, stops: Sequence[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stops)
        self.released = ""  # the detokenizer's text of the last add/finish, before stop strings (for logprobs)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def add(self, new_ids: Sequence[int]) -> str:
        self.released = self.detokenizer.add(new_ids)
        return self.matcher.feed(self.released)

    def finish(self) -> str:
        self.released = self.detokenizer.flush()
        tail = self.matcher.feed(self.released)
        return tail + self.matcher.flush()
