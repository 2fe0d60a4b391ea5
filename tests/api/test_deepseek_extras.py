"""DeepSeek's API beyond the chat schema, in-process: legacy completions (/v1/completions, /beta/completions:
the choices' numbering, echo, the legacy logprobs shape, billing per prompt), chat prefix completion and the
message fields that must never be dropped, model aliases, the `thinking` switch, `user` as the prefix-cache
namespace, the root base URL, and the tokenizer endpoints.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import API_KEY, BASE, LOCAL_CONTEXT, Api

pytestmark = pytest.mark.anyio


def sse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            out.append(json.loads(line[6:]))
    return out


def error_of(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- legacy completions ------------------------------------------------------------------------------------
async def test_prompts_times_n_are_numbered_as_openai_does_and_billed_per_prompt(api: Api) -> None:
    r = await api.client.post("/v1/completions", json={"model": "scripted", "prompt": ["one two", "three"], "n": 2})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl")
    texts = [(c["index"], c["text"], c["finish_reason"]) for c in data["choices"]]
    assert texts == [(0, "one two ", "stop"), (1, "one two ", "stop"), (2, "three ", "stop"), (3, "three ", "stop")]
    assert data["usage"]["completion_tokens"] == 6 and data["usage"]["prompt_tokens"] == 3
    rows = await api.records()
    assert sorted((row["model"], row["completion_tokens"], row["status"]) for row in rows) == [
        ("scripted", 2, "ok"), ("scripted", 4, "ok")]
    assert float(r.headers["x-flashserve-cost-usd"]) == pytest.approx(sum(row["cost_pusd"] for row in rows) / 1e12)


async def test_stream_with_usage_and_echo(api: Api) -> None:
    r = await api.client.post("/beta/completions", json={"model": "scripted", "prompt": "hello there", "echo": True,
                                                         "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    chunks = sse(r.text)
    assert r.text.rstrip().endswith("data: [DONE]")
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "hello therehello there "
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["object"] == "text_completion" for c in chunks)


async def test_logprobs_in_the_legacy_shape(api: Api) -> None:
    r = await api.client.post("/v1/completions", json={"model": "scripted", "prompt": "ab cde", "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "ab cde "
    assert choice["logprobs"] == {
        "tokens": ["ab ", "cde "], "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"ab ": -0.5, "alt1": -2.0}, {"cde ": -0.5, "alt1": -2.0}], "text_offset": [0, 3]}
    r = await api.client.post("/v1/completions", json={"model": "scripted", "prompt": "ab cde", "logprobs": 0,
                                                       "stream": True})
    pieces = [c["choices"][0] for c in sse(r.text) if c["choices"][0]["text"]]
    assert [p["logprobs"] for p in pieces] == [
        {"tokens": ["ab "], "token_logprobs": [-0.5], "top_logprobs": [{}], "text_offset": [0]},
        {"tokens": ["cde "], "token_logprobs": [-0.5], "top_logprobs": [{}], "text_offset": [3]}]


async def test_the_openai_client_reads_completions(api: Api) -> None:
    client = api.openai()
    done = await client.completions.create(model="scripted", prompt="x y", max_tokens=5)
    assert done.choices[0].text == "x y " and done.usage is not None and done.usage.completion_tokens == 2
    stream = await client.completions.create(model="scripted", prompt="x y", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "x y "


@pytest.mark.parametrize(("extra", "param"), [
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": []}, "prompt"), ({"echo": True, "logprobs": 1}, "echo"),
    ({"logprobs": 21}, "logprobs"), ({"best_of": 3}, "best_of"), ({"stream_options": {"include_usage": True}},
                                                                    "stream_options"),
    ({"n": 16, "prompt": ["a"] * 5}, "n"), ({"stop": [""]}, "stop"), ({"suffix": 3}, "suffix"),
    ({"max_tokens": 0}, "max_tokens"), ({"tools": []}, "tools"),
])
async def test_bad_completions_bodies_are_400s_naming_the_field(api: Api, extra: dict[str, Any],
                                                              param: str | None) -> None:
    r = await api.client.post("/v1/completions", json={"model": "scripted", "prompt": "a", **extra})
    error = error_of(r)
    if param is not None:
        assert error["param"] == param, error
    assert await api.records() == []


async def test_raw_prompt_on_the_engine_and_no_fim_format(api: Api) -> None:
    r = await api.client.post("/v1/completions", json={"model": "fake-local", "prompt": "abc", "max_tokens": 4,
                                                       "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 3  # the text alone: no chat template around it
    r = await api.client.post("/v1/completions", json={"model": "fake-local", "prompt": "abc", "suffix": "xyz"})
    error = error_of(r)
    assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]
    assert len(await api.records()) == 1  # the refused FIM wrote nothing
    r = await api.client.post("/v1/completions", json={"model": "fake-local", "prompt": "x" * (LOCAL_CONTEXT + 1)})
    error = error_of(r)
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"


async def test_a_remote_fim_goes_to_the_upstreams_completions(api: Api) -> None:
    r = await api.client.post("/v1/completions", json={"model": "remote", "prompt": "def f(", "suffix": "return 1"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "def f( | return 1"  # the fake upstream echoes what it got
    sent = api.upstreams["up-a"].seen[-1]["body"]
    assert sent["suffix"] == "return 1" and sent["model"] == "up-model" and "messages" not in sent
    r = await api.client.post("/v1/completions", json={"model": "remote", "prompt": "a", "logprobs": 1})
    assert api.upstreams["up-a"].seen[-1]["body"]["logprobs"] == 1  # the legacy spelling, upstream too
    assert r.json()["choices"][0]["logprobs"] == {"tokens": ["a | "], "token_logprobs": [-0.25],
                                                  "top_logprobs": [{"a | ": -0.25}], "text_offset": [0]}


# -- chat prefix completion and message fields ---------------------------------------------------------------
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi", "prefix": True}],
    [{"role": "assistant", "content": "a", "prefix": True}, {"role": "user", "content": "hi"}],
])
async def test_prefix_only_on_the_last_assistant_message(api: Api, messages: list[dict[str, Any]]) -> None:
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted", "messages": messages})
    assert error_of(r)["param"] == "messages[0].prefix"


@pytest.mark.parametrize(("field", "value"), [("function_call", {"name": "f", "arguments": "{}"}),
                                              ("audio", {"id": "audio_1"})])
async def test_message_fields_that_change_meaning_are_refused(api: Api, field: str, value: Any) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", field: value},
                {"role": "user", "content": "again"}]
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted", "messages": messages})
    assert error_of(r)["param"] == f"messages[1].{field}"


async def test_prefix_renders_the_assistant_turn_open(api: Api) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The cap", "prefix": True}]
    r = await api.client.post("/tokenize", json={"model": "fake-local", "messages": messages})
    assert r.status_code == 200, r.text
    text = (await api.client.post("/detokenize", json={"model": "fake-local", "tokens": r.json()["tokens"]})).json()
    assert text["prompt"].endswith("<|im_start|>assistant\nThe cap")  # no end of turn: the model goes on
    r = await api.client.post("/v1/chat/completions", json={"model": "fake-local", "messages": messages,
                                                            "max_tokens": 3})
    assert r.status_code == 200, r.text
    messages[1]["reasoning_content"] = "hmm"  # a thinking prefix, for a model that does not think
    r = await api.client.post("/v1/chat/completions", json={"model": "fake-local", "messages": messages})
    assert error_of(r)["param"] == "messages[1].reasoning_content"


# -- aliases, thinking, user ---------------------------------------------------------------------------------
async def test_an_alias_is_listed_naming_its_target_and_billed_as_it(api: Api) -> None:
    models = {m["id"]: m for m in (await api.client.get("/v1/models")).json()["data"]}
    assert models["scripted-thinker"]["alias_of"] == "scripted" and models["scripted-thinker"]["alias_thinking"]
    assert "alias_of" not in models["scripted"]
    one = (await api.client.get("/v1/models/scripted-thinker")).json()
    assert one["id"] == "scripted-thinker" and one["alias_of"] == "scripted"
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted-thinker",
                                                            "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200 and r.json()["model"] == "scripted-thinker"
    assert [row["model"] for row in await api.records()] == ["scripted"]
    request, _ = api.scripted.opened[-1]
    assert request.reasoning.thinking is True  # the alias's default
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted-thinker", "reasoning_effort": "none",
                                                            "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200 and api.scripted.opened[-1][0].reasoning.thinking is None  # the request's own


@pytest.mark.parametrize(("extra", "thinking", "effort"), [
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, False, None),
    ({"thinking": {"type": "enabled"}}, True, None),
    ({"thinking": {"type": "enabled"}, "reasoning_effort": "max"}, True, "max"),
    ({"reasoning_effort": "low"}, None, "low"),
    ({"reasoning_effort": "ultra"}, None, "ultra"),  # LiteLLM's deepseek provider and Codex send it
])
async def test_the_thinking_switch(api: Api, extra: dict[str, Any], thinking: bool | None,
                                   effort: str | None) -> None:
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted", **extra,
                                                            "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200, r.text
    reasoning = api.scripted.opened[-1][0].reasoning
    assert (reasoning.thinking, reasoning.effort) == (thinking, effort)


@pytest.mark.parametrize("value", [{"type": "on"}, {"budget_tokens": 5}, "enabled", {"type": "enabled",
                                                                                    "budget_tokens": 0}])
async def test_a_bad_thinking_switch_is_a_400(api: Api, value: Any) -> None:
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted", "thinking": value,
                                                            "messages": [{"role": "user", "content": "a"}]})
    assert error_of(r)["param"].startswith("thinking")


async def test_user_narrows_the_cache_namespace(api: Api) -> None:
    for user in ("alice", "bob", "alice", None):
        extra = {"user": user} if user else {}
        r = await api.client.post("/v1/chat/completions", json={"model": "scripted", **extra,
                                                                "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 200
    alice, bob, alice_again, nobody = [ctx.tenant for _, ctx in api.scripted.opened]
    assert alice == alice_again and len({alice, bob, nobody}) == 3
    assert alice.startswith(nobody + "/") and bob.startswith(nobody + "/") and "alice" not in alice


async def test_user_keeps_cached_prefixes_apart_on_the_engine(api: Api) -> None:
    prompt = "a shared system prompt that is long enough to fill several cache blocks " * 2

    async def cached(user: str) -> int:
        r = await api.client.post("/v1/chat/completions", json={
            "model": "fake-local", "user": user, "max_tokens": 2,
            "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert await cached("alice") == 0
    assert await cached("bob") == 0  # another end user: nothing of alice's is reused
    assert await cached("alice") > 0  # the same end user: the prefix is cached


# -- the root base URL ---------------------------------------------------------------------------------------
async def test_the_openai_client_with_a_root_base_url(api: Api) -> None:
    http = httpx.AsyncClient(transport=api.transport, timeout=30.0)
    client = openai.AsyncOpenAI(base_url=BASE, api_key=API_KEY, http_client=http, max_retries=0)
    try:
        answer = await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "a b"}])
        assert answer.choices[0].message.content == "a b "
        assert "scripted" in [m.id for m in (await client.models.list()).data]
        assert (await client.models.retrieve("scripted-thinker")).id == "scripted-thinker"
        done = await client.completions.create(model="scripted", prompt="c")
        assert done.choices[0].text == "c "
        beta = openai.AsyncOpenAI(base_url=f"{BASE}/beta", api_key=API_KEY, http_client=http, max_retries=0)
        answer = await beta.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "d"}])
        assert answer.choices[0].message.content == "d "
    finally:
        await http.aclose()
    r = await api.client.post("/chat/completions",
                              json={"model": "nope", "messages": [{"role": "user", "content": "a"}]})
    assert error_of(r, 404)["code"] == "model_not_found"  # OpenAI's error shape at the root too


# -- tokenizer endpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "/v1"])
async def test_tokenize_and_detokenize(api: Api, prefix: str) -> None:
    r = await api.client.post(f"{prefix}/tokenize", json={"model": "fake-local", "prompt": "abc"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["count"] == len(data["tokens"]) == 3 and data["max_model_len"] == LOCAL_CONTEXT
    r = await api.client.post(f"{prefix}/detokenize", json={"model": "fake-local", "tokens": data["tokens"]})
    assert r.json() == {"prompt": "abc"}
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = (await api.client.post("/tokenize", json={"model": "fake-local", "messages": messages})).json()
    without = (await api.client.post("/tokenize", json={"model": "fake-local", "messages": messages,
                                                        "add_generation_prompt": False})).json()
    assert with_prompt["count"] > without["count"] and with_prompt["tokens"][:without["count"]] == without["tokens"]
    chat = await api.client.post("/v1/chat/completions", json={"model": "fake-local", "messages": messages,
                                                               "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == with_prompt["count"]  # what a chat request sends
    assert len(await api.records()) == 1  # tokenizing is free: only the chat request wrote a row


@pytest.mark.parametrize(("path", "payload", "status", "param"), [
    ("/tokenize", {"model": "fake-local"}, 400, None),
    ("/tokenize", {"model": "fake-local", "prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, None),
    ("/tokenize", {"model": "fake-local", "prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/detokenize", {"model": "fake-local", "tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"model": "fake-local", "tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"model": "fake-local", "tokens": "abc"}, 400, "tokens"),
    ("/tokenize", {"model": "remote", "prompt": "a"}, 501, None),
    ("/tokenize", {"model": "fake-local", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0]"),
    ("/tokenize", {"model": "fake-local", "messages": [{"role": "user", "content": "a", "prefix": True}]}, 400,
     "messages[0].prefix"),
])
async def test_bad_tokenizer_requests(api: Api, path: str, payload: dict[str, Any], status: int,
                                      param: str | None) -> None:
    error = error_of(await api.client.post(path, json=payload), status)
    if param is not None:
        assert error["param"] == param, error


async def test_tokenize_needs_a_key_and_counts_against_rpm(api: Api) -> None:
    r = await api.http("sk-not-a-key").post("/tokenize", json={"model": "fake-local", "prompt": "a"})
    assert r.status_code == 401
    account, key = await api.new_account("tokenizer", rpm=2)
    client = api.http(key)
    for _ in range(2):
        assert (await client.post("/tokenize", json={"model": "fake-local", "prompt": "a"})).status_code == 200
    r = await client.post("/detokenize", json={"model": "fake-local", "tokens": [5]})
    assert error_of(r, 429)["code"] == "rate_limit_exceeded"
    assert await api.records(account) == []


@pytest.mark.parametrize("stop", [[""], ["x"] * 17])
async def test_a_bad_chat_stop_is_a_400_naming_stop(api: Api, stop: list[str]) -> None:
    r = await api.client.post("/v1/chat/completions", json={"model": "scripted", "stop": stop,
                                                            "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and error_of(r)["param"] == "stop", r.text
    assert await api.records() == []
