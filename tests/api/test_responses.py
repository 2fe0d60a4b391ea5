"""The Responses API in-process (`api/responses.py`): the response object and its items, the named event
stream (with the openai SDK's stream helper), sealed reasoning (round trip, tamper, foreign account),
namespace tools flattened, hosted tools dropped, stored responses (GET, input_items, DELETE, store: false,
previous_response_id, another account's id), the prefix cache on a continued conversation, errors, and
one usage row per request.

The `agent` model is `tests/api/test_anthropic.py: AgentBackend`: the last user message is a script
(`@think:words`, `@call:Name`, `@length`, `@fail`, words).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from flashserve.api.state import app_state
from flashserve.catalog import make_card
from flashserve.chat.reasoning import ReasoningSpec
from tests.api.conftest import Api
from tests.api.test_anthropic import AgentBackend

pytestmark = pytest.mark.anyio
MODEL = "agent"


@pytest.fixture
def agent(api: Api) -> AgentBackend:
    backend = AgentBackend()
    app_state(api.app).catalog.add(make_card(MODEL, context_length=4096, reasoning=ReasoningSpec(can_think=True),
                                             weights="none", description="agent turns", created=int(time.time())),
                                   backend)
    return backend


async def post(api: Api, body: dict[str, Any], client: httpx.AsyncClient | None = None) -> httpx.Response:
    return await (client or api.client).post("/v1/responses", json={"model": MODEL, **body})


async def stream(api: Api, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The stream's events as (name, data); checks the framing (`event:` = data's type) and the sequence."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with api.client.stream("POST", "/v1/responses", json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = (await r.aread()).decode()
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        name_line, data_line = block.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    assert [d["sequence_number"] for _, d in out] == list(range(len(out)))
    return out


async def test_text_response_shape_usage_and_one_usage_row(api: Api, agent: AgentBackend) -> None:
    account = await api.default_account()
    before = len(await api.records(account))
    r = await post(api, {"input": "Hello there", "instructions": "Be brief.", "metadata": {"k": "v"},
                         "client_metadata": {"x": "ignored"}, "truncation": "disabled", "service_tier": "auto"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    assert body["model"] == MODEL and body["instructions"] == "Be brief." and body["metadata"] == {"k": "v"}
    [message] = body["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "Hello there ", "annotations": []}]
    usage = body["usage"]
    assert usage["input_tokens"] == 20 and usage["output_tokens"] == 2 and usage["total_tokens"] == 22
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert float(r.headers["x-flashserve-cost-usd"]) == pytest.approx(usage["cost"])
    assert agent.last.messages[0].role == "system" and agent.last.messages[0].content == "Be brief."
    records = await api.records(account)
    assert len(records) == before + 1
    assert records[0]["request_id"] == body["id"]


async def test_items_become_one_conversation(api: Api, agent: AgentBackend) -> None:
    r = await post(api, {"input": [
        {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
        {"role": "user", "content": "list files"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "I should call ls"}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "one file"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks"}]},
    ]})
    assert r.status_code == 200, r.text
    got = [(m.role, m.content, m.reasoning_content, [c.name for c in m.tool_calls]) for m in agent.last.messages]
    assert got == [("developer", "dev", None, []), ("user", "list files", None, []),
                   ("assistant", None, "I should call ls", ["shell"]), ("tool", "a.txt", None, []),
                   ("assistant", "one file", None, []), ("user", "thanks", None, [])]


async def test_reasoning_summary_and_sealed_round_trip(api: Api, agent: AgentBackend) -> None:
    first = {"input": "@think:let_me_see answer", "store": False, "include": ["reasoning.encrypted_content"],
             "reasoning": {"summary": "auto"}}
    body = (await post(api, first)).json()
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [{"type": "summary_text", "text": "let me see"}]
    assert reasoning["encrypted_content"] and "let me see" not in reasoning["encrypted_content"]
    assert message["content"][0]["text"] == "answer "
    # Codex's next turn: the earlier items again, our reasoning item verbatim, then a new message.
    turn = [{"role": "user", "content": "@think:let_me_see answer"}, reasoning, message,
            {"role": "user", "content": "more"}]
    r = await post(api, {"input": turn, "store": False})
    assert r.status_code == 200, r.text
    assert agent.last.messages[1].reasoning_content == "let me see"
    tampered = dict(reasoning, encrypted_content=reasoning["encrypted_content"][:-4] + "AAAA")
    r = await post(api, {"input": [turn[0], tampered, message, turn[3]], "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].encrypted_content"
    _, other_key = await api.new_account("other-reasoner")
    r = await post(api, {"input": turn, "store": False}, api.http(other_key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encrypted_content"


async def test_reasoning_without_summary_is_reasoning_text(api: Api, agent: AgentBackend) -> None:
    body = (await post(api, {"input": "@think:hmm ok"})).json()
    assert body["output"][0]["summary"] == []
    assert body["output"][0]["content"] == [{"type": "reasoning_text", "text": "hmm"}]
    assert "encrypted_content" not in body["output"][0]


async def test_namespace_tools_flattened_and_hosted_tools_dropped(api: Api, agent: AgentBackend) -> None:
    tools = [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}, "strict": False},
             {"type": "namespace", "name": "multi_agent_v1", "description": "agents",
              "tools": [{"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}]},
             {"type": "web_search", "external_web_access": False}]
    r = await post(api, {"input": "@call:multi_agent_v1__spawn_agent", "tools": tools, "tool_choice": "auto",
                         "parallel_tool_calls": True})
    assert r.status_code == 200, r.text
    assert r.headers["x-flashserve-dropped-tools"] == "web_search"
    assert [t.name for t in agent.last.tools] == ["exec_command", "multi_agent_v1__spawn_agent"]
    [call] = r.json()["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["status"] == "completed"
    assert (call["namespace"], call["name"], call["call_id"]) == ("multi_agent_v1", "spawn_agent", "call_abc123")
    assert json.loads(call["arguments"]) == {"command": "ls"}
    # Sent back, the call is the flattened name again, answered by its output.
    r = await post(api, {"tools": tools, "input": [{"role": "user", "content": "go"}, call,
                                                   {"type": "function_call_output", "call_id": "call_abc123",
                                                    "output": [{"type": "input_text", "text": "spawned"}]}]})
    assert r.status_code == 200, r.text
    assert agent.last.messages[1].tool_calls[0].name == "multi_agent_v1__spawn_agent"
    assert agent.last.messages[2].content == "spawned"


async def test_text_format_sampling_and_cache_key(api: Api, agent: AgentBackend) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = await post(api, {"input": "x", "text": {"format": {"type": "json_schema", "name": "A", "schema": schema,
                                                            "strict": True}},
                         "temperature": 0.5, "top_p": 0.9, "max_output_tokens": 50, "reasoning": {"effort": "high"},
                         "prompt_cache_key": "session-1", "user": "u1"})
    assert r.status_code == 200, r.text
    gen = agent.last
    assert gen.response_format is not None and gen.response_format.schema == schema and gen.response_format.strict
    assert (gen.sampling.temperature, gen.sampling.top_p, gen.sampling.max_tokens) == (0.5, 0.9, 50)
    assert gen.reasoning.effort == "high" and gen.cache_key == "session-1" and gen.user == "u1"
    assert r.json()["text"]["format"]["type"] == "json_schema"


async def test_max_output_tokens_is_incomplete(api: Api, agent: AgentBackend) -> None:
    body = (await post(api, {"input": "cut short @length", "max_output_tokens": 2})).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400,
     "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400, "input[0].content[0]"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "top_logprobs": 3}, 400, "top_logprobs"),
    ({"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 21}, 400, "top_logprobs"),
    ({"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": -1}, 400, "top_logprobs"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, 400, "input[0].call_id"),
    ({"input": [{"role": "tool", "content": "x"}]}, 400, "input[0].role"),
    ({"input": [{"type": "mystery"}]}, 400, "input[0].type"),
    ({"input": "x", "temperature": "hot"}, 400, "temperature"),
    ({}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [{"type": "reasoning", "summary": 5}]}, 400, "input[0].summary"),
    ({"input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": 3}]}, 400, "tools[0].tools"),
    ({"input": "x", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "web_search"}, "tools": [{"type": "function", "name": "f"}]}, 400,
     "tool_choice"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
])
async def test_bad_requests_are_4xx_naming_the_field(api: Api, agent: AgentBackend, body: dict[str, Any],
                                                     status: int, param: str) -> None:
    account = await api.default_account()
    before = len(await api.records(account))
    r = await post(api, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    assert len(await api.records(account)) == before  # refused before the model: nothing billed


async def test_stored_response_get_input_items_delete(api: Api, agent: AgentBackend) -> None:
    r = await post(api, {"input": [{"role": "user", "content": "first"}, {"role": "user", "content": "keep me"}]})
    body = r.json()
    got = await api.client.get(f"/v1/responses/{body['id']}")
    assert got.status_code == 200 and got.json() == body
    items = (await api.client.get(f"/v1/responses/{body['id']}/input_items", params={"order": "asc"})).json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["first", "keep me"]
    assert items["object"] == "list" and not items["has_more"] and items["first_id"] == items["data"][0]["id"]
    _, other_key = await api.new_account("snoop")
    other = api.http(other_key)
    for method, path in (("GET", ""), ("GET", "/input_items"), ("DELETE", "")):
        r = await other.request(method, f"/v1/responses/{body['id']}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
        assert "keep me" not in r.text
    r = await post(api, {"input": "more", "previous_response_id": body["id"]}, other)
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    deleted = await api.client.delete(f"/v1/responses/{body['id']}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert (await api.client.get(f"/v1/responses/{body['id']}")).status_code == 404


async def test_store_false_keeps_nothing(api: Api, agent: AgentBackend) -> None:
    body = (await post(api, {"input": "secret", "store": False})).json()
    assert body["store"] is False
    assert (await api.client.get(f"/v1/responses/{body['id']}")).status_code == 404


async def test_previous_response_id_continues_with_reasoning_and_calls(api: Api, agent: AgentBackend) -> None:
    first = (await post(api, {"input": "@think:plan @call:shell", "instructions": "only once",
                              "tools": [{"type": "function", "name": "shell"}]})).json()
    call = first["output"][1]
    r = await post(api, {"previous_response_id": first["id"], "tools": [{"type": "function", "name": "shell"}],
                         "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}]})
    assert r.status_code == 200, r.text
    got = [(m.role, m.content, m.reasoning_content, [c.id for c in m.tool_calls]) for m in agent.last.messages]
    assert got == [("user", "@think:plan @call:shell", None, []), ("assistant", None, "plan", ["call_abc123"]),
                   ("tool", "ok", None, [])]  # instructions do not carry over
    assert r.json()["previous_response_id"] == first["id"]


async def test_second_turn_hits_the_prefix_cache(api: Api) -> None:
    """fake-local is the real engine: the continued conversation's prompt starts with the first turn's."""
    first = await api.client.post("/v1/responses", json={"model": "fake-local", "input": "tell me a story about",
                                                         "max_output_tokens": 8})
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["input_tokens_details"]["cached_tokens"] == 0
    second = await api.client.post("/v1/responses", json={"model": "fake-local", "input": "and then?",
                                                          "previous_response_id": first.json()["id"],
                                                          "max_output_tokens": 8})
    assert second.status_code == 200, second.text
    usage = second.json()["usage"]
    assert usage["input_tokens"] > first.json()["usage"]["input_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] > 0


async def test_stream_events(api: Api, agent: AgentBackend) -> None:
    events = await stream(api, {"input": "@think:hm @call:shell done", "reasoning": {"summary": "auto"},
                                "include": ["reasoning.encrypted_content"], "tools": [{"type": "function",
                                                                                       "name": "shell"}]})
    names = [n for n, _ in events]
    assert names == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    final = events[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "function_call", "message"]
    assert final["output"][0]["encrypted_content"] and final["usage"]["output_tokens"] == 3
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    stored = (await api.client.get(f"/v1/responses/{final['id']}")).json()
    assert stored == final


async def test_stream_failure_is_response_failed(api: Api, agent: AgentBackend) -> None:
    account = await api.default_account()
    before = len(await api.records(account))
    events = await stream(api, {"input": "partial @fail"})
    name, data = events[-1]
    assert name == "response.failed" and data["response"]["status"] == "failed"
    assert data["response"]["error"]["code"] == "engine_error"
    assert data["response"]["output"][0]["content"][0]["text"] == "partial "
    records = await api.records(account)
    assert len(records) == before + 1 and records[0]["status"] == "error"


async def test_openai_sdk_create_stream_retrieve_delete(api: Api, agent: AgentBackend) -> None:
    client = api.openai()
    response = await client.responses.create(model=MODEL, input="hi from sdk")
    assert response.output_text == "hi from sdk " and response.usage is not None
    assert (await client.responses.retrieve(response.id)).id == response.id
    async with client.responses.stream(model=MODEL, input="@think:x streamed words",
                                       reasoning={"summary": "auto"}) as s:
        deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
        final = await s.get_final_response()
    assert "".join(deltas) == "streamed words " and final.output_text == "streamed words "
    assert final.output[0].type == "reasoning" and final.output[0].summary[0].text == "x"
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    # A failure mid-stream: the helper ends on response.failed.
    async with client.responses.stream(model=MODEL, input="half @fail") as s:
        kinds = [e.type async for e in s]
    assert kinds[-1] == "response.failed"


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "agents"


def codex_body(name: str) -> dict[str, Any]:
    body = json.loads((FIXTURES / name).read_text())["body"]
    return {**body, "model": MODEL}


async def test_codex_first_request_as_captured(api: Api, agent: AgentBackend) -> None:
    body = codex_body("codex_first_request.json")
    async with api.client.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["x-flashserve-dropped-tools"] == "web_search"
        text = (await r.aread()).decode()
    assert "event: response.completed" in text
    gen = agent.last
    assert [m.role for m in gen.messages] == ["developer", "developer", "user", "user"]
    names = [t.name for t in gen.tools]
    assert len(names) == 12 and "exec_command" in names and "multi_agent_v1__spawn_agent" in names
    assert gen.cache_key == body["prompt_cache_key"] and gen.tool_choice is not None


async def test_codex_tool_turn_as_captured(api: Api, agent: AgentBackend) -> None:
    body = codex_body("codex_tool_turn_request.json")
    # The captured encrypted_content was sealed by the capture server, not us: refused, naming the item.
    r = await post(api, {**body, "stream": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[4].encrypted_content"
    for item in body["input"]:
        item.pop("encrypted_content", None)
    r = await post(api, {**body, "stream": False})
    assert r.status_code == 200, r.text
    *_, assistant, tool = agent.last.messages
    assert assistant.reasoning_content == "The user wants ok. I will run echo." and assistant.tool_calls
    assert tool.role == "tool" and "Output:\nok" in (tool.content or "")


async def test_purge_loop_deletes_expired_responses(api: Api, agent: AgentBackend) -> None:
    from datetime import timedelta

    from flashserve.api.responses import purge_expired_loop

    account = await api.default_account()
    await api.accounts.responses.save(account, "resp_old", {"id": "resp_old"}, [], [], timedelta(seconds=-1))
    task = asyncio.create_task(purge_expired_loop(api.accounts, 0.01))
    try:
        for _ in range(100):
            async with api.accounts.engine.connect() as conn:  # type: ignore[union-attr]
                left = (await conn.execute(sa.text("SELECT count(*) FROM stored_responses"))).scalar()
            if left == 0:
                break
            await asyncio.sleep(0.02)
        assert left == 0
    finally:
        task.cancel()


async def test_same_price_as_chat_completions(api: Api, agent: AgentBackend) -> None:
    chat = await api.client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "@think:a one two"}]})
    resp = await post(api, {"input": "@think:a one two"})
    assert chat.status_code == resp.status_code == 200
    assert chat.headers["x-flashserve-cost-usd"] == resp.headers["x-flashserve-cost-usd"]
    assert chat.json()["usage"]["cost"] == resp.json()["usage"]["cost"] > 0
    records = await api.records(await api.default_account())
    assert records[0]["cost_pusd"] == records[1]["cost_pusd"]


async def test_stream_keepalive_while_waiting(api: Api, agent: AgentBackend) -> None:
    async with api.client.stream("POST", "/v1/responses", json={"model": MODEL, "stream": True,
                                                               "input": "@sleep late"}) as r:
        text = (await r.aread()).decode()
    assert ": keep-alive\n\n" in text and "event: response.completed" in text


async def test_stream_disconnect_records_cancelled(api: Api) -> None:
    account = await api.default_account()
    before = len(await api.records(account))
    async with api.client.stream("POST", "/v1/responses", json={"model": "scripted", "stream": True,
                                                               "input": "one @hold two"}) as r:
        async for line in r.aiter_lines():
            if "output_text.delta" in line:
                break
    await api.transport.idle()
    records = await api.records(account)
    assert len(records) == before + 1 and records[0]["status"] == "cancelled"
    assert api.scripted.generations[-1].aborted


async def test_context_overflow_is_400_context_length_exceeded(api: Api) -> None:
    """Codex reads this code and tells the user it "ran out of room in the model's context window"."""
    r = await api.client.post("/v1/responses", json={"model": "fake-local", "input": "word " * 400})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
