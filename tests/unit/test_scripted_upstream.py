"""The scripted V4 upstream (tests/e2e/scripted_v4_upstream.py) writes text flashserve's own parsers read back.

Its streamed `content` goes through the same two stages flashserve's output
path uses for V4 (`ReasoningSplitter`, then `DsmlToolCallParser`), chunk by
chunk, so a change of DSML spelling on either side fails here and not in a
slow agent e2e run. The tools come from the captured first requests of
Claude Code and Codex, so the calls are the ones those agents will see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from flashserve.chat.dsml import DsmlToolCallParser
from flashserve.chat.reasoning import ReasoningSplitter
from tests.e2e.scripted_v4_upstream import DEFAULT_SCRIPT, create_app, example_arguments, load_script

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "agents"

SHELL = {"type": "function", "function": {"name": "shell", "parameters": {
    "type": "object", "required": ["command", "timeout", "login", "env", "args", "mode", "note"],
    "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}, "login": {"type": "boolean"},
                   "env": {"type": "object", "properties": {"HOME": {"type": "string"}}, "required": ["HOME"]},
                   "args": {"type": "array", "items": {"type": "string"}},
                   "mode": {"type": "string", "enum": ["fast", "slow"]}, "note": {"type": ["null", "string"]},
                   "unused": {"type": "string"}}}}}
OTHER = {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}


def claude_code_tools() -> list[dict[str, Any]]:
    body = json.loads((FIXTURES / "claude_code_first_request.json").read_text())["body"]
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t["input_schema"]}}
            for t in body["tools"] if "input_schema" in t]


def codex_tools() -> list[dict[str, Any]]:
    body = json.loads((FIXTURES / "codex_first_request.json").read_text())["body"]
    return [{"type": "function", "function": {"name": t["name"], "parameters": t["parameters"]}}
            for t in body["tools"] if t.get("type") == "function"]


def stream(client: TestClient, body: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The content deltas, and every chunk, of a streamed request."""
    chunks: list[dict[str, Any]] = []
    with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunks.append(json.loads(line[len("data: "):]))
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    return deltas, chunks


def parse(pieces: list[str] | list[bytes], tool_names: list[str]) -> tuple[str, str, list[Any]]:
    """(reasoning, content, calls) as flashserve's V4 output path reads the pieces."""
    splitter, parser = ReasoningSplitter(thinking=True), DsmlToolCallParser(tool_names)
    reasoning, content, calls = [], [], []
    for piece in pieces:
        text = piece.decode() if isinstance(piece, bytes) else piece
        think, answer = splitter.feed(text)
        reasoning.append(think)
        text_out, new_calls = parser.feed(answer)
        content.append(text_out)
        calls.extend(new_calls)
    think, answer = splitter.finish()
    reasoning.append(think)
    text_out, new_calls = parser.feed(answer)
    content += [text_out, parser.finish()]
    return "".join(reasoning), "".join(content), calls + new_calls


@pytest.fixture()
def client() -> TestClient:
    return TestClient(create_app(load_script(None)))


def user_turn(tools: list[dict[str, Any]], text: str = "list the files") -> dict[str, Any]:
    return {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": text}], "tools": tools,
            "stream_options": {"include_usage": True}}


def test_a_user_turn_streams_a_dsml_call_of_the_first_tool_that_the_parser_accepts(client: TestClient) -> None:
    deltas, chunks = stream(client, user_turn([SHELL, OTHER]))
    reasoning, content, calls = parse(deltas, ["shell", "other"])
    assert reasoning == DEFAULT_SCRIPT["user"]["reasoning"]
    assert content == ""
    assert [c.name for c in calls] == ["shell"]
    assert json.loads(calls[0].arguments) == {"command": "ok", "timeout": 1, "login": True, "env": {"HOME": "ok"},
                                              "args": [], "mode": "fast", "note": "ok"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["prompt_tokens"] == usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0


def test_the_stream_cuts_through_dsml_markers_and_still_parses_from_bytes_split_anywhere(client: TestClient) -> None:
    deltas, _ = stream(client, user_turn([SHELL]))
    text = "".join(deltas)
    assert "<｜DSML｜tool_calls>" in text and not any("<｜DSML｜tool_calls>" in d for d in deltas)
    raw = text.encode()
    for size in (1, 2, 3, 5):
        pieces = [raw[i:i + size] for i in range(0, len(raw), size)]
        # ReasoningSplitter takes str: split bytes are decoded where they are whole, as a detokenizer would.
        decoded, pending = [], b""
        for piece in pieces:
            pending += piece
            try:
                decoded.append(pending.decode())
                pending = b""
            except UnicodeDecodeError:
                continue
        _, content, calls = parse(decoded, ["shell"])
        assert content == "" and [c.name for c in calls] == ["shell"]


def test_a_newline_split_from_its_twin_after_think_end_does_not_leak() -> None:
    # It did: ReasoningSplitter stripped the newlines after </think> only within the feed that held the
    # marker, and the DSML parser drops the blank line before a block only when both newlines reach it.
    block = '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="other">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    for pieces in (["Plan.</think>\n", "\n" + block], ["Plan.</think>", "\n", "\n", block],
                   ["Plan.</", "think>\n", "\n" + block]):
        reasoning, content, calls = parse(pieces, ["other"])
        assert [c.name for c in calls] == ["other"]
        assert (reasoning, content) == ("Plan.", "")


