"""The Anthropic Messages surface in-process (`api/anthropic.py`): response and event shapes, the usage
mapping, thinking signatures (round trip, tamper, foreign), server tools dropped, `claude-*` names, every
error status in Anthropic's shape, count_tokens, one usage row per request; and the official `anthropic`
SDK against the app through the in-process transport.

`AgentBackend` below plays the request's last user message as a script (like `fakes.py: ScriptedBackend`)
with the outputs an agent turn has: `@think:words_joined` (reasoning), `@call:Name` (a tool call),
`@cached:N` (cached prompt tokens), `@length` (finish on the token budget), `@stop:S` (finish on the stop
sequence S), `@sleep` (0.5 s: keep-alives), `@fail` (in-band error), `@refuse` (503 before anything). It
keeps the last request it received so a test can see what the adapter made of the body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from flashserve.api.state import app_state
from flashserve.catalog import make_card
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.errors import server_error
from flashserve.generation import ChoiceDelta, GenerationRequest, RequestContext, ToolCall, Usage
from tests.api.conftest import API_KEY, BASE, LOCAL_CONTEXT, Api

pytestmark = pytest.mark.anyio
MODEL = "agent"
PROMPT_TOKENS = 20


class AgentGeneration:
    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.usage = Usage(prompt_tokens=PROMPT_TOKENS)
        self.aborted = False

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        reason, stop = "stop", None
        for word in self.script:
            kind, _, arg = word.partition(":")
            delta = None
            if kind == "@think":
                delta = ChoiceDelta(0, reasoning_content=arg.replace("_", " "))
                self.usage.reasoning_tokens += 1
            elif kind == "@call":
                delta = ChoiceDelta(0, tool_calls=[ToolCall("call_abc123", arg, json.dumps({"command": "ls"}))])
                reason = "tool_calls"
            elif kind == "@cached":
                self.usage.cached_tokens = int(arg)
            elif kind == "@length":
                reason = "length"
            elif kind == "@stop":
                stop = arg
            elif kind == "@sleep":
                await asyncio.sleep(0.5)
            elif kind == "@fail":
                raise server_error(500, "The inference engine failed while generating.", "engine_error")
            elif not word.startswith("@"):
                delta = ChoiceDelta(0, word + " ")
            if delta is not None:
                self.usage.completion_tokens += 1
                yield delta
                await asyncio.sleep(0)
        yield ChoiceDelta(0, finish_reason=reason, stop_sequence=stop)

    async def abort(self) -> None:
        self.aborted = True


class AgentBackend:
    name = "agent"
    system_fingerprint = "fp_agent"
    load = 0

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    @property
    def last(self) -> GenerationRequest:
        return self.requests[-1]

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> AgentGeneration:
        self.requests.append(request)
        users = [m for m in request.messages if m.role in ("user", "tool")]
        script = (users[-1].content or "").split() if users and users[-1].role == "user" else ["Done."]
        if "@refuse" in script:
            raise server_error(503, "The server is overloaded; please retry shortly.", "overloaded", retry_after_s=1)
        return AgentGeneration(script)

    async def count_tokens(self, request: GenerationRequest) -> int:
        self.requests.append(request)
        return 1234

    async def abort_all(self) -> int:
        return 0

    def stats(self) -> dict[str, object]:
        return {}

    async def inspect(self) -> dict[str, object]:
        return {}

    async def close(self) -> None:
        pass


@pytest.fixture
def agent(api: Api) -> AgentBackend:
    backend = AgentBackend()
    state = app_state(api.app)
    state.catalog.add(make_card(MODEL, context_length=4096, reasoning=ReasoningSpec(can_think=True),
                                weights="none", description="agent turns", created=int(time.time())), backend)
    state.anthropic_models = {"claude-*": MODEL}
    return backend


def msg(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-opus-5-5", "max_tokens": 1000, "messages": [{"role": "user", "content": content}],
            **extra}


H = {"anthropic-version": "2023-06-01"}


async def post(api: Api, body: dict[str, Any], path: str = "/v1/messages", **kw: Any) -> httpx.Response:
    return await api.client.post(path, json=body, headers={**H, **kw.pop("headers", {})}, **kw)


async def events(api: Api, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The stream's events as (name, data), checking the framing: `event:` then `data:` then a blank line."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with api.client.stream("POST", "/v1/messages", json={**body, "stream": True}, headers=H) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = (await r.aread()).decode()
    for frame in text.split("\n\n"):
        if not frame:
            continue
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        out.append((name_line[7:], data))
    return out


# -- shapes ------------------------------------------------------------------------------------------------
async def test_text_message_shape_usage_and_one_row(api: Api, agent: AgentBackend) -> None:
    r = await post(api, msg("hello there @cached:8"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "claude-opus-5-5"  # echoed, though the catalog model is "agent"
    assert body["content"] == [{"type": "text", "text": "hello there "}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": PROMPT_TOKENS - 8, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 8, "output_tokens": 2}
    assert r.headers["x-flashserve-cost-usd"]
    [row] = await api.records()
    # The message's id is the usage row's (msg_..., no msg- near-duplicate); x-request-id is the HTTP
    # request's own id, also in the row.
    assert body["id"] == row["request_id"] and body["id"].startswith("msg_")
    assert r.headers["x-request-id"] == row["x_request_id"] and not r.headers["x-request-id"].startswith("msg")
    assert row["model"] == MODEL and row["status"] == "ok"
    assert row["prompt_tokens"] == PROMPT_TOKENS and row["cached_tokens"] == 8 and row["completion_tokens"] == 2
    # the reference prices, per token: cache hit, cache miss, output
    assert row["cost_pusd"] == 8 * 2_800 + (PROMPT_TOKENS - 8) * 140_000 + 2 * 280_000


async def test_both_prefixes_and_beta_query(api: Api, agent: AgentBackend) -> None:
    for path in ("/v1/messages?beta=true", "/anthropic/v1/messages"):
        r = await post(api, msg("ok"), path,
                       headers={"anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27"})
        assert r.status_code == 200, r.text
        assert r.json()["content"][0]["text"] == "ok "
    assert len(await api.records()) == 2


async def test_x_api_key_authenticates(api: Api, agent: AgentBackend) -> None:
    async with httpx.AsyncClient(transport=api.transport, base_url=BASE) as c:
        r = await c.post("/v1/messages", json=msg("ok"), headers={**H, "x-api-key": API_KEY})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/messages", json=msg("ok"), headers={**H, "x-api-key": "sk-wrong"})
        assert r.status_code == 401
        assert r.json() == {"type": "error", "error": {"type": "authentication_error",
                                                       "message": r.json()["error"]["message"]}}
        r = await c.post("/v1/messages", json=msg("ok"), headers=H)
        assert r.status_code == 401
        message = r.json()["error"]["message"]  # a missing key: both headers named, as either is accepted
        assert "x-api-key" in message and "Authorization" in message


async def test_thinking_and_tool_use_blocks(api: Api, agent: AgentBackend) -> None:
    tools = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]
    r = await post(api, msg("@think:let_me_look @call:Bash", tools=tools,
                            thinking={"type": "enabled", "budget_tokens": 2048}))
    body = r.json()
    thinking, call = body["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "let me look"
    assert thinking["signature"].startswith("fs1.")
    assert call == {"type": "tool_use", "id": "toolu_abc123", "name": "Bash", "input": {"command": "ls"}}
    assert body["stop_reason"] == "tool_use"
    assert agent.last.reasoning.thinking is True and agent.last.reasoning.budget_tokens == 2048


async def test_max_tokens_stop_reason(api: Api, agent: AgentBackend) -> None:
    assert (await post(api, msg("a b @length"))).json()["stop_reason"] == "max_tokens"


async def test_stop_sequence_names_the_match(api: Api, agent: AgentBackend) -> None:
    body = (await post(api, msg("a @stop:END", stop_sequences=["STOP", "END"]))).json()
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "END")
    got = await events(api, msg("a @stop:END", stop_sequences=["END"]))
    assert got[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


async def test_stop_sequence_from_the_local_engine(api: Api) -> None:
    # fake-local's CountingModel writes consecutive characters: stop on one it will write, and on another
    first = (await post(api, {**msg("go"), "model": "fake-local", "max_tokens": 40})).json()["content"][0]["text"]
    stop = first[5:7]
    body = (await post(api, {**msg("go"), "model": "fake-local", "max_tokens": 40,
                             "stop_sequences": ["@@never", stop]})).json()
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", stop)
    assert body["content"][0]["text"] == first[:first.index(stop)]


# -- thinking signatures -----------------------------------------------------------------------------------
async def test_omitted_thinking_round_trips_through_the_signature(api: Api, agent: AgentBackend) -> None:
    tools = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]
    first = msg("@think:secret_plan @call:Bash", tools=tools, thinking={"type": "adaptive", "display": "omitted"})
    answer = (await post(api, first)).json()
    thinking = answer["content"][0]
    assert thinking["thinking"] == "" and thinking["signature"]
    assert answer["usage"]["output_tokens"] == 2  # the hidden thinking is billed as output too
    assert (await api.records())[0]["completion_tokens"] == 2
    second = {**first, "messages": [first["messages"][0], {"role": "assistant", "content": answer["content"]},
                                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_abc123",
                                                                  "content": "ok", "is_error": False}]}]}
    r = await post(api, second)
    assert r.status_code == 200, r.text
    assistant = [m for m in agent.last.messages if m.role == "assistant"][0]
    assert assistant.reasoning_content == "secret plan"
    assert assistant.tool_calls[0].id == "toolu_abc123" and json.loads(assistant.tool_calls[0].arguments) == {
        "command": "ls"}
    assert agent.last.messages[-1].role == "tool" and agent.last.messages[-1].content == "ok"
    assert agent.last.messages[-1].tool_call_id == "toolu_abc123"
    assert r.json()["content"] == [{"type": "text", "text": "Done. "}]

    # changed by one character: refused
    sig = thinking["signature"]
    tampered = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    answer["content"][0]["signature"] = tampered
    r = await post(api, second)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "sealed reasoning" in r.json()["error"]["message"]

    # another issuer's signature (real Claude's) or none: the block is dropped, the turn goes on
    for foreign in ("EqQBCkgIARABGAIiQL2+/abc==", None):
        answer["content"][0] = {"type": "thinking", "thinking": "from elsewhere", "signature": foreign}
        r = await post(api, second)
        assert r.status_code == 200, r.text
        assert [m for m in agent.last.messages if m.role == "assistant"][0].reasoning_content is None


async def test_signature_is_bound_to_the_account(api: Api, agent: AgentBackend) -> None:
    answer = (await post(api, msg("@think:mine hi"))).json()
    _, other_key = await api.new_account("other")
    body = {**msg("x"), "messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": answer["content"]},
                                     {"role": "user", "content": "again"}]}
    r = await api.http(other_key).post("/v1/messages", json=body, headers=H)
    assert r.status_code == 400 and r.json()["type"] == "error"


async def test_clear_thinking_keeps_the_last_turns_asked(api: Api, agent: AgentBackend) -> None:
    turns = []
    for word in ("one", "two", "three"):
        answer = (await post(api, msg(f"@think:{word} ok"))).json()
        turns += [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer["content"]}]
    turns.append({"role": "user", "content": "last"})

    async def reasoning(edits: list[dict[str, Any]] | None) -> list[str | None]:
        body = {**msg("x"), "messages": turns}
        if edits is not None:
            body["context_management"] = {"edits": edits}
        assert (await post(api, body)).status_code == 200
        return [m.reasoning_content for m in agent.last.messages if m.role == "assistant"]

    assert await reasoning(None) == ["one", "two", "three"]
    assert await reasoning([{"type": "clear_thinking_20251015", "keep": "all"}]) == ["one", "two", "three"]
    assert await reasoning([{"type": "clear_thinking_20251015",
                             "keep": {"type": "thinking_turns", "value": 2}}]) == [None, "two", "three"]
    assert await reasoning([{"type": "clear_thinking_20251015"}]) == [None, None, "three"]


# -- the request as the backend sees it --------------------------------------------------------------------
async def test_system_billing_header_role_system_and_fields(api: Api, agent: AgentBackend) -> None:
    body = msg([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
               system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.9a2;"},
                       {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
               temperature=0.5, top_p=0.9, top_k=40, stop_sequences=["END"], metadata={"user_id": "u-1"},
               output_config={"effort": "max"}, thinking={"type": "adaptive"})
    body["messages"].append({"role": "system", "content": [{"type": "text", "text": "Env: linux"}],
                             "output_config": {"effort": "medium"}})
    r = await post(api, body, headers={"x-claude-code-session-id": "sess-1"})
    assert r.status_code == 200, r.text
    gen = agent.last
    assert gen.model == MODEL
    assert gen.messages[0].role == "system" and gen.messages[0].content == "You are an agent.\n\nEnv: linux"
    assert [m.role for m in gen.messages] == ["system", "user"]
    s = gen.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.stop) == (0.5, 0.9, 40, 1000, ("END",))
    assert gen.user == "u-1" and gen.cache_key == "sess-1"
    # per-turn control: the last message's output_config wins over the request's
    assert gen.reasoning.effort == "medium" and gen.reasoning.thinking is True
    r = await post(api, msg("x", output_config={"effort": "max"}, thinking={"type": "adaptive"}))
    assert r.status_code == 200
    assert agent.last.reasoning.effort == "max"
    bad = msg("x")
    bad["messages"][0]["output_config"] = {"effort": "huge"}
    r = await post(api, bad)
    assert r.status_code == 400 and "output_config" in r.json()["error"]["message"]

    assert (await post(api, msg("x", thinking={"type": "disabled"}))).status_code == 200
    assert agent.last.reasoning.thinking is False and agent.last.reasoning.effort == "none"


async def test_server_tools_dropped_and_named(api: Api, agent: AgentBackend) -> None:
    tools = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"},
              "cache_control": {"type": "ephemeral"}, "defer_loading": True},
             {"type": "custom", "name": "Edit", "input_schema": {"type": "object"}},
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
             {"type": "text_editor_20250124", "name": "str_replace_editor"}]
    r = await post(api, msg("ok", tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True}))
    assert r.status_code == 200, r.text
    assert r.headers["x-flashserve-dropped-tools"] == "web_search, str_replace_editor"
    assert [t.name for t in agent.last.tools] == ["Bash", "Edit"]
    assert agent.last.tool_choice is not None and agent.last.tool_choice.mode == "required"
    assert agent.last.parallel_tool_calls is False
    await post(api, msg("ok", tools=tools[:1], tool_choice={"type": "tool", "name": "Bash"}))
    assert agent.last.tool_choice is not None and (agent.last.tool_choice.mode, agent.last.tool_choice.name) == (
        "named", "Bash")


# -- streaming ---------------------------------------------------------------------------------------------
async def test_stream_events_in_order(api: Api, agent: AgentBackend) -> None:
    tools = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]
    got = await events(api, msg("@think:plan_it @cached:4 Running it @call:Bash", tools=tools,
                                thinking={"type": "adaptive"}))
    names = [n for n, _ in got]
    assert names == ["message_start",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    start = got[0][1]["message"]
    assert start["id"].startswith("msg_") and start["model"] == "claude-opus-5-5" and start["content"] == []
    assert start["stop_reason"] is None
    assert got[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert got[2][1]["delta"] == {"type": "thinking_delta", "thinking": "plan it"}
    assert got[3][1]["delta"]["type"] == "signature_delta" and got[3][1]["delta"]["signature"].startswith("fs1.")
    assert got[5][1]["content_block"] == {"type": "text", "text": ""} and got[5][1]["index"] == 1
    assert "".join(d["delta"]["text"] for n, d in got[6:8]) == "Running it "
    assert got[9][1]["content_block"] == {"type": "tool_use", "id": "toolu_abc123", "name": "Bash", "input": {}}
    assert json.loads(got[10][1]["delta"]["partial_json"]) == {"command": "ls"}
    delta = got[12][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": PROMPT_TOKENS - 4, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 4, "output_tokens": 4}
    [row] = await api.records()
    assert row["status"] == "ok" and row["completion_tokens"] == 4


async def test_stream_pings_and_omitted_thinking(api: Api, agent: AgentBackend) -> None:
    got = await events(api, msg("@think:hidden @sleep done", thinking={"type": "adaptive", "display": "omitted"}))
    names = [n for n, _ in got]
    assert "ping" in names
    assert not any(d.get("delta", {}).get("type") == "thinking_delta" for _, d in got)
    assert any(d.get("delta", {}).get("type") == "signature_delta" for _, d in got)


async def test_error_after_the_stream_began_is_an_error_event(api: Api, agent: AgentBackend) -> None:
    got = await events(api, msg("partial @fail"))
    failed = {"type": "api_error", "message": "The inference engine failed while generating."}
    assert got[-1] == ("error", {"type": "error", "error": failed})
    [row] = await api.records()
    assert row["status"] == "error"


# -- errors ------------------------------------------------------------------------------------------------
def assert_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}
    return str(body["error"]["message"])


async def test_validation_errors_are_400_naming_the_field(api: Api, agent: AgentBackend) -> None:
    body = msg("hi")
    del body["max_tokens"]
    assert "max_tokens" in assert_error(await post(api, body), 400, "invalid_request_error")
    assert "messages[0].content[0]" in assert_error(
        await post(api, msg([{"type": "tool_use", "name": "x"}])), 400, "invalid_request_error")
    assert "thinking" in assert_error(await post(api, msg("x", thinking={"type": "enabled"})), 400,
                                      "invalid_request_error")
    r = await api.client.post("/v1/messages", content=b"{not json", headers={**H, "content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error")
    assert_error(await post(api, msg("x", temperature=1.5)), 400, "invalid_request_error")


async def test_images_and_documents_are_refused(api: Api, agent: AgentBackend) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
    message = assert_error(await post(api, msg([{"type": "text", "text": "what is it"}, image])), 400,
                           "invalid_request_error")
    assert "image" in message
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [doc]}
    assert "document" in assert_error(await post(api, msg([result])), 400, "invalid_request_error")
    assert await api.records() == []


async def test_a_failure_before_any_byte_is_a_500_api_error(api: Api, agent: AgentBackend) -> None:
    assert_error(await post(api, msg("partial @fail")), 500, "api_error")
    [row] = await api.records()
    assert row["status"] == "error"


async def test_count_tokens_for_the_scripted_backend(api: Api) -> None:
    r = await api.client.post("/v1/messages/count_tokens", headers=H, json={
        "model": "scripted", "messages": [{"role": "user", "content": "three words here"}]})
    assert r.json() == {"input_tokens": 3}


async def test_auth_model_and_overload_errors(api: Api, agent: AgentBackend) -> None:
    async with httpx.AsyncClient(transport=api.transport, base_url=BASE) as c:
        assert_error(await c.post("/v1/messages", json=msg("x"), headers=H), 401, "authentication_error")
    assert "gpt-5" in assert_error(await post(api, {**msg("x"), "model": "gpt-5"}), 404, "not_found_error")
    r = await post(api, msg("@refuse"))
    assert_error(r, 529, "overloaded_error")
    assert r.headers["retry-after"] == "1"
    assert await api.records() == []


async def test_billing_and_rate_limit_errors(api: Api, agent: AgentBackend) -> None:
    _, broke = await api.new_account("broke", balance_usd="0")
    r = await api.http(broke).post("/v1/messages", json=msg("x"), headers=H)
    assert_error(r, 402, "billing_error")
    _, limited = await api.new_account("limited", rpm=1)
    c = api.http(limited)
    assert (await c.post("/v1/messages", json=msg("x"), headers=H)).status_code == 200
    assert_error(await c.post("/v1/messages", json=msg("x"), headers=H), 429, "rate_limit_error")


async def test_body_too_large_and_draining(api: Api, agent: AgentBackend) -> None:
    state = app_state(api.app)
    state.max_body_bytes = 1000
    assert_error(await post(api, msg("x" * 2000)), 413, "request_too_large")
    state.max_body_bytes = 8 << 20
    state.draining = True
    try:
        assert_error(await post(api, msg("x")), 529, "overloaded_error")
        r = await api.client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 503 and "error" in r.json() and "type" not in r.json()  # OpenAI's shape there
    finally:
        state.draining = False


async def test_context_overflow_reads_as_prompt_too_long(api: Api) -> None:
    r = await post(api, {**msg("y" * (LOCAL_CONTEXT + 50)), "model": "fake-local"})
    message = assert_error(r, 400, "invalid_request_error")
    assert message.startswith("prompt is too long: ") and message.endswith(f"tokens > {LOCAL_CONTEXT} maximum")


async def test_unknown_route_under_the_prefix_is_anthropic_shaped(api: Api) -> None:
    assert_error(await api.client.post("/anthropic/v1/nothing", json={}), 404, "not_found_error")


# -- count_tokens ------------------------------------------------------------------------------------------
async def test_count_tokens_is_free_and_needs_a_key(api: Api, agent: AgentBackend) -> None:
    body = {"model": "claude-sonnet-5", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    for path in ("/v1/messages/count_tokens", "/anthropic/v1/messages/count_tokens?beta=true"):
        r = await api.client.post(path, json=body, headers=H)
        assert r.status_code == 200, r.text
        assert r.json() == {"input_tokens": 1234}
        assert r.headers["x-flashserve-dropped-tools"] == "web_search"
    assert agent.last.model == MODEL and agent.last.tools == ()
    assert await api.records() == []
    async with httpx.AsyncClient(transport=api.transport, base_url=BASE) as c:
        assert_error(await c.post("/v1/messages/count_tokens", json=body, headers=H), 401, "authentication_error")


async def test_count_tokens_is_exact_for_the_local_engine(api: Api) -> None:
    body = {"model": "fake-local", "system": "be brief", "messages": [{"role": "user", "content": "count these"}]}
    r = await api.client.post("/v1/messages/count_tokens", json=body, headers=H)
    assert r.status_code == 200, r.text
    counted = r.json()["input_tokens"]
    usage = (await post(api, {**body, "max_tokens": 2})).json()["usage"]
    assert counted == usage["input_tokens"] + usage["cache_read_input_tokens"] > 0


async def test_count_tokens_remote_and_router_estimate(api: Api) -> None:
    for model in ("remote", "routed"):
        body = {"model": model, "messages": [{"role": "user", "content": "x" * 400}]}
        r = await api.client.post("/v1/messages/count_tokens", json=body, headers=H)
        assert r.status_code == 200, r.text
        assert 100 <= r.json()["input_tokens"] < 150
    assert api.upstreams["up-a"].seen == []  # an estimate: nothing sent upstream


# -- the official SDK through the in-process transport -------------------------------------------------------
async def test_anthropic_sdk(api: Api, agent: AgentBackend) -> None:
    # anthropic 2.x runs on httpx2: its own ASGI transport (it buffers each response; the events still parse)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api.app)) as http:
        client = anthropic.AsyncAnthropic(base_url=BASE, api_key=API_KEY, http_client=http, max_retries=0)
        tools = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]
        message = await client.messages.create(model="claude-haiku-5", max_tokens=100, tools=tools,
                                               messages=[{"role": "user", "content": "@think:hm @call:Bash"}],
                                               thinking={"type": "enabled", "budget_tokens": 1024})
        assert [b.type for b in message.content] == ["thinking", "tool_use"]
        assert message.content[1].input == {"command": "ls"} and message.stop_reason == "tool_use"
        async with client.messages.stream(model="claude-haiku-5", max_tokens=100,
                                          messages=[{"role": "user", "content": "streamed words"}]) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "streamed words " and final.usage.output_tokens == 2
        count = await client.messages.count_tokens(model="claude-haiku-5",
                                                   messages=[{"role": "user", "content": "hi"}])
        assert count.input_tokens == 1234
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="claude-x", max_tokens=5, messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/i.png"}}]}])
        bad = anthropic.AsyncAnthropic(base_url=BASE, api_key="sk-wrong", http_client=http, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
