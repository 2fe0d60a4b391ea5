"""End to end: logprobs through the official `openai` client on the embedded model (the session server).

Chat completions (non-streaming and streaming) and the Responses API with
`include=["message.output_text.logprobs"]`: one entry per content token whose texts spell the content, the
chosen token's logprob equal to the largest of its top_logprobs at temperature 0, the same greedy answer
with and without logprobs, and the 400s that name the field.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest

MODEL = "deepseek/deepseek-v4-flash"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


def check_entries(entries: list, k: int) -> None:
    for entry in entries:
        assert isinstance(entry.logprob, float) and entry.logprob <= 0.0 and math.isfinite(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        assert len(entry.top_logprobs) == k
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Temperature 0: the chosen token is the argmax, so it is the first of the top ones, same value.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_chat_logprobs_non_streaming(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=MAX_TOKENS)
    r = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=MAX_TOKENS,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.message.content == plain.choices[0].message.content  # logprobs change no token
    assert plain.choices[0].logprobs is None
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    if choice.finish_reason == "length":
        assert len(entries) == r.usage.completion_tokens
    check_entries(entries, 3)


def test_chat_logprobs_streaming_match_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=MAX_TOKENS,
                                           logprobs=True, top_logprobs=2)
    text, entries = "", []
    for chunk in client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=MAX_TOKENS,
                                                logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                # Each content chunk carries the logprobs of the tokens it completes.
                assert choice.logprobs is not None and choice.logprobs.content is not None
            if choice.logprobs is not None and choice.logprobs.content:
                entries += choice.logprobs.content
    assert text == whole.choices[0].message.content
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    check_entries(entries, 2)


def test_chat_logprobs_without_top(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0.8, seed=3,
                                       max_tokens=MAX_TOKENS, logprobs=True)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    assert all(e.top_logprobs == [] and e.logprob <= 0.0 for e in entries)


def test_responses_include_logprobs(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                max_output_tokens=MAX_TOKENS, include=["message.output_text.logprobs"],
                                top_logprobs=2, store=False)
    part = r.output[0].content[0]
    assert part.type == "output_text" and part.logprobs
    assert "".join(e.token for e in part.logprobs) == part.text
    check_entries(part.logprobs, 2)
    deltas: list = []
    text = ""
    with client.responses.stream(model=MODEL, input="What is the capital of France?", temperature=0,
                                 max_output_tokens=MAX_TOKENS, include=["message.output_text.logprobs"],
                                 top_logprobs=2, store=False) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
                deltas += event.logprobs
    assert text == part.text
    assert [(d.token, d.logprob) for d in deltas] == [(e.token, e.logprob) for e in part.logprobs]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": PARIS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": PARIS, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": PARIS, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": PARIS, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": PARIS, "logprobs": "yes"}, "logprobs"),
    ("/v1/responses", {"input": "x", "top_logprobs": 2}, "top_logprobs"),
    ("/v1/responses", {"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 99},
     "top_logprobs"),
])
def test_bad_logprobs_are_400_naming_the_field(http: httpx.Client, path: str, body: dict, param: str) -> None:
    r = http.post(path, json={"model": MODEL, "max_tokens": 4, **body} if "messages" in body
                  else {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
