"""Token logprobs are aligned with the content the client receives (chat/logprob_alignment.py): plain text,
characters split over tokens, stop strings, tool-call markup and thinking leave exactly the content tokens,
each released with the delta whose content completes it. Also the local backend's whole pipeline on a
scripted token stream, and an upstream's logprobs (backends/remote.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from flashserve.backends.local import LocalGeneration
from flashserve.backends.remote import token_logprobs
from flashserve.chat.logprob_alignment import ContentLogprobs, TokenTexts
from flashserve.engine.logprobs import SampledLogprob
from flashserve.engine.request import FinishReason, RequestOutput
from flashserve.generation import TokenLogprob
from flashserve.models.tiny_v4 import write_tokenizer


def lp(text: str) -> TokenLogprob:
    return TokenLogprob(text, -0.5, tuple(text.encode()))


def tokens_of(entries: list[TokenLogprob]) -> list[str]:
    return [e.token for e in entries]


def test_plain_text_releases_each_token_with_its_text() -> None:
    aligned = ContentLogprobs()
    out = []
    for piece in ("Hel", "lo", " world"):
        aligned.add_tokens([lp(piece)], piece)
        out.append(tokens_of(aligned.content(piece)))
    assert out == [["Hel"], ["lo"], [" world"]]
    assert aligned.finish("") == []


def test_a_character_split_over_tokens_keeps_both_tokens() -> None:
    aligned = ContentLogprobs()
    first, second = TokenLogprob("\ufffd", -1.0, (0xC3,)), TokenLogprob("\ufffd", -0.1, (0xA9,))
    aligned.add_tokens([first], "")  # the detokenizer waits for the whole character
    assert aligned.content("") == []
    aligned.add_tokens([second], "é")
    assert aligned.content("é") == [first, second]


def test_held_back_text_releases_its_tokens_later() -> None:
    aligned = ContentLogprobs()
    aligned.add_tokens([lp("Hi")], "Hi")
    aligned.add_tokens([lp(" ST")], " ST")
    assert tokens_of(aligned.content("Hi")) == ["Hi"]  # " ST" may begin the stop string " STOP": held
    aligned.add_tokens([lp("AR")], "AR")
    assert tokens_of(aligned.content(" STAR")) == [" ST", "AR"]


def test_a_stop_string_drops_the_tokens_after_the_cut() -> None:
    aligned = ContentLogprobs()
    for piece in ("Hello", " wor", "ld!"):
        aligned.add_tokens([lp(piece)], piece)
    # The stop string "ld" cuts the content after " wor": "ld!" never reaches the client.
    assert tokens_of(aligned.finish("Hello wor")) == ["Hello", " wor"]
    aligned = ContentLogprobs()
    for piece in ("Hello", " wor", "ld!"):
        aligned.add_tokens([lp(piece)], piece)
    assert tokens_of(aligned.finish("Hello w")) == ["Hello", " wor"]  # a token the cut splits was partly sent


def test_tool_call_markup_is_not_content() -> None:
    pieces = ["Sure", "<tool_call>", '{"name": "f", "arguments": {"city": "Paris"}}', "</tool_call>", "\n",
              "Paris", " it is"]
    contents = ["Sure", "", "", "", "", "Paris", " it is"]  # what the tool-call parser lets through
    aligned = ContentLogprobs()
    out: list[str] = []
    for piece, content in zip(pieces, contents, strict=True):
        aligned.add_tokens([lp(piece)], piece)
        out += tokens_of(aligned.content(content))
    out += tokens_of(aligned.finish(""))
    assert out == ["Sure", "Paris", " it is"]  # "Paris" is the answer's, not the call's argument


def test_a_call_only_answer_has_no_content_tokens() -> None:
    aligned = ContentLogprobs()
    for piece in ("<tool_call>", '{"name": "f", "arguments": {}}', "</tool_call>"):
        aligned.add_tokens([lp(piece)], piece)
        assert aligned.content("") == []
    assert aligned.finish("") == []


def test_thinking_text_takes_room_without_logprobs() -> None:
    aligned = ContentLogprobs()
    aligned.add_tokens([], "Let me think.")  # reasoning tokens: the caller leaves their logprobs out
    aligned.add_tokens([], "</think>")
    aligned.add_tokens([lp("\n\n")], "\n\n")  # counted as content by the engine, stripped by the splitter
    assert aligned.content("") == []
    aligned.add_tokens([lp("Yes")], "Yes")
    assert tokens_of(aligned.content("Yes")) == ["Yes"]
    assert aligned.finish("") == []


def test_upstream_token_texts_place_each_token() -> None:
    aligned = ContentLogprobs()
    aligned.add_token_texts([lp("think"), lp("</think>"), lp("Hi")], "think</think>Hi")
    assert tokens_of(aligned.finish("Hi")) == ["Hi"]


def test_upstream_logprobs_are_read_leniently() -> None:
    raw = {"content": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}, {"token": "Yo", "logprob": -2.0}]},
        {"token": "!", "logprob": float("-inf"), "bytes": None, "top_logprobs": []},
        {"token": 3, "logprob": -1.0},
        {"token": "x"},
    ]}
    out = token_logprobs(raw)
    assert [(e.token, e.logprob, e.bytes) for e in out] == [("Hi", -0.25, (72, 105)), ("!", -9999.0, (33,))]
    assert [(t.token, t.logprob, t.bytes) for t in out[0].top] == [("Hi", -0.25, (72, 105)), ("Yo", -2.0, (89, 111))]
    assert token_logprobs(None) == [] and token_logprobs({"content": None}) == []


class ScriptedStream:
    """An engine request's outputs, one token each, as `RequestStream` gives them."""

    def __init__(self, ids: list[int], reasoning: int = 0) -> None:
        self.outputs = [RequestOutput("r", (t,), i == len(ids) - 1, FinishReason.STOP if i == len(ids) - 1 else None,
                                      5, 0, i + 1, min(i + 1, reasoning),
                                      (SampledLogprob(t, -0.1 * (i + 1), ((t, -0.1 * (i + 1)),)),))
                        for i, t in enumerate(ids)]
        self.aborted = False

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        for out in self.outputs:
            if self.aborted:
                return
            yield out

    async def abort(self) -> None:
        self.aborted = True


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, 512)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def generate(tokenizer: Tokenizer, text: str, stops: list[str], tools: list[str] | None = None,
             thinking: str = "") -> tuple[str, list[TokenLogprob], list[str]]:
    return asyncio.run(_generate(tokenizer, text, stops, tools, thinking))


