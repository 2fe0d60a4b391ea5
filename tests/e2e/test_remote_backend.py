"""A model served by a remote upstream: flashserve keeps the API, keys and billing, the upstream generates.

The upstreams are real processes on 127.0.0.1: a faithful stand-in for DeepSeek's API
(tests/e2e/fake_deepseek.py) and one for llama-cpp-python's server with its rules (tests/e2e/fake_llamacpp.py:
UUID request ids only, an empty 400 otherwise, no unknown fields, no usage in a stream). They sit behind the
session's shared `flashserve serve` (tests/e2e/scripted.py: `serve_upstreams`, the `upstreams` fixture), whose
catalog file points `ds-remote` and `llama-remote` at them and which logs in JSON (FLASHSERVE_LOG_FORMAT=json);
this module used to start a server of its own with the same catalog entries.
Retries, upstream errors, a wrong upstream key and timeouts moved in-process (tests/api/test_remote_router.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.scripted import ADMIN, KEY, LLAMA_MODEL, REMOTE_MODEL, UPSTREAM_KEY, Upstreams

MODEL = REMOTE_MODEL
LLAMA = LLAMA_MODEL
LLAMACPP: dict[str, str] = {}  # the llama.cpp stand-in's URL
LOGS: dict[str, Path] = {}  # the flashserve server's log file, for the log tests


@pytest.fixture(scope="module")
def remote(upstreams: Upstreams) -> Iterator[tuple[openai.OpenAI, str, str]]:
    LLAMACPP["url"] = upstreams.upstream[LLAMA]
    LOGS["server"] = upstreams.log
    with openai.OpenAI(base_url=f"{upstreams.base}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client, upstreams.base, upstreams.upstream[MODEL]


def sent_upstream(upstream_url: str) -> list[dict]:
    return httpx.get(f"{upstream_url}/requests", timeout=10).json()


def test_non_streaming_answer_usage_and_billing(remote: tuple[openai.OpenAI, str, str]) -> None:
    client, base, upstream_url = remote
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       reasoning_effort="medium")
    assert r.choices[0].message.content == "Hello from upstream"
    assert r.choices[0].message.reasoning_content == "Let me think."  # type: ignore[attr-defined]
    assert r.usage.prompt_tokens == 100 and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens_details.cached_tokens == 64  # DeepSeek's prompt_cache_hit_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    expected_pusd = 64 * 2_800 + 36 * 140_000 + 7 * 280_000  # the reference prices, per token
    assert round(r.usage.cost * 1e12) == expected_pusd  # type: ignore[attr-defined]
    last = sent_upstream(upstream_url)[-1]
    assert last["body"]["model"] == "deepseek-v4-flash" and last["body"]["stream"] is True
    assert last["body"]["thinking"] == {"type": "enabled"} and last["body"]["reasoning_effort"] == "high"
    assert last["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY not in str(last["headers"])  # the client's key never leaves flashserve
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        records = admin.get("/admin/usage/records").json()["data"]
    assert any(rec["model"] == MODEL and rec["cached_tokens"] == 64 and rec["cost_pusd"] == expected_pusd
               for rec in records), records


def test_streaming_passes_through_with_usage(remote: tuple[openai.OpenAI, str, str]) -> None:
    client, _, upstream_url = remote
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            reasoning_effort="none", stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text == "Hello from upstream" and usage is not None and usage.prompt_tokens_details.cached_tokens == 64
    assert sent_upstream(upstream_url)[-1]["body"]["thinking"] == {"type": "disabled"}


# -- request ids, what each upstream kind receives, JSON logs ----------------------------------------------
def test_a_deepseek_upstream_gets_the_request_id_and_no_account_data(remote: tuple[openai.OpenAI, str, str]) -> None:
    _, base, upstream_url = remote
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                           "x-request-id": "trace-ds-0001"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-ds-0001"
    assert r.json()["id"].startswith("chatcmpl-")  # the object's id stays ours
    headers = sent_upstream(upstream_url)[-1]["headers"]
    assert headers["x-request-id"] == "trace-ds-0001"
    assert "x-flashserve-cache-salt" not in headers and "acct_" not in json.dumps(headers)


def test_llamacpp_upstream_text_with_its_rules(remote: tuple[openai.OpenAI, str, str]) -> None:
    _, base, _ = remote
    trace = str(uuid.uuid4())
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}", "x-request-id": trace},
                   json={"model": LLAMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                         "parallel_tool_calls": True, "store": False, "metadata": {"a": "b"}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from llama"
    assert r.json()["usage"]["prompt_tokens"] == 21 and r.json()["usage"]["completion_tokens"] == 5
    assert r.headers["x-request-id"] == trace
    seen = sent_upstream(LLAMACPP["url"])[-1]
    assert seen["headers"]["x-request-id"] == trace  # a UUID goes as it is
    assert "x-flashserve-cache-salt" not in seen["headers"] and "acct_" not in json.dumps(seen)
    assert seen["body"]["stream"] is False  # its stream has no usage: asked for the whole answer


def test_llamacpp_upstream_gets_a_uuid_for_any_client_id(remote: tuple[openai.OpenAI, str, str]) -> None:
    _, base, _ = remote
    r = httpx.post(f"{base}/v1/chat/completions",
                   headers={"Authorization": f"Bearer {KEY}", "x-request-id": "my-trace.42"},
                   json={"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "my-trace.42"
    sent = sent_upstream(LLAMACPP["url"])[-1]["headers"]["x-request-id"]
    assert str(uuid.UUID(sent)) == sent


def test_llamacpp_streaming_with_usage_tools_and_json_mode(remote: tuple[openai.OpenAI, str, str]) -> None:
    client, _, _ = remote
    stream = client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text == "Hello from llama" and usage is not None and usage.completion_tokens == 5
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "weather?"}], tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = client.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "json"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(r.choices[0].message.content) == {"answer": 42}
    sent = sent_upstream(LLAMACPP["url"])[-1]["body"]
    assert sent["response_format"] == {"type": "json_object", "schema": schema}


def test_an_empty_upstream_refusal_names_the_upstream(remote: tuple[openai.OpenAI, str, str]) -> None:
    _, base, _ = remote
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": LLAMA, "messages": [{"role": "user", "content": "reject this"}]}, timeout=60)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "llamacpp upstream" in message and "smollm2" in message and "HTTP 400" in message, message
    assert uuid.UUID(r.headers["x-request-id"])  # errors carry the request id too


def test_json_logs_carry_the_request_and_never_its_prompt_or_key(remote: tuple[openai.OpenAI, str, str]) -> None:
    _, base, _ = remote
    secret = "the-secret-prompt-" + uuid.uuid4().hex
    r = httpx.post(f"{base}/v1/chat/completions",
                   headers={"Authorization": f"Bearer {KEY}", "x-request-id": "log-trace-7"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": secret}]}, timeout=60)
    assert r.status_code == 200
    httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": MODEL, "messages": [{"role": "user", "content": secret}], "temperature": 9})  # a 400
    deadline = time.monotonic() + 10
    while True:
        text = LOGS["server"].read_text(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        done = [x for x in lines if x.get("request_id") == "log-trace-7" and x.get("message") == "request done"]
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done, text[-3000:]
    summary = done[0]
    assert summary["status"] == 200 and summary["model"] == MODEL and summary["account"].startswith("acct_")
    assert summary["key_id"] and summary["prompt_tokens"] == 100 and summary["completion_tokens"] == 7
    assert float(summary["cost_usd"]) > 0 and summary["latency_ms"] >= 0
    assert {"time", "level", "logger"} <= set(summary)
    access = [x for x in lines if x.get("request_id") == "log-trace-7" and x.get("logger") == "uvicorn.access"]
    assert access, "uvicorn's access line carries the request id too"
    # The banner (stdout, before the first request) names the key for the operator; no log line does.
    logged = [line for line in text.splitlines() if not line.startswith(("API key:", "try:"))]
    leaks = [line for line in logged if secret in line or KEY in line or UPSTREAM_KEY in line]
    assert not leaks, leaks
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        records = admin.get("/admin/usage/records").json()["data"]
    assert [rec for rec in records if rec["x_request_id"] == "log-trace-7"], "the usage row carries the id"
