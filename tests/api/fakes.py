"""Fakes for the in-process API tier: a scripted `Backend`, a char-level tokenizer for the fake model, and a
fake OpenAI-compatible upstream (an ASGI app) for `RemoteBackend` and `Router`.

The request steers both fakes, so a test says what should happen in the message it sends, over HTTP:
the last user message is a script of space-separated words. Ordinary words come back as content deltas
(one completion token each); these words act instead:

- `@hold`  wait here until the test releases the fake (`release()`) or the request is aborted
  (the drain's abort, or the client's disconnect);
- `@fail`  fail mid-stream (after the headers: the error goes in-band);
- `@cut`   (upstream only) the connection breaks mid-stream;
- `@refuse` refuse to open (scripted backend: 503 overloaded; upstream: HTTP 503);
- `@refuse-once` (upstream only) HTTP 503 the first time this exact script is sent, then serve it;
- `@reject` (upstream only) HTTP 400 naming `max_tokens`;
- `@stall` (upstream only) send nothing until released.

Nothing here knows about HTTP routes or the app: `tests/api/conftest.py` builds everything.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import AddedToken, Tokenizer, decoders, models

from flashserve.errors import server_error
from flashserve.generation import ChoiceDelta, GenerationRequest, RequestContext, TokenLogprob, TopLogprob, Usage
from tests.unit.fake_model import CountingModel

# -- the fake model's tokenizer ---------------------------------------------------------------------------
# tests/unit/fake_model.py: CountingModel has a vocabulary of 97 ids. Ids 0-2 are special (end of sequence,
# the ChatML markers), 3 and 4 newline and space, the rest printable ASCII: every generated id decodes.
EOS, IM_START, IM_END = "<eos>", "<|im_start|>", "<|im_end|>"
_CHARS = ["\n", " "] + [chr(c) for c in range(33, 127) if chr(c) not in "`~"]
VOCAB_WORDS = [EOS, IM_START, IM_END, *_CHARS]


def char_tokenizer() -> Tokenizer:
    assert len(VOCAB_WORDS) == 97
    vocab = {w: i for i, w in enumerate(VOCAB_WORDS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(w, special=True) for w in (EOS, IM_START, IM_END)])
    return tok


class PacedCountingModel(CountingModel):
    """`CountingModel` with a settable pause per forward (`delay_s`), so requests stay in the engine long
    enough for a test to act on them (the queue bound, a disconnect, the drain's abort)."""

    def __init__(self) -> None:
        super().__init__()
        self.delay_s = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)  # the engine thread: the event loop keeps running
        return super().forward(*args, **kwargs)


# -- the scripted backend ----------------------------------------------------------------------------------
def _script(request: GenerationRequest) -> list[str]:
    if request.raw_prompt is not None:  # a legacy completion: the prompt is the script
        return request.raw_prompt.split()
    users = [m for m in request.messages if m.role == "user"]
    return (users[-1].content or "").split() if users else []


@dataclass
class ScriptedBackend:
    """A `Backend` that plays the request's script (module docstring). Keeps every generation it opened,
    so a test can see whether it was aborted."""

    name: str = "scripted"
    system_fingerprint: str = "fp_scripted0"
    generations: list[ScriptedGeneration] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    opened: list[tuple[GenerationRequest, RequestContext]] = field(default_factory=list)  # as the core sent them

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> ScriptedGeneration:
        script = _script(request)
        if "@refuse" in script:
            raise server_error(503, "The server is overloaded; please retry shortly.", "overloaded", retry_after_s=1)
        prompt = sum(len((m.content or "").split()) for m in request.messages) + len(script) * (
            request.raw_prompt is not None)
        generation = ScriptedGeneration(self, ctx.request_id, script, prompt, request.sampling.n,
                                        request.sampling.top_logprobs if request.sampling.logprobs else None)
        self.opened.append((request, ctx))
        self.generations.append(generation)
        return generation

    async def count_tokens(self, request: GenerationRequest) -> int:
        return sum(len((m.content or "").split()) for m in request.messages)  # as `open` counts the prompt

    def release(self) -> None:
        self.released.set()

    @property
    def live(self) -> list[ScriptedGeneration]:
        return [g for g in self.generations if not g.ended]

    @property
    def load(self) -> int:
        return len(self.live)

    async def abort_all(self) -> int:
        live = self.live
        for generation in live:
            generation.abort_from_server()
        return len(live)

    def stats(self) -> dict[str, object]:
        return {"active_requests": self.load}

    async def inspect(self) -> dict[str, object]:
        return {"active_requests": self.load, "opened": len(self.generations),
                "aborted": sum(g.aborted for g in self.generations)}

    async def close(self) -> None:
        self.closed = True