async def _generate(tokenizer: Tokenizer, text: str, stops: list[str], tools: list[str] | None,
                    thinking: str) -> tuple[str, list[TokenLogprob], list[str]]:
    """`thinking`: text the engine counted as reasoning (its tokens come first, `</think>` included)."""
    reasoning = tokenizer.encode(thinking, add_special_tokens=False).ids if thinking else []
    ids = reasoning + tokenizer.encode(text, add_special_tokens=False).ids
    gen = LocalGeneration([ScriptedStream(ids, len(reasoning))], tokenizer, stops, 5,  # type: ignore[list-item]
                          tools, thinking=bool(thinking), token_texts=TokenTexts(tokenizer))
    content, logprobs, calls = "", [], []
    async for delta in gen:
        content += delta.content
        logprobs += delta.logprobs
        calls += [c.name for c in delta.tool_calls]
    return content, logprobs, calls


def test_local_pipeline_gives_one_logprob_per_content_token(tokenizer: Tokenizer) -> None:
    content, logprobs, _ = generate(tokenizer, "What is the capital of France? Paris.", [])
    assert content == "What is the capital of France? Paris."
    assert "".join(e.token for e in logprobs) == content
    assert all(e.top[0].logprob == e.logprob for e in logprobs)


def test_local_pipeline_drops_what_a_stop_string_cut(tokenizer: Tokenizer) -> None:
    content, logprobs, _ = generate(tokenizer, "The quick brown fox jumps over the lazy dog.", ["fox"])
    assert content == "The quick brown "
    # " fox" is kept: its space was sent (a token the cut splits is a content token); nothing after it is.
    assert "".join(e.token for e in logprobs) == "The quick brown fox"


def test_local_pipeline_leaves_out_tool_call_markup(tokenizer: Tokenizer) -> None:
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"location": "Paris"}}</tool_call>'
    content, logprobs, calls = generate(tokenizer, text, [], tools=["f"])
    assert calls == ["f"] and content == "Sure."
    assert "".join(e.token for e in logprobs) in ("Sure.", "Sure.<")  # a token may straddle the marker


def test_local_pipeline_in_thinking_mode_covers_content_tokens_only(tokenizer: Tokenizer) -> None:
    content, logprobs, _ = generate(tokenizer, "\n\nParis.", [], thinking="Let me think step by step.</think>")
    assert content == "Paris."
    assert "".join(e.token for e in logprobs) == "Paris."  # no thinking token, no marker, no stripped newline
