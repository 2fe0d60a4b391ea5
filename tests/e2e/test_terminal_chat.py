"""`flashserve chat` in a pseudo-terminal (pexpect), against the e2e suite's real servers: the question is typed
at the prompt, the answer streams back (the reasoning dimmed), the commands act, `/cost` shows the session's
tokens and cost, and `/exit` (or Ctrl-D) leaves with status 0.

Two servers the suite already runs: the shared scripted one (tests/e2e/scripted.py), whose
deepseek/deepseek-v4-flash always thinks "Easy." and answers "Hello!", so the output is known to the
byte; and the session server with the real embedded model."""

from __future__ import annotations

import os
import re

import pexpect

from tests.e2e.conftest import REPO, Server, _python
from tests.e2e.scripted import AGENT_MODEL, Upstreams

PROMPT = "you> "
DIM = "\x1b[2m"
COST = re.compile(r"session: (\d+) requests; prompt (\d+) tokens \((\d+) cached\), "
                  r"completion (\d+) \((\d+) reasoning\); cost \$(\d+\.\d+)\r?\n")


def spawn(base_url: str, api_key: str, model: str, *options: str) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FLASHSERVE_API_KEY")} | {"TERM": "xterm"}
    child = pexpect.spawn(_python(), ["-m", "flashserve", "chat", "--base-url", base_url, "--api-key", api_key,
                                      "--model", model, *options], cwd=str(REPO), env=env, encoding="utf-8",
                          timeout=120, dimensions=(40, 120))
    child.expect_exact(PROMPT)
    return child


def send(child: pexpect.spawn, line: str) -> str:
    """Types `line`; returns what the chat printed before its next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.split("\n", 1)[1] if "\n" in child.before else ""  # past the echo of the line


def test_a_session_against_the_scripted_model(upstreams: Upstreams) -> None:
    child = spawn(f"{upstreams.base}/v1", upstreams.key, AGENT_MODEL)
    try:
        answer = send(child, "hi")
        assert f"{DIM}Easy." in answer, repr(answer)  # the reasoning, dimmed
        assert answer.rstrip().endswith("Hello!"), repr(answer)

        costs = COST.search(send(child, "/cost"))
        assert costs, child.before
        requests, prompt, _, completion, reasoning, cost = costs.groups()
        assert (int(requests), int(prompt) > 0, int(completion) > 0, int(reasoning) > 0) == (1, True, True, True)
        assert float(cost) > 0

        assert "system prompt: 'Be brief.'" in send(child, "/system Be brief.")
        assert "reasoning effort: high" in send(child, "/effort high")
        assert "JSON mode on" in send(child, "/json")
        assert "JSON mode off" in send(child, "/json")
        assert "conversation cleared" in send(child, "/clear")
        assert "unknown command" in send(child, "/nonsense")
        second = send(child, "hi again")
        assert "Hello!" in second, repr(second)
        sent = upstreams.scripted(AGENT_MODEL).sent()[-1]
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}  # the system prompt went
        assert [m["role"] for m in sent["messages"]] == ["system", "user"]  # /clear forgot the first turn
        assert COST.search(send(child, "/cost")).group(1) == "2"

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_a_session_against_the_embedded_model(server: Server) -> None:
    child = spawn(f"{server.base_url}/v1", server.api_key, "deepseek/deepseek-v4-flash", "--max-tokens", "12")
    try:
        answer = send(child, "What is the capital of France? One word.")
        assert answer.strip(), "no answer streamed"
        requests, prompt, _, completion, _, cost = COST.search(send(child, "/cost")).groups()
        assert int(requests) == 1 and int(prompt) > 0 and int(completion) > 0 and float(cost) > 0
        child.sendeof()  # Ctrl-D leaves too
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
