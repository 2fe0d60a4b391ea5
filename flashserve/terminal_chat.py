"""`flashserve chat`: an interactive chat in the terminal against a running server.

It speaks OpenAI chat completions over httpx to any compatible server (flashserve by default, at
http://127.0.0.1:8000/v1), streams each answer as it comes (the reasoning dimmed, then the answer), and keeps
the conversation. Lines starting with `/` are commands:

    /system TEXT   set the system prompt (`/system` alone removes it)
    /effort NAME   reasoning_effort for the next turns: none, low, medium, high, xhigh, max, ultra
                   (`/effort` alone: the model's default)
    /json          toggle JSON mode (response_format json_object)
    /clear         forget the conversation (the system prompt stays)
    /cost          the session's requests, tokens and cost, from each answer's usage
    /help          this list
    /exit          leave (so do Ctrl-D and /quit)

Ctrl-C while an answer streams stops that answer; the line history (arrow keys) comes from Python's
`readline` where the platform has it. Nothing here imports the engine: it is a client only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MODEL = "deepseek/deepseek-v4-flash"
DIM, RESET, RED = "\x1b[2m", "\x1b[0m", "\x1b[31m"
PROMPT = "you> "
# The command list of the docstring above (absent under `python -OO`, which strips docstrings).
HELP = ((__doc__ or "").partition("are commands:\n\n")[2].partition("\n\nCtrl-C")[0]
        or "/system TEXT, /effort NAME, /json, /clear, /cost, /help, /exit")


@dataclass
class Spend:
    """What the session has used so far, summed over the answers' usage objects."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    priced: bool = True  # every answer so far reported its cost

    def add(self, usage: dict[str, Any]) -> None:
        self.requests += 1
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.reasoning_tokens += int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        if isinstance(usage.get("cost"), int | float):
            self.cost_usd += Decimal(str(usage["cost"]))
        else:
            self.priced = False

    def summary(self) -> str:
        cost = f"${self.cost_usd:f}" if self.priced else f"${self.cost_usd:f} (some answers reported no cost)"
        return (f"{self.requests} requests; prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached), "
                f"completion {self.completion_tokens} ({self.reasoning_tokens} reasoning); cost {cost}")


@dataclass
class TerminalChat:
    """One chat session: the conversation, its settings, and what it has spent."""

    client: httpx.Client  # base_url = the API's /v1, Authorization set
    model: str
    out: TextIO = sys.stdout
    color: bool = False
    system: str | None = None
    effort: str | None = None
    json_mode: bool = False
    max_tokens: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    spend: Spend = field(default_factory=Spend)

    # -- commands -------------------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Acts on one input line; returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/system":
            self.system = argument or None
            self.say(f"system prompt: {self.system!r}" if self.system else "system prompt removed")
        elif command == "/effort":
            self.effort = argument or None
            self.say(f"reasoning effort: {self.effort or 'the model default'}")
        elif command == "/json":
            self.json_mode = not self.json_mode
            self.say(f"JSON mode {'on' if self.json_mode else 'off'}")
        elif command == "/clear":
            self.history.clear()
            self.say("conversation cleared")
        elif command == "/cost":
            self.say(f"session: {self.spend.summary()}")
        elif command == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {command}; /help lists them", error=True)
        return True

    def say(self, text: str, error: bool = False) -> None:
        if error and self.color:
            text = f"{RED}{text}{RESET}"
        self.out.write(text + "\n")
        self.out.flush()

    # -- one turn -------------------------------------------------------------------------------------------
    def request_body(self, text: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": [*messages, *self.history,
                                                                   {"role": "user", "content": text}],
                                "stream": True, "stream_options": {"include_usage": True}}
        if self.effort:
            body["reasoning_effort"] = self.effort
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def ask(self, text: str) -> None:
        """Streams the answer to `text`; the turn joins the history only if the answer came whole."""
        answer, usage = [], None
        try:
            with self.client.stream("POST", "/chat/completions", json=self.request_body(text)) as response:
                if response.status_code != 200:
                    response.read()
                    self.say(f"error {response.status_code}: {_error_message(response)}", error=True)
                    return
                in_reasoning = False
                for chunk in _sse_chunks(response):
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if reasoning := delta.get("reasoning_content"):
                            if not in_reasoning and self.color:
                                self.out.write(DIM)
                            in_reasoning = True
                            self.out.write(reasoning)
                        if content := delta.get("content"):
                            if in_reasoning:
                                self.out.write(RESET + "\n" if self.color else "\n")
                                in_reasoning = False
                            answer.append(content)
                            self.out.write(content)
                        self.out.flush()
                if in_reasoning and self.color:
                    self.out.write(RESET)
        except KeyboardInterrupt:
            self.say("\n[stopped]")
            return
        except httpx.HTTPError as exc:
            self.say(f"\nrequest failed: {exc}", error=True)
            return
        finally:
            if usage is not None:
                self.spend.add(usage)
        self.out.write("\n")
        self.out.flush()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]


def _sse_chunks(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        payload = json.loads(line[len("data: "):])
        if "error" in payload:  # an error event ends the stream
            raise httpx.HTTPError(str(payload["error"].get("message") or payload["error"]))
        yield payload


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return str(error.get("message") or error)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:500]


# -- the loop -----------------------------------------------------------------------------------------------------
def run(base_url: str | None = None, api_key: str | None = None, model: str | None = None,
        max_tokens: int | None = None) -> int:
    """The interactive loop on stdin/stdout; returns the exit status."""
    with contextlib.suppress(ImportError):  # not on every platform; the chat works without it
        import readline  # noqa: F401 - imported for its side effect: input() gets line editing and history
    base = (base_url or os.environ.get("FLASHSERVE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    key = api_key or os.environ.get("FLASHSERVE_API_KEY") or ""
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(600, connect=10)
                      ) as client:
        chat = TerminalChat(client, model or DEFAULT_MODEL, color=color, max_tokens=max_tokens)
        chat.say(f"flashserve chat: {chat.model} at {base}; /help for commands, /exit to leave")
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                chat.say("")
                return 0
            except KeyboardInterrupt:
                chat.say("")
                continue
            if not chat.handle(line):
                return 0