class ScriptedGeneration:
    def __init__(self, backend: ScriptedBackend, request_id: str, script: list[str], prompt_tokens: int,
                 n: int, top_logprobs: int | None = None) -> None:
        self.top_logprobs = top_logprobs  # None: no logprobs asked for
        self.backend = backend
        self.request_id = request_id
        self.script = script
        self.n = n
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.aborted = False  # abort() was called before the script ended
        self.ended = False
        self._server_abort = asyncio.Event()

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        try:
            for word in self.script:
                if word == "@hold":
                    await self._hold()
                elif word == "@fail":
                    raise server_error(500, "The inference engine failed while generating.", "engine_error")
                elif not word.startswith("@"):
                    for i in range(self.n):
                        self.usage.completion_tokens += 1
                        yield ChoiceDelta(i, word + " ", logprobs=self._logprobs(word + " "))
                        await asyncio.sleep(0)
            for i in range(self.n):
                yield ChoiceDelta(i, finish_reason="stop")
        finally:
            self.ended = True

    def _logprobs(self, token: str) -> list[TokenLogprob]:
        """With logprobs asked for: the word as one token of log-probability -0.5 (-1 per letter of length for
        the alternatives: `top_logprobs` of them, the token itself first)."""
        if self.top_logprobs is None:
            return []
        alternatives = [TopLogprob(token, -0.5, tuple(token.encode()))]
        alternatives += [TopLogprob(f"alt{k}", -1.0 - k, tuple(f"alt{k}".encode())) for k in range(1, 21)]
        return [TokenLogprob(token, -0.5, tuple(token.encode()), tuple(alternatives[:self.top_logprobs]))]

    async def _hold(self) -> None:
        release = asyncio.ensure_future(self.backend.released.wait())
        abort = asyncio.ensure_future(self._server_abort.wait())
        try:
            await asyncio.wait({release, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            release.cancel()
            abort.cancel()
        if self._server_abort.is_set():  # as the engine reports an abort: an error the client sees in-band
            raise server_error(503, "The request was aborted by the server.", "request_aborted")

    def abort_from_server(self) -> None:
        """What the engine does on `abort_all`: the request ends, its stream says it was aborted."""
        self.aborted = True
        self._server_abort.set()

    async def abort(self) -> None:
        if not self.ended:
            self.aborted = True
            self.ended = True
        self._server_abort.set()


# -- the fake upstream -------------------------------------------------------------------------------------
def _chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                            "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


class UpstreamBroke(Exception):
    """Raised inside the fake upstream's stream: the transport turns it into a broken connection."""


class FakeUpstream:
    """An OpenAI-compatible upstream (as DeepSeek's API streams, with `prompt_cache_hit_tokens`), scripted
    by the request. Records what it was sent, how many streams it started and how many ended because the
    client (flashserve) went away."""

    def __init__(self, name: str, key: str = "upstream-key") -> None:
        self.name = name
        self.key = key
        self.down = False  # every request answers 503 (a replica that is failing)
        self.seen: list[dict[str, Any]] = []
        self._refused_once: set[str] = set()
        self.streams_started = 0
        self.streams_closed_by_client = 0
        self.released = asyncio.Event()
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                     Route("/v1/completions", self._completions, methods=["POST"]),
                                     Route("/health", self._health)])

    def release(self) -> None:
        self.released.set()

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "down" if self.down else "ok"}, 503 if self.down else 200)

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append({"headers": dict(request.headers), "body": body})
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return JSONResponse({"error": {"message": "Authentication Fails"}}, 401)
        script = [w for m in body["messages"] if m["role"] == "user" for w in [m.get("content") or ""]][-1].split()
        if self.down or "@refuse" in script:
            return JSONResponse({"error": {"message": f"{self.name} is overloaded"}}, 503)
        if "@refuse-once" in script and " ".join(script) not in self._refused_once:
            self._refused_once.add(" ".join(script))
            return JSONResponse({"error": {"message": f"{self.name} is overloaded"}}, 503)
        if "@reject" in script:
            return JSONResponse({"error": {"message": "Invalid max_tokens value", "type": "invalid_request_error",
                                           "param": "max_tokens"}}, 400)
        if "@stall" in script:
            await self.released.wait()
        return StreamingResponse(self._events(script), media_type="text/event-stream")

    async def _completions(self, request: Request) -> Response:
        """Legacy completions (fill in the middle): one text chunk, the prompt and the suffix it was sent."""
        body = await request.json()
        self.seen.append({"headers": dict(request.headers), "body": body})
        text = f"{body['prompt']} | {body.get('suffix', '')}"

        async def events() -> AsyncIterator[str]:
            logprobs = None if body.get("logprobs") is None else {
                "tokens": [text], "token_logprobs": [-0.25], "top_logprobs": [{text: -0.25, "x": -3.0}],
                "text_offset": [0]}
            for chunk in ({"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None}]},
                          {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
                          {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _events(self, script: list[str]) -> AsyncIterator[str]:
        self.streams_started += 1
        completed = False
        words = 0
        try:
            yield _chunk({"role": "assistant", "content": ""})
            for word in script:
                if word == "@hold":
                    await self.released.wait()
                elif word == "@fail":
                    completed = True
                    yield f"data: {json.dumps({'error': {'message': 'upstream engine error'}})}\n\n"
                    return
                elif word == "@cut":
                    completed = True
                    raise UpstreamBroke(self.name)
                elif not word.startswith("@"):
                    words += 1
                    yield _chunk({"content": word + " "})
            yield _chunk({}, finish="stop")
            yield _chunk(None, usage={"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words,
                                      "prompt_cache_hit_tokens": 4, "prompt_cache_miss_tokens": 6})
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            if not completed:  # the generator was closed from outside: flashserve went away
                self.streams_closed_by_client += 1
