"""The Responses API end to end, driven by real clients against a real `flashserve serve` process: the
official `openai` SDK (create, stream, retrieve, input_items, delete), the OpenAI Agents SDK running one agent
with one function tool, and Codex itself (`codex exec`), which runs the shell command the model asks for and
takes the answer.

The session's shared server (tests/e2e/scripted.py: `serve_upstreams`) points `deepseek/deepseek-v4-flash`
at the scripted raw-V4 upstream
(tests/e2e/scripted_v4_upstream.py, `raw_text = "deepseek_v4"`): thinking and DSML tool calls are parsed by
flashserve as they would be from a real V4. Codex comes from `tests/agents/node_modules`
(`npm ci --prefix tests/agents`); without it that test skips, saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import REPO
from tests.e2e.scripted import AGENT_ANSWER as ANSWER
from tests.e2e.scripted import AGENT_MODEL as MODEL
from tests.e2e.scripted import KEY, Upstreams
from tests.e2e.scripted import Scripted as Served

NODE_MODULES = REPO / "tests" / "agents" / "node_modules"
# Every tool turn calls `exec_command` (Codex's shell tool; the Agents SDK test's tool has the same name): the
# shared script (tests/e2e/scripted.py: AGENT_SCRIPT) answers it with {"cmd": "echo ok"}.
EXEC = {"type": "function", "name": "exec_command", "description": "Run a shell command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Served:
    return upstreams.scripted(MODEL)


@pytest.fixture
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


# -- the openai SDK ------------------------------------------------------------------------------------------
def test_openai_sdk_create_retrieve_input_items_delete(served: Served, client: openai.OpenAI) -> None:
    before = len(served.records())
    response = client.responses.create(model=MODEL, input="hi", reasoning={"summary": "auto"})
    assert response.status == "completed" and response.output_text == "Hello!"
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Easy."
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    records = served.records()
    assert len(records) == before + 1 and records[0]["model"] == MODEL
    assert client.responses.retrieve(response.id).output_text == "Hello!"
    items = client.responses.input_items.list(response.id)
    assert [i.type for i in items.data] == ["message"]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_openai_sdk_stream_tool_turn_and_continuation(served: Served, client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="run echo ok", tools=[EXEC],  # type: ignore[list-item]
                                 include=["reasoning.encrypted_content"], store=False) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in kinds
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    assert call.type == "function_call" and call.name == "exec_command" and json.loads(call.arguments) == {
        "cmd": "echo ok"}
    # Stateless, as Codex does it: everything again, our sealed reasoning included, plus the tool's output.
    second = client.responses.create(model=MODEL, tools=[EXEC], store=False, input=[  # type: ignore[list-item]
        {"role": "user", "content": "run echo ok"}, reasoning.model_dump(exclude_none=True),
        call.model_dump(exclude_none=True), {"type": "function_call_output", "call_id": call.call_id, "output": "ok"}])
    assert second.output_text == ANSWER
    assistant = next(m for m in served.sent()[-1]["messages"] if m["role"] == "assistant")
    assert "I will run the command." in json.dumps(assistant)  # the sealed reasoning was opened and rendered


# -- the OpenAI Agents SDK -----------------------------------------------------------------------------------
def test_agents_sdk_runs_an_agent_with_a_function_tool(served: Served) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    ran: list[str] = []

    @function_tool
    def exec_command(cmd: str) -> str:
        """Run a shell command and return its output."""
        ran.append(cmd)
        return "ok"

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0) as http:
            agent = Agent(name="shell", instructions="Use the tool.", tools=[exec_command],
                          model=OpenAIResponsesModel(model=MODEL, openai_client=http))
            result = await Runner.run(agent, "run echo ok")
            return str(result.final_output)

    assert asyncio.run(run()) == ANSWER
    assert ran == ["echo ok"]


# -- Codex ---------------------------------------------------------------------------------------------------
CODEX_CONFIG = """
model = "deepseek/deepseek-v4-flash"
model_provider = "flashserve"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
plugins = false

[model_providers.flashserve]
name = "flashserve"
base_url = "{base}/v1"
env_key = "FLASHSERVE_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""


@pytest.mark.skipif(not (NODE_MODULES / ".bin" / "codex").exists(),
                    reason="tests/agents/node_modules is missing: run `npm ci --prefix tests/agents`")
def test_codex_exec_runs_a_tool_and_answers(served: Served, tmp_path: Path) -> None:
    home, cwd = tmp_path / "codex-home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG.format(base=served.base))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CODEX_HOME": str(home), "TERM": "dumb",
           "LANG": "C.UTF-8", "FLASHSERVE_API_KEY": KEY, "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    before = len(served.sent())
    done = subprocess.run([str(NODE_MODULES / ".bin" / "codex"), "exec", "--skip-git-repo-check", "run echo ok"],
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert ANSWER in done.stdout
    sent = served.sent()[before:]
    assert len(sent) >= 2
    results = [m for m in sent[-1]["messages"] if m["role"] == "tool"]
    assert results and "ok" in results[-1]["content"], "the command's output never came back"
    # The first turn's reasoning came back sealed and was rendered again for the second.
    assert "I will run the command." in json.dumps(sent[-1]["messages"])
