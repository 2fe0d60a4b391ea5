"""`flashserve make-tiny-v4 DIR` then `flashserve serve --model DIR`: the DeepSeek-V4 architecture served
end to end through the real `openai` client. The weights are random, so the tests check what the serving
path guarantees whatever the model says: chat vs thinking mode (reasoning_content, reasoning tokens, the
max-effort preamble), grammar-forced DSML tool calls parsed into OpenAI tool_calls with typed arguments
(also streamed), and prefix caching in whole 128-token units. (A random model rarely closes a free-text
value by itself, so the tool's string parameter carries a maxLength here; raw-text values are covered by
tests/unit/test_dsml_grammar.py.) Issue 16 §3 here: a multi-turn conversation sending back earlier
reasoning_content and tool calls is accepted, a call cut by max_tokens leaves no DSML in content, max effort
under tool_choice auto keeps calls parseable, and a forced call keeps its thinking (the grammar starts after
`</think>`, here forced by an Anthropic `budget_tokens`); and the checkpoint is made with a 16384-token context
(`--max-position-embeddings`), which /v1/models reports."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import _python, _stop, _wait_ready, start_server, started_early, starts_early

MODEL = "deepseek/deepseek-v4-flash"
KEY = "sk-fs-tiny-v4-e2e"
CONTEXT = 16384  # room for an agent CLI's ~12k-token prompt
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                                    "metric": {"type": "boolean"}},
                   "required": ["city", "days", "metric"]}}}


class TinyV4Server:
    """`make-tiny-v4` then `serve --model` on it, run early (tests/e2e/conftest.py: `starts_early`); the fixture
    checks what `make-tiny-v4` did."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.folder = tmp_path_factory.mktemp("tiny-v4") / "tiny-v4"
        self.made = subprocess.run([_python(), "-m", "flashserve", "make-tiny-v4", str(self.folder), "--seed", "1",
                                    "--max-position-embeddings", str(CONTEXT)],
                                   capture_output=True, text=True, timeout=300)
        self.server = None
        if self.made.returncode == 0:
            self.server = start_server(tmp_path_factory, {"FLASHSERVE_MODEL": str(self.folder),
                                                          "FLASHSERVE_API_KEY": KEY},
                                       unset=("FLASHSERVE_DATABASE_URL",))

    def stop(self) -> None:
        if self.server is not None:
            _stop(self.server[0], self.server[2])


starts_early("v4")(TinyV4Server)


@pytest.fixture(scope="module")
def v4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    started: TinyV4Server = started_early("v4", tmp_path_factory)
    folder, made = started.folder, started.made
    assert made.returncode == 0, made.stderr
    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()
    assert json.loads((Path(folder) / "config.json").read_text())["max_position_embeddings"] == CONTEXT
    assert started.server is not None
    process, base, log = started.server
    try:
        _wait_ready(base, process, log)
        with openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            yield client
    finally:
        _stop(process, log)


def chat(client: openai.OpenAI, **kwargs: object) -> object:
    args: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather?"}],
                               "max_tokens": 12, "temperature": 0}
    args.update(kwargs)
    return client.chat.completions.create(**args)  # type: ignore[call-overload]


def test_chat_mode_answers_without_reasoning(v4: openai.OpenAI) -> None:
    r = chat(v4)
    message = r.choices[0].message
    assert isinstance(message.content, str) and not getattr(message, "reasoning_content", None)
    assert r.usage.completion_tokens > 0 and r.usage.completion_tokens_details.reasoning_tokens == 0


def test_thinking_mode_returns_reasoning(v4: openai.OpenAI) -> None:
    r = chat(v4, reasoning_effort="high", max_tokens=16)
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None), "the thinking block goes to reasoning_content"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    high = r.usage.prompt_tokens
    r_max = chat(v4, reasoning_effort="xhigh", max_tokens=4)  # "max": the preamble opens the prompt
    assert r_max.usage.prompt_tokens > high + 20
    plain = chat(v4, max_tokens=4)
    assert plain.usage.prompt_tokens == high  # same turns; only <think> vs </think> differs, one token each


