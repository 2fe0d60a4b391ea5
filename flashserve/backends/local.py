"""The in-process engine as a `Backend`.

Turns a chat request into prompt tokens (template + tokenizer), checks it
against the model (context length, vocabulary), starts one engine request per
choice, and turns the engines' token streams back into text deltas with stop
strings applied. Usage comes from the engine's own counters.

Besides a conversation, a prompt can be:
- a chat prefix (the last message is an assistant message with `prefix`): the conversation before it is
  rendered with the assistant's turn opened, and the prefix's text follows, unclosed, for the model to
  continue. With thinking, the message's `reasoning_content` is the thinking so far: without `content` the
  model goes on thinking; with it, the thinking block is closed and the answer continues.
- a raw prompt (legacy completions): the text itself, no chat template (after the family's BOS);
- fill in the middle (a raw prompt with a `suffix`): the family's FIM format (`Template.fim_prompt`); a
  family without one answers 400 naming `suffix`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from tokenizers import Tokenizer

from flashserve import __version__
from flashserve.chat.formats import Template, ToolParser
from flashserve.chat.logprob_alignment import ContentLogprobs, TokenTexts
from flashserve.chat.model_output import ModelOutputParser
from flashserve.chat.output import ChoiceOutput
from flashserve.chat.reasoning import THINK_END, ReasoningSpec, Thinking, resolve_thinking
from flashserve.chat.structured import GrammarBackend
from flashserve.chat.template import TemplateError
from flashserve.chat.tools import ToolCallParser, ToolPlan, plan_tools, tool_dict, with_tools_in_system_prompt
from flashserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from flashserve.engine.request import FinishReason, RequestOutput, SamplingParams, ThinkingControl
from flashserve.errors import FlashserveError, invalid_request, server_error, unsupported_parameter
from flashserve.generation import ChoiceDelta, GenerationRequest, Message, RequestContext, Usage
from flashserve.ids import choice_id

_SEED_MOD = 2**64
THINKING_SHARE = 0.75  # most of max_tokens a thinking block may take; the answer keeps the rest


@dataclass(frozen=True, slots=True)
class LocalModel:
    """What the backend needs to know about the loaded model."""

    tokenizer: Tokenizer
    template: Template
    stop_token_ids: tuple[int, ...]
    max_model_len: int
    vocab_size: int
    fingerprint: str  # of the weights
    dtype: str = "float32"
    grammars: GrammarBackend | None = None  # structured output; None: JSON formats are refused
    reasoning: ReasoningSpec = ReasoningSpec()
    think_end_ids: tuple[int, ...] = ()  # tokens of the end-of-thinking marker, for thinking models
    tool_parser: ToolParser = ToolCallParser  # parses the calls the model writes (its family's format)


class LocalBackend:
    name = "local"

    def __init__(self, engine: AsyncEngine, model: LocalModel, max_active: int | None = None) -> None:
        self.engine = engine
        self.model = model
        self.max_active = max_active  # engine requests (running + queued) at once; None: unbounded
        self._opening: set[str] = set()  # ids of choices admitted but maybe not yet in the engine
        # Names the engine build and the exact weights: a change of either changes the fingerprint.
        ident = f"flashserve-{__version__}:{model.fingerprint}:{model.dtype}"
        self.system_fingerprint = "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        self._token_texts = TokenTexts(model.tokenizer)  # logprobs' token texts and bytes, cached by id

    # -- request preparation ---------------------------------------------------
    def render_prompt(self, messages: list[Message], plan: ToolPlan, thinking: bool = False,
                      effort_mode: str | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids: the conversation through the chat template; a last message with
        `prefix` is the opened assistant turn's beginning (`continuation`)."""
        tail = ""
        if messages and messages[-1].prefix:
            tail = continuation(messages[-1], thinking, len(messages) - 1)
            messages, add_generation_prompt = messages[:-1], True
        dicts = [_message_dict(m) for m in messages]
        tools = None
        if plan.tools:
            if self.model.template.handles_tools:
                tools = [tool_dict(t) for t in plan.tools]
            else:
                dicts = with_tools_in_system_prompt(dicts, plan)
        try:
            # Templates of thinking models read one of these to open (or skip) the thinking block.
            extra: dict[str, Any] = {}
            if self.model.reasoning.can_think:
                extra = {"thinking": thinking, "enable_thinking": thinking, "reasoning_effort": effort_mode}
            text = self.model.template.render(dicts, add_generation_prompt, tools=tools, **extra) + tail
        except TemplateError as exc:
            raise invalid_request(f"The messages could not be rendered by the model's chat template: {exc}",
                                  "messages") from exc
        return self.model.tokenizer.encode(text, add_special_tokens=False).ids

    def render_raw(self, prompt: str, suffix: str | None) -> list[int]:
        """A legacy completion's prompt: the text as is, or with `suffix` the family's fill-in-the-middle
        format (400 naming `suffix` for a family without one)."""
        template = self.model.template
        if suffix is None:
            text = template.raw_prompt(prompt)
        else:
            fim = template.fim_prompt(prompt, suffix)
            if fim is None:
                raise invalid_request("This model has no fill-in-the-middle format: 'suffix' cannot be used.",
                                      "suffix", "unsupported_parameter")
            text = fim
        return self.model.tokenizer.encode(text, add_special_tokens=False).ids

    async def detokenize(self, token_ids: list[int]) -> str:
        for i, token in enumerate(token_ids):
            if not 0 <= token < self.model.vocab_size:
                raise invalid_request(f"tokens[{i}] = {token} is not a token id of this model (0 to "
                                      f"{self.model.vocab_size - 1}).", "tokens", "invalid_value")
        return self.model.tokenizer.decode(token_ids, skip_special_tokens=False)

    @property
    def max_model_len(self) -> int | None:
        return self.model.max_model_len

    def sampling_params(self, request: GenerationRequest, choice: int) -> SamplingParams:
        sampling = request.sampling
        seed = None if sampling.seed is None else (sampling.seed + choice) % _SEED_MOD
        return SamplingParams(
            temperature=1.0 if sampling.temperature is None else sampling.temperature,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            presence_penalty=sampling.presence_penalty or 0.0,
            frequency_penalty=sampling.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(sampling.logit_bias),
            seed=seed,
            max_tokens=sampling.max_tokens,
            stop_token_ids=self.model.stop_token_ids,
            logprobs=(sampling.top_logprobs or 0) if sampling.logprobs else None,
        )

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise invalid_request(f"Invalid logit_bias key '{key}': keys must be token ids.", "logit_bias",
                                      "invalid_value") from None
            if not 0 <= token_id < self.model.vocab_size:
                raise invalid_request(f"Invalid logit_bias key '{key}': token ids must be in "
                                      f"[0, {self.model.vocab_size}).", "logit_bias", "invalid_value")
            out[token_id] = float(value)
        return out

    def check_supported(self, request: GenerationRequest) -> None:
        """Fields the embedded engine does not implement yet answer 400, never silently ignored."""
        if request.suffix is not None and request.raw_prompt is None:
            raise unsupported_parameter("suffix", "needs a prompt (legacy completions).")
        if request.sampling.top_k is not None:
            raise unsupported_parameter("top_k", "is not supported yet.")
        if request.audio is not None:
            raise unsupported_parameter("audio", "output is not supported: this model produces text only.")
        if request.modalities and "audio" in request.modalities:
            raise unsupported_parameter("modalities", "'audio' is not supported: this model produces text only.")
        wants_json = request.response_format is not None and request.response_format.type != "text"
        if wants_json and self.model.grammars is None:
            raise unsupported_parameter("response_format", "is not available: structured output is not set up.")
        if request.tools and self.model.grammars is None:
            raise unsupported_parameter("tools", "are not available: constrained decoding is not set up.")

    # -- Backend -----------------------------------------------------------------
    def _prepare(self, request: GenerationRequest,
                 add_generation_prompt: bool = True) -> tuple[list[int], ToolPlan, Any | None, Thinking]:
        """The prompt's token ids, the tool plan, the grammar and the thinking mode of a request (a prefix
        that closed its thinking block, or a raw prompt, gives the output as not thinking)."""
        self.check_supported(request)
        plan = plan_tools(request)
        if request.raw_prompt is not None:
            return self.render_raw(request.raw_prompt, request.suffix), plan, None, Thinking(False)
        grammar = self._grammar(request, plan)
        prefix = request.messages[-1] if request.messages and request.messages[-1].prefix else None
        if prefix is not None and grammar is not None:
            raise invalid_request("A prefix the answer continues cannot be combined with constrained output "
                                  "(tools or a JSON response_format).", f"messages[{len(request.messages) - 1}]"
                                  ".prefix", "unsupported_parameter")
        # A constrained request thinks as any other: the engine applies its grammar from the first token
        # after the end-of-thinking marker (engine/request.py: ThinkingControl).
        thinking = self._thinking(request)
        if not self.model.think_end_ids:
            thinking = Thinking(False)
        prompt = self.render_prompt(request.messages, plan, thinking.enabled, thinking.mode, add_generation_prompt)
        if prefix is not None and thinking.enabled and prefix.content:
            thinking = replace(thinking, enabled=False)  # the prefix closed the thinking block: the answer goes on
        return prompt, plan, grammar, thinking

    async def count_tokens(self, request: GenerationRequest) -> int:
        """Exact: the prompt rendered and tokenized as `open` would; nothing reaches the engine."""
        return len(self._prepare(request)[0])

    async def tokenize(self, request: GenerationRequest, add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids as `open` would send them (a conversation rendered without the assistant's
        opening when `add_generation_prompt` is false)."""
        return self._prepare(request, add_generation_prompt)[0]

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> LocalGeneration:
        prompt, plan, grammar, thinking = self._prepare(request)
        limit = self.model.max_model_len
        if len(prompt) >= limit:
            what = "messages" if request.raw_prompt is None else "prompt"
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, your {what} resulted in "
                f"{len(prompt)} tokens. Please reduce the length of the {what}.", what, "context_length_exceeded")
        control = ThinkingControl(self.model.think_end_ids, thinking.budget) if thinking.enabled else None
        params = [self.sampling_params(request, i) for i in range(request.sampling.n)]
        ids = [choice_id(ctx.request_id, i) for i in range(len(params))]
        self._admit(ids)
        streams: list[RequestStream] = []
        self._opening.update(ids)
        try:
            for i, p in enumerate(params):
                constraint = None if grammar is None else GrammarBackend.constraint(grammar)
                streams.append(await self.engine.add_request(ids[i],
                                                             prompt, p, ctx.tenant, constraint, control))
        except EngineDeadError as exc:
            for s in streams:
                await s.abort()
            raise server_error(503, "The inference engine is not available.", "engine_unavailable") from exc
        finally:
            self._opening.difference_update(ids)
        names = [t.name for t in plan.tools] if plan.parses_calls else None
        return LocalGeneration(streams, self.model.tokenizer, list(request.sampling.stop), len(prompt), names,
                               thinking.enabled, max_calls=None if plan.parallel else 1,
                               tool_parser=self.model.tool_parser, think_markers=bool(self.model.think_end_ids),
                               token_texts=self._token_texts if request.sampling.logprobs else None)

    def _admit(self, ids: list[str]) -> None:
        """Bound the engine's queue: past it, 503 before any model work (checked and counted without an
        await in between, so concurrent requests cannot all slip under the bound). A choice the engine has
        added but whose add has not returned yet is in both sets: the union counts it once."""
        if self.max_active is not None and self.num_active + len(ids) > self.max_active:
            raise server_error(503, "The server is overloaded; please retry shortly.", "overloaded", retry_after_s=1)

    @property
    def num_active(self) -> int:
        return len(self.engine.request_ids() | self._opening)

    @property
    def load(self) -> int:
        return self.num_active

    def _thinking(self, request: GenerationRequest) -> Thinking:
        reasoning = request.reasoning
        if reasoning.thinking is False:
            return Thinking(False)
        effort = reasoning.effort
        if reasoning.thinking and (effort is None or effort == "none"):
            effort = "high"  # switched on without an effort: the default mode
        thinking = resolve_thinking(effort, self.model.reasoning)
        if not thinking.enabled:
            return thinking
        budget = thinking.budget if reasoning.budget_tokens is None else reasoning.budget_tokens
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None and (budget is None or budget > max_tokens * THINKING_SHARE):
            # Thinking never takes the whole max_tokens (a server's output cap clamps Claude Code's 128000
            # to a few hundred): its end is forced in time for the answer to have the rest.
            budget = int(max_tokens * THINKING_SHARE)
        # The forced end marker itself is spent from the budget: a smaller one still thinks one token.
        budget = None if budget is None else max(budget, len(self.model.think_end_ids) + 1)
        return Thinking(True, thinking.mode, budget)

    async def abort_all(self) -> int:
        return await self.engine.abort_all()

    async def inspect(self) -> dict[str, object]:
        return await self.engine.inspect()

    def _grammar(self, request: GenerationRequest, plan: ToolPlan) -> Any | None:
        grammars = self.model.grammars
        if grammars is None:
            return None
        wants_json = request.response_format is not None and request.response_format.type != "text"
        if plan.choice in ("required", "named"):
            return grammars.for_tools(plan)  # the output is calls: a response format has nothing to shape
        if plan.choice == "auto" and plan.tools:
            if wants_json:
                raise unsupported_parameter("response_format", "cannot be combined with tool_choice 'auto' yet.")
            return grammars.for_tools(plan)
        return grammars.for_response_format(request.response_format)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.engine.engine.stats(), "active_requests": self.engine.num_active}

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)


class LocalGeneration:
    def __init__(self, streams: list[RequestStream], tokenizer: Tokenizer, stops: list[str],
                 prompt_tokens: int, tool_names: list[str] | None = None, thinking: bool = False,
                 max_calls: int | None = None, tool_parser: ToolParser = ToolCallParser,
                 think_markers: bool = False, token_texts: TokenTexts | None = None) -> None:
        self.usage = Usage(prompt_tokens=prompt_tokens)
        # Logprobs asked for: each choice's token logprobs, aligned with its content (chat/logprob_alignment.py).
        self._token_texts = token_texts
        self._logprobs = None if token_texts is None else [ContentLogprobs() for _ in streams]
        self._streams = streams
        self._choices = [ChoiceOutput(tokenizer, stops) for _ in streams]
        # Text -> reasoning, content and calls: the stage a raw-text remote upstream shares (chat/model_output.py).
        # A thinking model's `<think>`/`</think>` are its control markers, never answer text (think_markers).
        self._outputs = [ModelOutputParser(thinking, tool_names, max_calls, tool_parser, think_markers)
                         for _ in streams]
        self._reasoning = [0] * len(streams)
        self._done = [False] * len(streams)
        self._completion = [0] * len(streams)

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        async for index, out in self._merged():
            self._account(index, out)
            if self._done[index]:
                continue  # the closing output of a choice we already ended on a stop string
            choice = self._choices[index]
            text = choice.add(out.new_token_ids)
            self._place_logprobs(index, out, choice.released)
            if choice.stopped or out.finished:
                self._done[index] = True
                if choice.stopped:
                    await self._streams[index].abort()
                elif out.finish_reason is FinishReason.ABORT:
                    raise server_error(503, "The request was aborted by the server.", "request_aborted")
                else:
                    text += choice.finish()
                    self._place_logprobs(index, None, choice.released)
                reason = "stop" if choice.stopped else str(out.finish_reason)
                delta = self._delta(index, text, final=True, reason=reason)
                delta.stop_sequence = choice.matcher.matched
                yield delta
            elif text:
                delta = self._delta(index, text)
                if delta.content or delta.reasoning_content or delta.tool_calls:
                    yield delta

    def _delta(self, index: int, text: str, final: bool = False, reason: str | None = None) -> ChoiceDelta:
        output = self._outputs[index]
        pieces = output.feed(text)
        if final:
            rest, reason = output.finish(reason)
            pieces.add(rest)
        delta = ChoiceDelta(index, pieces.content, pieces.reasoning, tool_calls=pieces.calls, finish_reason=reason)
        if self._logprobs is not None:
            aligned = self._logprobs[index]
            delta.logprobs = aligned.finish(pieces.content) if final else aligned.content(pieces.content)
        return delta

    def _place_logprobs(self, index: int, out: RequestOutput | None, released: str) -> None:
        """Put an output's content tokens (not its thinking tokens) on the raw text it released."""
        if self._logprobs is None or self._token_texts is None:
            return
        entries = []
        if out is not None and out.logprobs:
            first = out.num_output_tokens - len(out.new_token_ids)  # the output index of its first token
            entries = [self._token_texts.logprob(lp) for i, lp in enumerate(out.logprobs)
                       if first + i >= out.num_reasoning_tokens]
        self._logprobs[index].add_tokens(entries, released)

    def _account(self, index: int, out: RequestOutput) -> None:
        self._completion[index] = out.num_output_tokens
        self._reasoning[index] = out.num_reasoning_tokens
        self.usage.reasoning_tokens = sum(self._reasoning)
        if index == 0:
            self.usage.cached_tokens = out.num_cached_tokens
        self.usage.completion_tokens = sum(self._completion)

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Interleave the choices' streams in arrival order."""
        if len(self._streams) == 1:  # the usual n=1: no pump task and second queue per token
            try:
                async for out in self._streams[0]:
                    yield 0, out
            except EngineDeadError as exc:
                raise _engine_failed() from exc
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((index, exc))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, EngineDeadError):
                    raise _engine_failed() from item
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def abort(self) -> None:
        for stream, done in zip(self._streams, self._done, strict=True):
            if not done:
                await stream.abort()
        self._done = [True] * len(self._streams)


def continuation(message: Message, thinking: bool, index: int) -> str:
    """The text a prefix message puts after the opened assistant turn. Thinking: its `reasoning_content` is
    the thinking so far, closed by the end-of-thinking marker when `content` follows. Not thinking: its
    `content` (a `reasoning_content` would be dropped, which changes the request: refused)."""
    if not thinking:
        if message.reasoning_content:
            raise invalid_request(f"messages[{index}].reasoning_content is a thinking prefix, but this request "
                                  "does not think: enable thinking or leave it out.",
                                  f"messages[{index}].reasoning_content", "invalid_value")
        return message.content or ""
    if message.content:
        return (message.reasoning_content or "") + THINK_END + message.content
    return message.reasoning_content or ""


def _engine_failed() -> FlashserveError:
    return server_error(500, "The inference engine failed while generating.", "engine_error")


def _message_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}}
                             for call in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content:
        out["reasoning_content"] = message.reasoning_content  # for templates that show earlier thinking
    return out
