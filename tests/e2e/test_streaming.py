"""End-to-end: streaming POST /v1/chat/completions (`stream: true`).

Checks the chunk sequence the `openai` client sees (role first, content deltas, one finish_reason,
the include_usage chunk), the raw SSE framing with httpx (`data:` lines, `usage: null` on every chunk
with include_usage, `data: [DONE]` last), that a greedy stream says exactly what the non-streaming
answer says, that stop strings never leak into deltas (also when they span tokens or never complete),
per-index deltas for n > 1. The raw SSE framing and the client hanging up mid-stream moved in-process
(tests/api/test_streaming.py, test_billing.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import openai
import pytest

MODEL = "deepseek/deepseek-v4-flash"
BLOCK = 16
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


@dataclass
class Collected:
    chunks: list = field(default_factory=list)
    content: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    deltas: dict[int, list] = field(default_factory=lambda: defaultdict(list))
    finish: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    usage_chunks: list = field(default_factory=list)


def stream(client: openai.OpenAI, messages: list, **kw) -> Collected:
    out = Collected()
    with client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kw) as s:
        for chunk in s:
            out.chunks.append(chunk)
            if chunk.usage is not None:
                out.usage_chunks.append(chunk)
            for choice in chunk.choices:
                out.deltas[choice.index].append(choice)
                if choice.delta.content:
                    out.content[choice.index] += choice.delta.content
                if choice.finish_reason is not None:
                    out.finish[choice.index].append(choice.finish_reason)
    return out


def check_choice_sequence(c: Collected, index: int) -> None:
    """Role on the first delta only, exactly one finish_reason and it is on the last delta."""
    deltas = c.deltas[index]
    assert deltas, f"no delta for choice {index}"
    assert deltas[0].delta.role == "assistant"
    assert all(d.delta.role is None for d in deltas[1:])
    assert len(c.finish[index]) == 1
    assert deltas[-1].finish_reason in ("stop", "length")
    assert all(d.finish_reason is None for d in deltas[:-1])


def greedy(client: openai.OpenAI, messages: list, max_tokens: int, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=max_tokens, **kw)


def test_stream_matches_non_streaming(client: openai.OpenAI) -> None:
    full = greedy(client, PARIS, 24)
    c = stream(client, PARIS, temperature=0, max_tokens=24)
    assert c.chunks
    first = c.chunks[0]
    assert first.choices and first.choices[0].delta.role == "assistant"
    assert first.id.startswith("chatcmpl-")
    for chunk in c.chunks:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.id == first.id
        assert chunk.created == first.created
        assert chunk.model == MODEL
        assert chunk.system_fingerprint and chunk.system_fingerprint.startswith("fp_")
        assert chunk.choices, "a chunk without choices but no include_usage"
        assert chunk.usage is None
    check_choice_sequence(c, 0)
    assert set(c.deltas) == {0}
    assert c.content[0] == full.choices[0].message.content
    assert c.finish[0] == [full.choices[0].finish_reason]


def test_stream_include_usage(client: openai.OpenAI) -> None:
    full = greedy(client, STORY, 8)
    c = stream(client, STORY, temperature=0, max_tokens=8, stream_options={"include_usage": True})
    *body, last = c.chunks
    assert all(ch.usage is None and ch.choices for ch in body)
    assert last.choices == []
    assert last.id == body[0].id
    u = last.usage
    assert u is not None and c.usage_chunks == [last]
    assert u.prompt_tokens == full.usage.prompt_tokens
    assert u.completion_tokens == full.usage.completion_tokens == 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 <= u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens % BLOCK == 0
    assert u.completion_tokens_details.reasoning_tokens == 0
    check_choice_sequence(c, 0)
    assert c.finish[0] == ["length"]
    assert c.content[0] == full.choices[0].message.content


# -- stop strings in streams -------------------------------------------------------------------------------
def spanning(text: str) -> str:
    """Five characters around the first space inside the answer: "ab cd" crosses a token boundary."""
    for i in range(2, len(text) - 3):
        if text[i] == " " and not any(ch.isspace() for ch in text[i - 2:i] + text[i + 1:i + 3]):
            return text[i - 2:i + 3]
    raise AssertionError(f"no word boundary in {text!r}")


@pytest.fixture(scope="module")
def paris_answer(client: openai.OpenAI) -> tuple[str, str]:
    r = greedy(client, PARIS, 32)
    assert "Paris" in r.choices[0].message.content
    return r.choices[0].message.content, r.choices[0].finish_reason


STOP_CASES = {
    "word": lambda base: ["Paris"],
    "mid-token": lambda base: ["ari"],
    "spanning": lambda base: [spanning(base)],
    "second-word-spanning": lambda base: [spanning(base[base.index(" ") + 1:])],
}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_stream_stop_strings_never_leak(client: openai.OpenAI, paris_answer: tuple[str, str],
                                        case: str) -> None:
    base, _ = paris_answer
    stops = STOP_CASES[case](base)
    expected = base[:min(base.index(s) for s in stops)]
    c = stream(client, PARIS, temperature=0, max_tokens=32, stop=stops)
    # Deltas cannot be taken back: their concatenation must be exactly the text before the stop.
    assert c.content[0] == expected
    assert not any(s in c.content[0] for s in stops)
    assert c.finish[0] == ["stop"]
    check_choice_sequence(c, 0)


def test_stream_partial_stop_match_is_released(client: openai.OpenAI, paris_answer: tuple[str, str]) -> None:
    """Text held back while it might start a stop string is sent once the match fails or the answer ends."""
    base, finish = paris_answer
    c = stream(client, PARIS, temperature=0, max_tokens=32, stop=[base[-4:] + "QZ", "Parisian"])
    assert c.content[0] == base
    assert c.finish[0] == [finish]


# -- n > 1 ---------------------------------------------------------------------------------------------------
def test_stream_n_choices_per_index(client: openai.OpenAI) -> None:
    one = greedy(client, STORY, 10)
    c = stream(client, STORY, temperature=0, max_tokens=10, n=2, stream_options={"include_usage": True})
    assert set(c.deltas) == {0, 1}
    for i in (0, 1):
        check_choice_sequence(c, i)
        assert c.content[i] == one.choices[0].message.content
        assert c.finish[i] == [one.choices[0].finish_reason]
    assert len(c.usage_chunks) == 1 and c.chunks[-1].choices == []
    u = c.usage_chunks[0].usage
    assert u.prompt_tokens == one.usage.prompt_tokens
    assert u.completion_tokens == 2 * one.usage.completion_tokens


def test_stream_n_choices_sampled_differ(client: openai.OpenAI) -> None:
    c = stream(client, STORY, temperature=1.0, max_tokens=12, n=3, seed=11)
    assert set(c.deltas) == {0, 1, 2}
    for i in range(3):
        check_choice_sequence(c, i)
        assert c.content[i]
    assert len(set(c.content.values())) >= 2


# -- disconnects ---------------------------------------------------------------------------------------------
