"""The thinking path, end to end below HTTP: a scripted model that really emits <think> ... </think>
runs through the real engine, the local backend and the output parsers. Also the effort mapping and
the splitter on its own, and structured output with thinking on: the model thinks freely and the grammar
(real xgrammar) shapes only what follows `</think>`."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torch import nn

from flashserve.api.chat import generation_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.local import LocalBackend, LocalModel
from flashserve.chat.reasoning import ReasoningSpec, ReasoningSplitter, ThinkMarkerFilter, resolve_thinking
from flashserve.chat.structured import GrammarBackend
from flashserve.chat.template import CHATML_TEMPLATE, ChatTemplate
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.generation import RequestContext
from flashserve.models.layers import FULL_ATTENTION, AttentionMetadata, CacheSpec, LayerKVCache

WORDS = ["<eos>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "system", "user", "assistant",
         "hmm", "let", "me", "think", "more", "deeply", "still", "thinking", "Paris", "is", "the", "answer",
         "question", "?", "{}"]
ID = {w: i for i, w in enumerate(WORDS)}
# The script: what follows each token. The generation prompt ends with "assistant".
SCRIPT = ["<think>", "hmm", "let", "me", "think", "more", "deeply", "still", "thinking", "</think>",
          "Paris", "is", "the", "answer", "<eos>"]
NEXT = {ID["assistant"]: ID[SCRIPT[0]], **{ID[a]: ID[b] for a, b in zip(SCRIPT, SCRIPT[1:], strict=False)}}


class ScriptedModel(nn.Module):
    """Predicts the script's next token after the current one; anything else ends the sequence."""

    def cache_specs(self) -> list[CacheSpec]:
        return [CacheSpec(FULL_ATTENTION, 1, 1)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerKVCache]) -> torch.Tensor:
        return input_ids.float().unsqueeze(1)

    def compute_logits(self, hidden: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], len(WORDS)), -10.0)
        for row, token in enumerate(hidden[:, 0].long().tolist()):
            logits[row, NEXT.get(token, ID["<eos>"])] = 10.0
        return logits


def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(w, special=False) for w in ("<|im_start|>", "<|im_end|>", "<think>", "</think>")])
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    return tok


def grammars() -> GrammarBackend:
    # Word tokens are plain ASCII, so their byte-level spelling is the word itself.
    return GrammarBackend(WORDS, {ID["<eos>"]}, [ID["<eos>"]], len(WORDS), tool_format="dsml")


def backend(can_think: bool, budget: int = 64, structured: bool = False) -> LocalBackend:
    engine = AsyncEngine(LLMEngine(ScriptedModel(), EngineConfig(max_model_len=128, num_kv_blocks=64,
                                                                 block_size=4), len(WORDS)))
    engine.start()
    template = ChatTemplate(CHATML_TEMPLATE.replace("'\\n'", "' '").replace("\\n", " "))
    spec = ReasoningSpec(can_think=can_think, thinks_by_default=True, budgets={"high": budget, "max": 2 * budget})
    model = LocalModel(tokenizer(), template, (ID["<eos>"],), 128, len(WORDS), "f" * 16,
                       reasoning=spec, think_end_ids=(ID["</think>"],),
                       grammars=grammars() if structured else None)
    return LocalBackend(engine, model)


def run(b: LocalBackend, stream_deltas: list, **kw: object) -> tuple[str, str, object]:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "question ?"}], "temperature": 0, **kw})

    async def main() -> tuple[str, str, object]:
        gen = await b.open(generation_request(request), RequestContext("r1"))
        content, reasoning = "", ""
        async for delta in gen:
            stream_deltas.append(delta)
            content += delta.content
            reasoning += delta.reasoning_content
        return content, reasoning, gen.usage

    try:
        return asyncio.run(main())
    finally:
        b.engine.shutdown()


def test_thinking_goes_to_reasoning_content_and_is_counted() -> None:
    deltas: list = []
    content, reasoning, usage = run(backend(can_think=True), deltas, reasoning_effort="high")
    assert content.split() == ["Paris", "is", "the", "answer"]
    assert reasoning.split() == ["hmm", "let", "me", "think", "more", "deeply", "still", "thinking"]
    assert "</think>" not in content and "<think>" not in reasoning + content
    # <think>, eight thinking words and </think>; the answer and <eos> are not reasoning.
    assert usage.reasoning_tokens == 10 and usage.completion_tokens == 15
    assert any(d.reasoning_content for d in deltas[:-1]), "reasoning is streamed, not only at the end"