def test_required_tool_call_is_dsml_parsed_with_types(v4: openai.OpenAI) -> None:
    r = chat(v4, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=300)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "days", "metric"}
    assert isinstance(args["city"], str) and isinstance(args["days"], int) and isinstance(args["metric"], bool)


def test_named_tool_call_streams(v4: openai.OpenAI) -> None:
    stream = chat(v4, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  max_tokens=300, stream=True)
    names, arguments, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                if delta.function and delta.function.arguments:
                    arguments += delta.function.arguments
            finish = choice.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert isinstance(json.loads(arguments)["days"], int)


def test_prefix_cache_counts_whole_units(v4: openai.OpenAI) -> None:
    long = " ".join(f"word{i}" for i in range(400))
    first = chat(v4, messages=[{"role": "user", "content": long}], max_tokens=2)
    assert first.usage.prompt_tokens > 300
    second = chat(v4, messages=[{"role": "user", "content": long}], max_tokens=2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 128 == 0 and cached <= second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content


def test_the_context_length_is_the_checkpoints(v4: openai.OpenAI) -> None:
    card = next(m for m in v4.models.list().data if m.id == MODEL)
    assert card.context_length == CONTEXT  # type: ignore[attr-defined]


def test_a_turn_after_tool_calls_with_reasoning_sent_back_is_accepted(v4: openai.OpenAI) -> None:
    """vLLM and SGLang users report a 400 here; V4's encoding renders (or drops) the earlier reasoning."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2, "metric": true}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
                 "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
                {"role": "assistant", "content": "It is 21 degrees.", "reasoning_content": "Easy."},
                {"role": "user", "content": "And tomorrow?"}]
    for kwargs in ({"tools": [WEATHER]}, {"tools": [WEATHER], "reasoning_effort": "max"},
                   {"reasoning_effort": "high"}, {"reasoning_effort": "none"}, {"stream": True, "tools": [WEATHER]}):
        r = chat(v4, messages=messages, max_tokens=4, **kwargs)
        if kwargs.get("stream"):
            assert [c for c in r if c.choices and c.choices[0].finish_reason]  # type: ignore[attr-defined]
        else:
            assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")  # type: ignore[attr-defined]


def test_a_call_cut_by_max_tokens_leaves_no_markup(v4: openai.OpenAI) -> None:
    for stream in (False, True):
        r = chat(v4, tools=[WEATHER], tool_choice="required", max_tokens=8, stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]  # type: ignore[attr-defined]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            message = r.choices[0].message  # type: ignore[attr-defined]
            content, calls, finish = message.content or "", message.tool_calls or [], r.choices[0].finish_reason
        assert (content, calls, finish) == ("", [], "length")


def test_max_effort_under_auto_keeps_calls_parseable(v4: openai.OpenAI) -> None:
    r = chat(v4, tools=[WEATHER], tool_choice="auto", reasoning_effort="max", max_tokens=40)
    choice = r.choices[0]  # type: ignore[attr-defined]
    assert "DSML" not in (choice.message.content or "") and "DSML" not in (choice.message.reasoning_content or "")
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"


# -- issue 17: FIM, chat prefix completion with thinking, DeepSeek's names and thinking switch -----------------
def _root(v4: openai.OpenAI, path: str, body: dict[str, object]) -> dict[str, object]:
    base = str(v4.base_url).rstrip("/").removesuffix("/v1")
    r = httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _text_of(v4: openai.OpenAI, body: dict[str, object]) -> str:
    tokens = _root(v4, "/tokenize", {"model": MODEL, **body})["tokens"]
    return str(_root(v4, "/detokenize", {"model": MODEL, "tokens": tokens})["prompt"])


def test_fill_in_the_middle_uses_v4s_fim_tokens(v4: openai.OpenAI) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n    return c"
    fim = v4.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=4, temperature=0)
    assert fim.object == "text_completion" and isinstance(fim.choices[0].text, str)
    # BOS, the three FIM markers (one token each) and the two texts: nothing else reached the model.
    parts = [int(_root(v4, "/tokenize", {"model": MODEL, "prompt": p})["count"]) - 1 for p in (prefix, suffix)]
    assert fim.usage is not None and fim.usage.prompt_tokens == 1 + 3 + sum(parts)
    beta = httpx.post(str(v4.base_url).rstrip("/").removesuffix("/v1") + "/beta/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "deepseek-chat", "prompt": prefix, "suffix": suffix, "max_tokens": 4,
                            "temperature": 0})
    assert beta.status_code == 200 and beta.json()["choices"][0]["text"] == fim.choices[0].text


def test_a_thinking_prefix_continues_the_thinking(v4: openai.OpenAI) -> None:
    user = {"role": "user", "content": "What is the weather?"}
    thinking = {"model": MODEL, "thinking": {"type": "enabled"}}
    open_thought = [user, {"role": "assistant", "content": "", "reasoning_content": "Let me think", "prefix": True}]
    assert _text_of(v4, {**thinking, "messages": open_thought}).endswith("<｜Assistant｜><think>Let me think")
    answered = [user, {"role": "assistant", "content": "It is", "reasoning_content": "Sunny.", "prefix": True}]
    assert _text_of(v4, {**thinking, "messages": answered}).endswith("<｜Assistant｜><think>Sunny.</think>It is")
    chat_mode = [user, {"role": "assistant", "content": "It is", "prefix": True}]
    assert _text_of(v4, {"model": MODEL, "messages": chat_mode}).endswith("<｜Assistant｜></think>It is")
    r = chat(v4, messages=open_thought, max_tokens=6, extra_body={"thinking": {"type": "enabled"}})
    assert getattr(r.choices[0].message, "reasoning_content", None)  # still thinking
    r = chat(v4, messages=answered, max_tokens=6, extra_body={"thinking": {"type": "enabled"}})
    assert not getattr(r.choices[0].message, "reasoning_content", None)  # the answer goes on


def test_deepseek_chat_and_reasoner_and_the_thinking_switch(v4: openai.OpenAI) -> None:
    assert not getattr(chat(v4, model="deepseek-chat").choices[0].message, "reasoning_content", None)
    assert getattr(chat(v4, model="deepseek-reasoner").choices[0].message, "reasoning_content", None)
    on = chat(v4, extra_body={"thinking": {"type": "enabled"}})
    assert on.usage.completion_tokens_details.reasoning_tokens > 0
    off = chat(v4, model="deepseek-reasoner", reasoning_effort="max", extra_body={"thinking": {"type": "disabled"}})
    assert off.usage.completion_tokens_details.reasoning_tokens == 0  # disabled: the effort is ignored
    assert off.usage.prompt_tokens == chat(v4, max_tokens=1).usage.prompt_tokens  # no max-effort preamble


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_keeps_its_thinking(v4: openai.OpenAI, stream: bool) -> None:
    """Thinking on and a grammar (tool_choice any): the model thinks freely until `</think>` (forced here by
    the budget, as a random model rarely writes it), then the DSML grammar shapes the call. (A one-flag tool:
    its forced call is ~100 tokens of this checkpoint's small vocabulary.)"""
    import anthropic

    base = str(v4.base_url).rstrip("/").removesuffix("/v1")
    check = {"name": "check", "description": "Check a flag",
             "input_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}
    args: dict = {"model": "claude-sonnet-5", "max_tokens": 200, "tools": [check],
                  "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                  "thinking": {"type": "enabled", "budget_tokens": 24}, "extra_body": {"temperature": 0},
                  "messages": [{"role": "user", "content": "Is it ok?"}]}
    with anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0, timeout=600) as client:
        if stream:
            with client.messages.stream(**args) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(**args)
    assert [block.type for block in message.content] == ["thinking", "tool_use"], message
    thinking, call = message.content
    assert thinking.thinking and thinking.signature  # type: ignore[union-attr]
    assert "DSML" not in thinking.thinking  # type: ignore[union-attr]
    assert call.name == "check" and isinstance(call.input["ok"], bool)  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens > 24  # the thinking (24 tokens) is billed as output too
