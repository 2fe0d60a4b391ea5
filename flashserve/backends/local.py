"""The in-process engine as a `Backend`.

Turns a chat request into prompt tokens (template + tokenizer), checks it
against the model (context length, vocabulary), starts one engine request per
choice, and turns the engines' token streams back into text deltas with stop
strings applied. Usage comes from the engine's own counters.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from flashserve import __version__
from flashserve.chat.formats import Template, ToolParser
from flashserve.chat.model_output import ModelOutputParser
from flashserve.chat.output import ChoiceOutput
from flashserve.chat.reasoning import ReasoningSpec, Thinking, resolve_thinking
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

    # -- request preparation ---------------------------------------------------
    def render_prompt(self, messages: list[Message], plan: ToolPlan, thinking: bool = False,
                      effort_mode: str | None = None) -> list[int]:
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
            text = self.model.template.render(dicts, tools=tools, **extra)
        except TemplateError as exc:
            raise invalid_request(f"The messages could not be rendered by the model's chat template: {exc}",
                                  "messages") from exc
        return self.model.tokenizer.encode(text, add_special_tokens=False).ids

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
        if request.raw_prompt is not None or request.suffix is not None:
            raise unsupported_parameter("prompt", "is not supported yet: send chat messages.")
        if request.messages and request.messages[-1].prefix:
            raise unsupported_parameter("prefix", "completion is not supported yet.")
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
        if request.sampling.logprobs:
            raise unsupported_parameter("logprobs", "is not supported yet.")
        if request.sampling.top_logprobs:
            raise unsupported_parameter("top_logprobs", "is not supported yet.")

    # -- Backend -----------------------------------------------------------------
    def _prepare(self, request: GenerationRequest) -> tuple[list[int], ToolPlan, Any | None, Thinking]:
        """The prompt's token ids, the tool plan, the grammar and the thinking mode of a request."""
        self.check_supported(request)
        plan = plan_tools(request)
        grammar = self._grammar(request, plan)
        # A constrained request thinks as any other: the engine applies its grammar from the first token
        # after the end-of-thinking marker (engine/request.py: ThinkingControl).
        thinking = self._thinking(request)
        if not self.model.think_end_ids:
            thinking = Thinking(False)
        return self.render_prompt(request.messages, plan, thinking.enabled, thinking.mode), plan, grammar, thinking

    async def count_tokens(self, request: GenerationRequest) -> int:
        """Exact: the prompt rendered and tokenized as `open` would; nothing reaches the engine."""
        return len(self._prepare(request)[0])

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> LocalGeneration:
        prompt, plan, grammar, thinking = self._prepare(request)
        limit = self.model.max_model_len
        if len(prompt) >= limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                f"{len(prompt)} tokens. Please reduce the length of the messages.",
                "messages", "context_length_exceeded")
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
                               tool_parser=self.model.tool_parser, think_markers=bool(self.model.think_end_ids))

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
                 think_markers: bool = False) -> None:
        self.usage = Usage(prompt_tokens=prompt_tokens)
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
            if choice.stopped or out.finished:
                self._done[index] = True
                if choice.stopped:
                    await self._streams[index].abort()
                elif out.finish_reason is FinishReason.ABORT:
                    raise server_error(503, "The request was aborted by the server.", "request_aborted")
                else:
                    text += choice.finish()
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
        return ChoiceDelta(index, pieces.content, pieces.reasoning, tool_calls=pieces.calls, finish_reason=reason)

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