def test_budget_forces_the_end_of_thinking() -> None:
    content, reasoning, usage = run(backend(can_think=True, budget=5), [], reasoning_effort="low")
    # <think> hmm let me, then the forced </think>: 5 thinking tokens in all.
    assert reasoning.split() == ["hmm", "let", "me"]
    assert usage.reasoning_tokens == 5
    assert content.split()[:1] == ["Paris"]


@pytest.mark.parametrize("budget", [64, 5])
def test_json_mode_thinks_first_and_the_grammar_shapes_the_answer(budget: int) -> None:
    """The scripted answer after `</think>` ("Paris is the answer") is not JSON: the grammar, applied from
    the token after the marker, turns it into `{}`; the thinking before it is untouched (or cut by the
    budget, whose forced `</think>` is not the grammar's either)."""
    deltas: list = []
    b = backend(can_think=True, budget=budget, structured=True)
    content, reasoning, usage = run(b, deltas, reasoning_effort="high", response_format={"type": "json_object"})
    thought = ["hmm", "let", "me", "think", "more", "deeply", "still", "thinking"]
    assert reasoning.split() == (thought if budget == 64 else thought[:3])
    assert content.strip() == "{}" and deltas[-1].finish_reason == "stop"  # the word decoder joins with spaces
    assert usage.reasoning_tokens == (10 if budget == 64 else 5)


def test_json_mode_without_thinking_is_constrained_from_the_first_token() -> None:
    content, reasoning, usage = run(backend(can_think=True, structured=True), [], reasoning_effort="none",
                                    response_format={"type": "json_object"})
    assert (content.strip(), reasoning, usage.reasoning_tokens) == ("{}", "", 0)


def test_thinking_leaves_a_quarter_of_max_tokens_for_the_answer() -> None:
    # The effort's budget (64) does not fit max_tokens=8: the end is forced after 6 thinking tokens.
    content, reasoning, usage = run(backend(can_think=True), [], reasoning_effort="high", max_tokens=8)
    assert reasoning.split() == ["hmm", "let", "me", "think"] and usage.reasoning_tokens == 6
    assert content.split() == ["Paris", "is"] and usage.completion_tokens == 8  # <think>, 4 words, </think>, 2


def test_effort_none_turns_thinking_off() -> None:
    content, reasoning, usage = run(backend(can_think=True), [], reasoning_effort="none")
    assert reasoning == "" and usage.reasoning_tokens == 0
    # The scripted model thinks anyway; with thinking off that is answer text, but the markers of a thinking
    # model are its control tokens, never shown (a random V4 writes a stray `</think>` in chat mode).
    assert content.split() == ["hmm", "let", "me", "think", "more", "deeply", "still", "thinking",
                               "Paris", "is", "the", "answer"]


def test_a_model_that_cannot_think_ignores_the_effort() -> None:
    _, reasoning, usage = run(backend(can_think=False), [], reasoning_effort="max")
    assert reasoning == "" and usage.reasoning_tokens == 0


@pytest.mark.parametrize("effort,mode", [("none", None), ("low", "high"), ("medium", "high"), ("high", "high"),
                                         ("xhigh", "max"), ("max", "max"), ("ultra", "max"),
                                         (None, "high")])
def test_deepseek_effort_mapping(effort: str | None, mode: str | None) -> None:
    thinking = resolve_thinking(effort, ReasoningSpec(can_think=True, thinks_by_default=True))
    assert thinking.mode == mode and thinking.enabled == (mode is not None)
    assert not resolve_thinking(effort, ReasoningSpec(can_think=False)).enabled


def test_splitter_holds_back_a_partial_end_marker() -> None:
    s = ReasoningSplitter(thinking=True)
    parts = [s.feed(x) for x in ["<thi", "nk>a b </th", "ink", ">\nanswer"]]
    assert "".join(r for r, _ in parts) == "a b " and "".join(c for _, c in parts) == "answer"
    assert s.finish() == ("", "")


def test_earlier_reasoning_reaches_templates_that_use_it() -> None:
    from flashserve.backends.local import _message_dict
    from flashserve.generation import Message

    message = Message("assistant", "Paris", reasoning_content="hmm")
    assert _message_dict(message)["reasoning_content"] == "hmm"
    template = ChatTemplate("{% for m in messages %}[{{ m.reasoning_content }}]{{ m.content }}{% endfor %}")
    assert template.render([_message_dict(message)], add_generation_prompt=False) == "[hmm]Paris"


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_think_markers_are_dropped_from_the_answer_in_any_pieces(size: int) -> None:
    text = "</think>Hello <think>there</think>, a < b and </thin is text.</th"
    f = ThinkMarkerFilter()
    out = "".join(f.feed(text[i:i + size]) for i in range(0, len(text), size)) + f.finish()
    assert out == "Hello there, a < b and </thin is text.</th"