def test_a_tool_result_gets_a_final_answer_without_a_call(client: TestClient) -> None:
    body = user_turn([SHELL])
    body["messages"] += [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt b.txt"}]
    deltas, _ = stream(client, body)
    reasoning, content, calls = parse(deltas, ["shell"])
    assert (reasoning, content, calls) == (DEFAULT_SCRIPT["tool"]["reasoning"], DEFAULT_SCRIPT["tool"]["content"], [])


def test_without_tools_it_answers(client: TestClient) -> None:
    deltas, _ = stream(client, user_turn([]))
    assert parse(deltas, [])[1:] == ("ok", [])


@pytest.mark.parametrize(("tools", "first"), [(claude_code_tools, "Agent"), (codex_tools, "exec_command")])
def test_the_agents_real_tools(client: TestClient, tools: Any, first: str) -> None:
    functions = tools()
    deltas, _ = stream(client, user_turn(functions))
    _, content, calls = parse(deltas, [f["function"]["name"] for f in functions])
    assert content == "" and [c.name for c in calls] == [first]
    assert json.loads(calls[0].arguments) == example_arguments(functions[0]["function"]["parameters"])


def test_non_streaming_returns_the_same_raw_text(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=user_turn([SHELL]))
    message = response.json()["choices"][0]["message"]
    assert set(message) == {"role", "content"}
    _, content, calls = parse([message["content"]], ["shell"])
    assert content == "" and [c.name for c in calls] == ["shell"]
    assert response.json()["usage"]["prompt_cache_miss_tokens"] > 0


def test_a_script_picks_the_tool_and_its_arguments(tmp_path: Path) -> None:
    arguments = {"command": "printf 'héllo\\n' && echo \"<done>\"", "timeout": 2.5, "env": {"A": [1, None]}}
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"user": {"reasoning": "Plan: run it.", "content": "Running it.",
                                           "tool": "other", "arguments": arguments}, "chunk_chars": 3}))
    client = TestClient(create_app(load_script(script)))
    deltas, _ = stream(client, user_turn([SHELL, OTHER]))
    reasoning, content, calls = parse(deltas, ["shell", "other"])
    assert (reasoning, content) == ("Plan: run it.", "Running it.")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("other", arguments)]
    assert load_script(script)["tool"] == DEFAULT_SCRIPT["tool"]  # turns not named keep their defaults


def test_a_script_s_calls_pick_the_first_offered_tool_with_its_arguments(tmp_path: Path) -> None:
    """One upstream serves Claude Code (Bash) and Codex (exec_command): whichever the request offers."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"user": {"calls": {"missing": {"x": 1}, "other": {"a": "b"},
                                                     "shell": {"command": "ls"}}}}))
    client = TestClient(create_app(load_script(script)))
    for tools, expected in (([SHELL, OTHER], ("other", {"a": "b"})), ([SHELL], ("shell", {"command": "ls"}))):
        deltas, _ = stream(client, user_turn(tools))
        _, _, calls = parse(deltas, [t["function"]["name"] for t in tools])
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [expected]


def test_a_longer_conversation_reports_its_shared_prefix_as_cache_hits(client: TestClient) -> None:
    first = user_turn([SHELL], text="x" * 2000)
    assert client.post("/v1/chat/completions", json=first).json()["usage"]["prompt_cache_hit_tokens"] == 0
    second = dict(first, messages=first["messages"] + [{"role": "assistant", "content": "y"},
                                                       {"role": "user", "content": "more"}])
    usage = client.post("/v1/chat/completions", json=second).json()["usage"]
    assert usage["prompt_cache_hit_tokens"] > 0 and usage["prompt_cache_hit_tokens"] % 64 == 0


def test_health_models_and_auth() -> None:
    client = TestClient(create_app(load_script(None), key="k"))
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "deepseek-v4-flash"
    assert client.post("/v1/chat/completions", json=user_turn([])).status_code == 401
    ok = client.post("/v1/chat/completions", json=user_turn([]), headers={"authorization": "Bearer k"})
    assert ok.status_code == 200
    assert client.get("/requests").json()[0]["messages"][0]["content"] == "list the files"
