"""Tool calls through the real server: constrained calls under required/named, free choice under auto,
none, parallel_tool_calls, streaming deltas, and continuing a conversation with tool results."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

MODEL = "deepseek/deepseek-v4-flash"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                   "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris right now?"}]


def check_calls(message: object, finish_reason: str) -> list:
    calls = message.tool_calls or []
    assert finish_reason in ("tool_calls", "length")
    if finish_reason == "tool_calls":
        assert calls, "finish_reason tool_calls without calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return calls


def test_required_calls_validate_against_the_parameters(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=64)
    calls = check_calls(r.choices[0].message, r.choices[0].finish_reason)
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert r.choices[0].message.content is None


def test_named_choice_calls_that_function(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=64,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = check_calls(r.choices[0].message, r.choices[0].finish_reason)
    assert [c.function.name for c in calls] == ["get_time"]


def test_sampled_required_calls_always_validate(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=96)
        calls = check_calls(r.choices[0].message, r.choices[0].finish_reason)
        assert 1 <= len(calls) <= 4


def test_none_never_returns_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=24)
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


def test_auto_answers_in_text_or_with_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                           max_tokens=48)
        choice = r.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message, choice.finish_reason)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_streamed_calls_match_the_non_streamed_ones(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=0, max_tokens=64)
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert entry["id"] is None, "the id comes once, first"
                    entry["id"], entry["name"] = d.id, d.function.name
                else:
                    assert entry["id"] is not None, "arguments come after the id and name"
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in plain]


def test_conversation_continues_with_tool_results(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=64)
    message = first.choices[0].message
    history = [*ASK, message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}
                for call in message.tool_calls]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=32)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_unusable_parameters_schema_is_a_400(http: httpx.Client) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                        "properties": {"x": {"type": "nonsense"}}}}}
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": [bad],
                                                "tool_choice": "required", "max_tokens": 8})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"


@pytest.mark.parametrize("stream", [False, True])
def test_usage_is_charged_for_tool_calls(http: httpx.Client, stream: bool) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                                                "tool_choice": "required", "parallel_tool_calls": False,
                                                "max_tokens": 64, "temperature": 0, "stream": stream,
                                                **({"stream_options": {"include_usage": True}} if stream else {})})
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        usage = events[-1]["usage"]
    else:
        usage = r.json()["usage"]
    assert usage["completion_tokens"] > 0 and usage["cost"] > 0


def test_mixed_batch_of_tools_json_and_free_text(client: openai.OpenAI) -> None:
    """Constrained (tools, JSON) and free requests share batches; each still comes out right."""
    from concurrent.futures import ThreadPoolExecutor

    free_kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                   temperature=0, max_tokens=16)
    alone = client.chat.completions.create(**free_kw).choices[0].message.content
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
    jobs = [
        lambda: ("free", client.chat.completions.create(**free_kw)),
        lambda: ("tool", client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                        parallel_tool_calls=False, temperature=0, max_tokens=64)),
        lambda: ("json", client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a city as JSON."}], temperature=0, max_tokens=48,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})),
        lambda: ("free", client.chat.completions.create(**free_kw)),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    for kind, r in results:
        choice = r.choices[0]
        if kind == "free":
            assert choice.message.content == alone
        elif kind == "tool":
            assert len(check_calls(choice.message, choice.finish_reason)) == 1
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
