"""The chat completions wire contract, in-process: the JSON shape, SSE framing (data: lines, the role chunk
first, `usage: null` on every chunk then a usage chunk with empty choices, `[DONE]` last), an error after
the headers reported in-band, keep-alive comments, stop strings, n choices, stream == non-stream.

Moved here from tests/e2e/test_streaming.py and test_chat_completions.py (framing and shape; the real
model's answers stay there as the smoke set).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.api.conftest import Api

pytestmark = pytest.mark.anyio


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body; asserts every event is exactly one `data:` line or a comment."""
    assert text.endswith("\n\n"), text[-50:]
    out = []
    for event in text.split("\n\n")[:-1]:
        lines = event.split("\n")
        if lines[0].startswith(":"):
            assert len(lines) == 1 and lines[0] == ": keep-alive", event
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), event
        out.append(lines[0][len("data: "):])
    return out


def chunks(text: str) -> list[dict[str, Any]]:
    events = sse_events(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


def body(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def test_non_streaming_shape_usage_and_cost(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("scripted", "hello there world"))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl")
    # x-request-id is the request's correlation id (a UUID when the client sent none), not the object's id
    assert str(uuid.UUID(r.headers["x-request-id"])) == r.headers["x-request-id"] != data["id"]
    assert data["model"] == "scripted" and data["system_fingerprint"] == "fp_scripted0"
    assert data["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello there world "},
                                "logprobs": None, "finish_reason": "stop"}]
    usage = data["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (3, 3, 6)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    # DeepSeek's prices: 3 * $0.14/M + 3 * $0.28/M
    assert usage["cost"] == pytest.approx(3 * 0.14e-6 + 3 * 0.28e-6)
    assert float(r.headers["x-flashserve-cost-usd"]) == pytest.approx(usage["cost"])


@pytest.mark.parametrize("include_usage", [True, False])
async def test_sse_framing(api: Api, include_usage: bool) -> None:
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    r = await api.client.post("/v1/chat/completions", json=body("scripted", "one two", stream=True, **extra))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    cs = chunks(r.text)
    assert uuid.UUID(r.headers["x-request-id"]) and r.headers["x-request-id"] != cs[0]["id"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == cs[0]["id"] for c in cs)
    assert cs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in cs[1:] if c["choices"])
    if include_usage:
        *body_chunks, last = cs
        assert all(c["usage"] is None for c in body_chunks)  # null on every chunk but the last
        assert last["choices"] == []
        assert last["usage"]["prompt_tokens"] == 2 and last["usage"]["completion_tokens"] == 2
        assert last["usage"]["cost"] > 0
    else:
        body_chunks = cs
        assert all("usage" not in c for c in cs)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in body_chunks)
    assert text == "one two "
    assert body_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert [c["choices"][0]["finish_reason"] for c in body_chunks[:-1]] == [None] * (len(body_chunks) - 1)


async def test_error_after_the_headers_is_an_in_band_event_then_done(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("scripted", "partial @fail more", stream=True))
    assert r.status_code == 200  # the headers were sent before the failure
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "engine_error" and error["error"]["type"] == "server_error"
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "partial " in contents and "more " not in contents
    [row] = await api.records()
    assert row["status"] == "error" and row["completion_tokens"] == 1


async def test_error_before_the_headers_is_an_http_error_and_no_row(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("scripted", "@refuse", stream=True))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    assert await api.records() == []


async def test_a_waiting_stream_sends_keep_alive_comments(api: Api) -> None:
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body("scripted", "a @hold b", stream=True)) as r:
        seen = ""
        async for piece in r.aiter_text():
            seen += piece
            if seen.count(": keep-alive\n\n") >= 2:  # sse_keepalive_s is 0.2 here
                api.scripted.release()
        cs = chunks(seen)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in cs) == "a b "


async def test_stream_equals_non_stream_on_the_fake_model(api: Api) -> None:
    request = body("fake-local", "abc", max_tokens=12, temperature=0)
    whole = (await api.client.post("/v1/chat/completions", json=request)).json()
    r = await api.client.post("/v1/chat/completions",
                              json={**request, "stream": True, "stream_options": {"include_usage": True}})
    cs = chunks(r.text)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in cs if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    reasons = [c["choices"][0]["finish_reason"] for c in cs if c["choices"] and c["choices"][0]["finish_reason"]]
    assert reasons == [whole["choices"][0]["finish_reason"]]
    same = ("prompt_tokens", "completion_tokens", "total_tokens", "completion_tokens_details")
    assert {k: cs[-1]["usage"][k] for k in same} == {k: whole["usage"][k] for k in same}
    # The second request found the prompt's full blocks in the prefix cache: billed at the hit price.
    cached = cs[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and whole["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    usage = whole["usage"]
    miss, hit, out = 0.14e-6, 0.0028e-6, 0.28e-6
    assert whole["usage"]["cost"] == pytest.approx(usage["prompt_tokens"] * miss + usage["completion_tokens"] * out)
    assert cs[-1]["usage"]["cost"] == pytest.approx(
        cached * hit + (usage["prompt_tokens"] - cached) * miss + usage["completion_tokens"] * out)


async def test_max_tokens_gives_length_on_the_fake_model(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("fake-local", "hi", max_tokens=3, temperature=0))
    data = r.json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3


async def test_n_choices_stream_per_index(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("scripted", "x y", n=2, stream=True))
    cs = chunks(r.text)
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in cs:
        choice = c["choices"][0]
        by_index[choice["index"]] += choice["delta"].get("content", "")
    assert by_index == {0: "x y ", 1: "x y "}
    roles = [c["choices"][0]["index"] for c in cs if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]


async def test_the_openai_client_reads_the_stream_and_the_answer(api: Api) -> None:
    client = api.openai()
    answer = await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi you"}])
    assert answer.choices[0].message.content == "hi you "
    assert answer.usage is not None and answer.usage.total_tokens == 4
    stream = await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi you"}],
                                                  stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == "hi you " and usage is not None and usage.completion_tokens == 2
