"""The Anthropic Messages API end to end, driven by the real clients: the official `anthropic` Python SDK,
the pinned `@anthropic-ai/sdk` Node SDK, and Claude Code itself (`claude -p`), each against a real
`flashserve serve` process (the session's shared one, tests/e2e/scripted.py: `serve_upstreams`).

flashserve's catalog points `deepseek/deepseek-v4-flash` (what every `claude-*` name maps to by default) at
the scripted raw-V4 upstream (tests/e2e/scripted_v4_upstream.py, `raw_text = "deepseek_v4"`), so thinking,
DSML tool calls and the answer after a tool result are parsed by flashserve as they would be from a real
V4, and an agent turn runs in seconds. The Node SDK and Claude Code come from `tests/agents/node_modules`
(`npm ci --prefix tests/agents`, which `make test` runs); without it those tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.e2e.conftest import REPO
from tests.e2e.scripted import AGENT_MODEL, KEY, UPSTREAM_MODELS, Upstreams
from tests.e2e.scripted import Scripted as Served

AGENTS = REPO / "tests" / "agents"
NODE_MODULES = AGENTS / "node_modules"
BASH = {"name": "Bash", "description": "Run a shell command",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
needs_node = pytest.mark.skipif(not NODE_MODULES.is_dir(),
                                reason="tests/agents/node_modules is missing: run `npm ci --prefix tests/agents`")


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Served:
    return upstreams.scripted(AGENT_MODEL)


@pytest.fixture
def client(served: Served) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=served.base, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


# -- the Python SDK ------------------------------------------------------------------------------------------
def test_python_sdk_create(served: Served, client: anthropic.Anthropic) -> None:
    before = len(served.records())
    # anthropic 2.x has no sampling arguments: they go in extra_body, as the body's own fields
    message = client.messages.create(model="claude-opus-5-5", max_tokens=200,
                                     messages=[{"role": "user", "content": "hi"}],
                                     extra_body={"temperature": 0.5, "top_k": 7})
    assert message.model == "claude-opus-5-5" and message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Easy." and message.content[0].signature
    assert message.content[1].text == "Hello!" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    sent = served.sent()[-1]
    assert sent["temperature"] == 0.5 and sent["top_k"] == 7 and sent["max_tokens"] == 200
    records = served.records()
    assert len(records) == before + 1 and records[0]["model"] == "deepseek/deepseek-v4-flash"


def test_python_sdk_stream_tool_turn_and_thinking_round_trip(served: Served, client: anthropic.Anthropic) -> None:
    question = {"role": "user", "content": "run echo ok"}
    with client.messages.stream(model="claude-opus-5-5", max_tokens=500, tools=[BASH], messages=[question],
                                thinking={"type": "adaptive", "display": "omitted"}) as stream:
        types = [event.type for event in stream]
        first = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert first.stop_reason == "tool_use"
    thinking, call = first.content
    assert thinking.type == "thinking" and thinking.thinking == "" and thinking.signature
    assert call.type == "tool_use" and call.name == "Bash" and call.input == {"command": "echo ok"}
    assert call.id.startswith("toolu_")

    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "ok"}]}
    second = client.messages.create(model="claude-opus-5-5", max_tokens=500, tools=[BASH],
                                    thinking={"type": "adaptive", "display": "omitted"},
                                    messages=[question, {"role": "assistant", "content": first.content}, result])
    assert second.content[-1].text == "Done: the command printed ok." and second.stop_reason == "end_turn"
    sent = served.sent()[-1]["messages"]
    assistant = next(m for m in sent if m["role"] == "assistant")
    assert assistant["reasoning_content"] == "I will run the command."  # restored from the signature
    assert sent[-1] == {"role": "tool", "content": "ok", "tool_call_id": call.id}


def test_python_sdk_count_tokens_and_errors(served: Served, client: anthropic.Anthropic) -> None:
    before = len(served.records())
    count = client.messages.count_tokens(model="claude-opus-5-5", tools=[BASH],
                                         messages=[{"role": "user", "content": "hello " * 100}])
    assert 100 < count.input_tokens < 400
    assert len(served.records()) == before  # free
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="claude-opus-5-5", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with anthropic.Anthropic(base_url=served.base, api_key="sk-wrong", max_retries=0) as bad, \
            pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="claude-opus-5-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])


# -- the Node SDK --------------------------------------------------------------------------------------------
@needs_node
def test_node_sdk_streaming(served: Served) -> None:
    env = dict(os.environ, FLASHSERVE_BASE_URL=served.base, FLASHSERVE_API_KEY=KEY)
    done = subprocess.run(["node", str(AGENTS / "anthropic_stream.mjs")], cwd=AGENTS, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["events"][0] == "message_start" and out["events"][-1] == "message_stop"
    assert "content_block_delta" in out["events"]
    assert out["text"] == "Hello!"
    assert [b["type"] for b in out["message"]["content"]] == ["thinking", "text"]
    assert out["message"]["stop_reason"] == "end_turn"


# -- Claude Code ---------------------------------------------------------------------------------------------
def claude_code_env(home: Path, base: str) -> dict[str, str]:
    """Offline and non-interactive, as tests/fixtures/agents/README.md describes."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb", "LANG": "C.UTF-8",
            "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1", "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@needs_node
def test_claude_code_runs_a_tool_and_answers(served: Served, tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    before = len(served.sent())
    done = subprocess.run([str(NODE_MODULES / ".bin" / "claude"), "-p", "run echo ok",
                           "--allowedTools", "Bash(echo ok)"], cwd=cwd, env=claude_code_env(home, served.base),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Done: the command printed ok." in done.stdout
    sent = served.sent()[before:]
    results = [m for body in sent for m in body["messages"] if m["role"] == "tool"]
    assert any("ok" in (m.get("content") or "") for m in results), "the tool's result never came back"
    system = sent[0]["messages"][0]
    assert system["role"] == "system" and "x-anthropic-billing-header" not in system["content"]


@needs_node
def test_claude_code_understands_a_context_overflow(served: Served, tmp_path: Path) -> None:
    """The embedded model's small context cannot hold Claude Code's ~12k-token first request: the 400 reads
    'prompt is too long: N tokens > M maximum', which Claude Code explains instead of retrying."""
    embedded = next(m for m in httpx.get(f"{served.base}/health", timeout=10).json()["models"]
                    if m not in UPSTREAM_MODELS)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {**claude_code_env(home, served.base), "ANTHROPIC_MODEL": embedded}
    done = subprocess.run([str(NODE_MODULES / ".bin" / "claude"), "-p", "say ok"], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 1
    assert "Prompt is too long" in done.stdout + done.stderr, f"stdout: {done.stdout}\nstderr: {done.stderr}"
