"""The remote backend's translations, without a network: request bodies per upstream kind, usage
normalization from each engine's fields, error mapping, and the catalog's backend table."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from flashserve.api.chat import generation_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.remote import (
    RemoteBackend,
    RemoteGeneration,
    Upstream,
    normalize_usage,
    upstream_body,
    upstream_error,
)
from flashserve.catalog import CatalogError, RemoteSpec, load_catalog_file
from flashserve.errors import FlashserveError
from flashserve.generation import GenerationRequest, Message


def request(**kw: object) -> GenerationRequest:
    return generation_request(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}))


@pytest.mark.parametrize(("kind", "effort", "expected"), [
    ("deepseek", "low", {"thinking": {"type": "enabled"}, "reasoning_effort": "high"}),
    ("deepseek", "xhigh", {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}),
    ("deepseek", "ultra", {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}),
    ("deepseek", "none", {"thinking": {"type": "disabled"}}),
    ("vllm", "max", {"chat_template_kwargs": {"thinking": True, "reasoning_effort": "max"}}),
    ("sglang", "none", {"chat_template_kwargs": {"thinking": False}}),
    ("openai", "medium", {"reasoning_effort": "medium"}),
])
def test_reasoning_effort_per_upstream_kind(kind: str, effort: str, expected: dict) -> None:
    body = upstream_body(request(reasoning_effort=effort, max_tokens=5), Upstream("http://u/v1", "up-model", kind))
    assert body["model"] == "up-model" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5
    for key in ("thinking", "reasoning_effort", "chat_template_kwargs"):
        assert body.get(key) == expected.get(key), key


def test_usage_from_each_engine() -> None:
    deepseek = normalize_usage({"prompt_tokens": 100, "completion_tokens": 7, "prompt_cache_hit_tokens": 64,
                                "prompt_cache_miss_tokens": 36, "completion_tokens_details": {"reasoning_tokens": 3}})
    assert (deepseek.prompt_tokens, deepseek.cached_tokens, deepseek.completion_tokens, deepseek.reasoning_tokens) \
        == (100, 64, 7, 3)
    vllm = normalize_usage({"prompt_tokens": 50, "completion_tokens": 5,
                            "prompt_tokens_details": {"cached_tokens": 32}})
    assert (vllm.cached_tokens, vllm.reasoning_tokens) == (32, 0)
    sglang = normalize_usage({"prompt_tokens": 50, "completion_tokens": 9, "reasoning_tokens": 4,
                              "prompt_tokens_details": None})
    assert (sglang.cached_tokens, sglang.reasoning_tokens) == (0, 4)


def test_vllm_reasoning_field_becomes_reasoning_content() -> None:
    gen = RemoteGeneration.__new__(RemoteGeneration)
    gen._calls = {}
    delta = gen._delta({"index": 0, "delta": {"reasoning": "thinking..."}})
    assert delta is not None and delta.reasoning_content == "thinking..."
    gen._delta({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f",
                                                                                           "arguments": '{"a"'}}]}})
    gen._delta({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}})
    end = gen._delta({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
    assert end is not None and [(c.id, c.name, c.arguments) for c in end.tool_calls] == [("call_1", "f", '{"a": 1}')]


@pytest.mark.parametrize(("status", "ours", "code"), [(400, 400, "upstream_invalid_request"),
                                                     (429, 429, "upstream_rate_limited"),
                                                     (403, 502, "upstream_auth_failed"),
                                                     (500, 502, "upstream_error")])
def test_upstream_errors_map_to_ours(status: int, ours: int, code: str) -> None:
    err = upstream_error(status, '{"error": {"message": "nope", "param": "max_tokens"}}', {"retry-after": "7"})
    assert (err.status, err.code) == (ours, code)
    if status == 429:
        assert err.headers["retry-after"] == "7"


def test_catalog_backend_errors_name_the_key_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[models."m"]\ncontext_length = 4096\n\n[models."m".backend]\ntype = "remote"\n'
                    'url = "http://x/v1"\nmodel = "up"\nkind = "tgi"\n')
    with pytest.raises(CatalogError, match="catalog.toml:4: .*kind must be one of"):
        load_catalog_file(path)
    path.write_text('[models."m".backend]\ntype = "remote"\nurl = "http://x/v1"\nmodel = "up"\n'
                    'api_key_env = "NOT_SET_ANYWHERE"\n')
    with pytest.raises(CatalogError, match=r"catalog.toml:5: .*NOT_SET_ANYWHERE, which is not set"):
        load_catalog_file(path)
    monkeypatch.setenv("NOT_SET_ANYWHERE", "k")
    entry = load_catalog_file(path)["m"].backend
    assert isinstance(entry, RemoteSpec)
    assert entry.api_key == "k" and entry.kind == "openai"
    path.write_text('[models."m"]\ncontext_length = -3\n')
    with pytest.raises(CatalogError, match="catalog.toml:2: .*context_length must be a positive integer"):
        load_catalog_file(path)


def test_catalog_replica_sets(tmp_path: Path) -> None:
    from flashserve.catalog import ReplicaSetSpec

    path = tmp_path / "catalog.toml"
    path.write_text('[models."m".backend]\ntype = "remote"\nreplicas = ["http://a/v1", "http://b/v1"]\n'
                    'model = "up"\nkind = "vllm"\npolicy = "least_load"\n')
    spec = load_catalog_file(path)["m"].backend
    assert isinstance(spec, ReplicaSetSpec) and spec.policy == "least_load"
    assert [u.url for u in spec.upstreams] == ["http://a/v1", "http://b/v1"] and all(u.retries == 0 for u in
                                                                                    spec.upstreams)
    path.write_text('[models."m".backend]\ntype = "remote"\nreplicas = []\nmodel = "up"\n')
    with pytest.raises(CatalogError, match="catalog.toml:3: .*replicas must be a non-empty list"):
        load_catalog_file(path)
    path.write_text('[models."m".backend]\ntype = "remote"\nreplicas = ["http://a/v1"]\nmodel = "up"\n'
                    'policy = "random"\n')
    with pytest.raises(CatalogError, match="catalog.toml:5: .*policy must be"):
        load_catalog_file(path)


def test_upstream_body_is_an_openai_chat_body_of_what_the_client_gave() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = upstream_body(request(
        messages=[{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
        tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}, stop="END", seed=7,
        max_completion_tokens=9, user="u1", metadata={"k": "v"},
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
    ), Upstream("http://u/v1", "up"))
    assert body["messages"] == [
        {"role": "system", "content": "a\nb"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}]
    assert body["tools"] == [tool] and body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert (body["stop"], body["seed"], body["max_tokens"], body["user"], body["metadata"]) == \
        (["END"], 7, 9, "u1", {"k": "v"})
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "s",
                                                                             "schema": {"type": "object"}}}
    assert "reasoning_effort" not in body and "logprobs" not in body


def test_logprobs_go_upstream_and_come_back() -> None:
    body = upstream_body(request(logprobs=True, top_logprobs=2), Upstream("http://u/v1", "up"))
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)
    gen = RemoteGeneration.__new__(RemoteGeneration)
    gen._calls = {}
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Yo", "logprob": -1.5}]}
    delta = gen._delta({"index": 0, "delta": {"content": "Hi"}, "logprobs": {"content": [entry]}})
    assert delta is not None and [(e.token, e.logprob, e.bytes) for e in delta.logprobs] == [("Hi", -0.5, (72, 105))]
    assert [(t.token, t.logprob) for t in delta.logprobs[0].top] == [("Hi", -0.5), ("Yo", -1.5)]


def test_thinking_switch_per_upstream_kind() -> None:
    def body(kind: str, **fields: object) -> dict:
        request = generation_request(ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}))
        return upstream_body(request, Upstream(url="http://u/v1", model="up", kind=kind))

    off = {"thinking": {"type": "disabled"}, "reasoning_effort": "max"}
    disabled = body("deepseek", **off)
    assert disabled["thinking"] == {"type": "disabled"} and "reasoning_effort" not in disabled
    assert body("vllm", **off)["chat_template_kwargs"] == {"thinking": False}
    on = body("deepseek", thinking={"type": "enabled"})
    assert on["thinking"] == {"type": "enabled"} and on["reasoning_effort"] == "high"


def test_prefix_and_fim_bodies() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "It is", "prefix": True}]
    request = generation_request(ChatCompletionRequest.model_validate({"model": "m", "messages": messages}))
    deepseek = upstream_body(request, Upstream(url="http://u/v1", model="up", kind="deepseek"))
    assert deepseek["messages"][-1]["prefix"] is True and "continue_final_message" not in deepseek
    vllm = upstream_body(request, Upstream(url="http://u/v1", model="up", kind="vllm"))
    assert vllm["continue_final_message"] is True and vllm["add_generation_prompt"] is False
    fim = upstream_body(GenerationRequest(model="m", messages=[], raw_prompt="def f(", suffix="return 1"),
                        Upstream(url="http://u/v1", model="up", kind="deepseek"))
    assert (fim["prompt"], fim["suffix"], "messages" in fim, "thinking" in fim) == ("def f(", "return 1", False, False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_tokenize_goes_to_the_upstreams_root() -> None:
    seen: list[tuple[str, dict]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.host == "plain":  # an OpenAI-compatible server without tokenizer endpoints
            return httpx.Response(404)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [5, 6], "count": 2, "max_model_len": 99})
        if request.url.path == "/detokenize":
            return httpx.Response(200, json={"prompt": "hi"})
        return httpx.Response(404)

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    vllm = RemoteBackend(Upstream(url="http://u:8000/v1", model="up", kind="vllm"), client)
    assert await vllm.tokenize(GenerationRequest(model="m", messages=[Message("user", "hi")]), False) == [5, 6]
    assert await vllm.detokenize([5, 6]) == "hi"
    assert seen[0] == ("/tokenize", {"model": "up", "messages": [{"role": "user", "content": "hi"}],
                                     "add_generation_prompt": False})
    for kind in ("deepseek", "openai"):  # none at all / a server answering 404 there
        other = RemoteBackend(Upstream(url="http://plain/v1", model="up", kind=kind), client)
        with pytest.raises(FlashserveError) as err:
            await other.tokenize(GenerationRequest(model="m", messages=[], raw_prompt="hi"))
        assert err.value.status == 501 and err.value.code == "tokenizer_unavailable"
    await client.aclose()
