"""Which emitted tokens' logprobs belong to the `content` of each delta: the alignment of one choice's token
logprobs with the text that reaches the client as content.

Between the engine's tokens and a delta's `content` sit the detokenizer (which releases text only once a
character is whole), stop strings (held back, then cut), the thinking splitter (reasoning text and the
`</think>` marker) and the tool-call parser (call markup never reaches content). OpenAI's logprobs cover
content tokens only, so the tokens are placed on the raw text and kept or dropped by what became content:

- Every token gets the span of the raw (detokenized, pre-stop-string) text it released. Tokens that
  released nothing on their own (the leading bytes of a character split over tokens) share the span of
  the token that completed it; tokens that never release text (the end-of-sequence token, special
  markers) get none and are dropped.
- Tokens the engine counted as thinking (the reasoning block and its end marker) are dropped: logprobs
  cover `content` tokens (README: Logprobs).
- Each content piece is found in the raw text: where the previous piece ended when it continues there
  (the usual case: plain text is the raw text itself), otherwise at its last occurrence after that point
  (the text after a removed tool call or thinking block; the parsers hold back at most a marker's
  length, so the piece is the latest text). A token whose span overlaps content is a content token; it is
  released with the first delta whose content reaches its end, or at the end of the choice.
- A stop string cuts the content: tokens after the cut are dropped, a token the cut splits is kept (part
  of its text was sent).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from flashserve.engine.logprobs import SampledLogprob
from flashserve.generation import TokenLogprob, TopLogprob
from flashserve.models.tokenizer import token_bytes


class TokenTexts:
    """Each token's `token` text and `bytes`, as OpenAI writes them: the raw bytes, and their UTF-8 text
    with replacement characters where the bytes are part of a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        found = self._cache.get(token_id)
        if found is None:
            raw = token_bytes(self.tokenizer, token_id)
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), tuple(raw))
        return found

    def logprob(self, sampled: SampledLogprob) -> TokenLogprob:
        text, raw = self(sampled.token_id)
        top = tuple(TopLogprob(*self._text_and_logprob(token_id, logprob)) for token_id, logprob in sampled.top)
        return TokenLogprob(text, sampled.logprob, raw, top)

    def _text_and_logprob(self, token_id: int, logprob: float) -> tuple[str, float, tuple[int, ...]]:
        text, raw = self(token_id)
        return text, logprob, raw


@dataclass(slots=True)
class _Placed:
    entry: TokenLogprob
    start: int
    end: int
    content: bool = False  # some of its span reached content


@dataclass(slots=True)
class ContentLogprobs:
    """One choice's token logprobs, released as the content they produced reaches the client."""

    raw: str = ""  # every released piece of detokenized text, before stop strings
    _unplaced: list[TokenLogprob] = field(default_factory=list)
    _placed: deque[_Placed] = field(default_factory=deque)
    _pos: int = 0  # content has been found in `raw` up to here

    def add_tokens(self, entries: list[TokenLogprob], released: str) -> None:
        """The content tokens of one engine output (reasoning tokens left out by the caller: their text
        takes room in the raw text, without logprobs) and the text the detokenizer released for it (it
        covers every token not placed yet)."""
        self._unplaced.extend(entries)
        if released:
            start = len(self.raw)
            self.raw += released
            self._placed.extend(_Placed(e, start, len(self.raw)) for e in self._unplaced)
            self._unplaced.clear()

    def add_token_texts(self, entries: list[TokenLogprob], released: str) -> None:
        """Tokens that carry their own text (an upstream's logprobs) and the text they released: each is
        placed on its own piece when their texts spell the released text, else all share its span."""
        if "".join(e.token for e in entries) != released:
            self.add_tokens(entries, released)
            return
        for entry in entries:
            self.add_tokens([entry], entry.token)

    def content(self, text: str) -> list[TokenLogprob]:
        """The logprobs of the tokens whose text this content piece completes."""
        if text:
            start = self._pos if self.raw.startswith(text, self._pos) else self.raw.rfind(text, self._pos)
            if start < 0:  # pieces of two places joined in one piece: keep to the order of the text
                start = self._pos
            end = min(start + len(text), len(self.raw))
            for placed in self._placed:
                if placed.start < end and placed.end > start:
                    placed.content = True
            self._pos = max(self._pos, end)
        return self._release(final=False)

    def finish(self, text: str) -> list[TokenLogprob]:
        """The last content piece of the choice: every token that reached content is released."""
        out = self.content(text)
        return out + self._release(final=True)

    def _release(self, final: bool) -> list[TokenLogprob]:
        out: list[TokenLogprob] = []
        while self._placed and (final or self._placed[0].end <= self._pos):
            placed = self._placed.popleft()
            if placed.content:
                out.append(placed.entry)
        return out

