"""A scripted stand-in for a DeepSeek-V4 upstream that writes raw V4 text, so an agent turn runs in seconds.

Why it exists: agent CLIs (Claude Code, Codex) send ~12k-token prompts with
12 tools and `max_tokens` up to 128000. The tiny embedded model cannot
follow that, and a real V4 is not available in CI, yet the e2e tests must
drive a whole agent turn (prompt -> tool call -> tool result -> answer)
through flashserve's Anthropic and Responses adapters. This process plays the
model: it speaks OpenAI chat completions and answers from a script instead of
weights, in the model's *own* output syntax, so flashserve's reasoning split
and DSML parser (`flashserve/chat/dsml.py`) do the real work:

- `content` carries raw V4 text: the reasoning, `</think>`, then either a
  DSML block calling a tool or a short answer. There is never an OpenAI
  `tool_calls` field or `reasoning_content`; `finish_reason` is "stop", as
  when V4 ends a tool-call turn with its EOS token.
- Last message from the user (or anything but a tool): call the first tool of
  the request's `tools`, with arguments built from that tool's JSON schema's
  `required` fields (see `example_arguments`); no tools -> a plain answer.
- Last message a tool result: a short final answer.
- Usage as DeepSeek reports it: `prompt_tokens`, `completion_tokens`,
  `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` (a hit is the prefix
  shared with the previous request, in 64-token blocks), and
  `completion_tokens_details.reasoning_tokens`. Tokens are estimated as 4
  characters each; nothing here tokenizes.

Streaming splits the text every `chunk_chars` characters, deliberately
cutting through DSML markers. `--script FILE` overrides the turns, e.g.:

    {"user": {"reasoning": "I will list files.", "content": "",
              "tool": "Bash", "arguments": {"command": "ls"}},
     "tool": {"reasoning": "Done.", "content": "There are 3 files."},
     "chunk_chars": 5, "model": "deepseek-v4-flash"}

A turn's `tool` names the tool to call (default: the request's first tool;
`false`: answer without calling); `arguments` replaces the schema-built ones.
`calls` ({tool name: arguments}) lets one script serve several clients: the
first of its tools that the request offers is called with its arguments
(e.g. Claude Code's `Bash` and Codex's `exec_command` on one upstream).

    python tests/e2e/scripted_v4_upstream.py --port N [--script FILE] [--key KEY]

`GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (streaming or
not), and `GET /requests` (every chat body received, for assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The V4 markers, spelled out here rather than imported so this stand-in stays independent of the code it
# tests; tests/unit/test_scripted_upstream.py checks that flashserve's DSML parser reads them back.
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_SEPARATOR = "\n\n"

DEFAULT_SCRIPT: dict[str, Any] = {
    "model": "deepseek-v4-flash",
    "chunk_chars": 7,
    "user": {"reasoning": "The user wants something done. I will use the tool first.", "content": ""},
    "tool": {"reasoning": "The tool returned its result. I can answer now.", "content": "Done: the tool ran."},
    "no_tools": {"reasoning": "A direct question. I will answer it.", "content": "ok"},
}


# -- the text the model writes -----------------------------------------------------------------------
def dsml_block(name: str, arguments: Mapping[str, Any]) -> str:
    """One DSML tool-call block: strings as is with string="true", anything else as JSON with string="false"."""
    parameters = []
    for key, value in arguments.items():
        is_string = isinstance(value, str)
        text = value if is_string else json.dumps(value, ensure_ascii=False)
        parameters.append(f'<{DSML}parameter name="{key}" string="{"true" if is_string else "false"}">'
                          f"{text}</{DSML}parameter>")
    body = "\n".join([f'<{DSML}invoke name="{name}">', *parameters, f"</{DSML}invoke>"])
    return f"<{DSML}tool_calls>\n{body}\n</{DSML}tool_calls>"


def example_value(schema: Mapping[str, Any]) -> Any:
    """A simple value that fits `schema`: its default, its first enum value, or one per type."""
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind is None and schema.get("anyOf"):
        return example_value(schema["anyOf"][0])
    if kind == "object":
        return example_arguments(schema)
    return {"integer": 1, "number": 1, "boolean": True, "array": [], "null": None}.get(kind, "ok")


def example_arguments(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments for a tool whose parameters are `schema`: each required property, with `example_value`."""
    properties = schema.get("properties") or {}
    return {name: example_value(properties.get(name) or {}) for name in schema.get("required") or []}


def _tool_functions(tools: Any) -> list[Mapping[str, Any]]:
    return [t["function"] for t in tools or [] if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)]


def scripted_text(body: Mapping[str, Any], script: Mapping[str, Any]) -> tuple[str, str]:
    """(reasoning, the whole raw text) for the next assistant turn of the conversation in `body`."""
    messages = body.get("messages") or [{}]
    functions = _tool_functions(body.get("tools"))
    after_tool = messages[-1].get("role") == "tool"
    turn = dict(script["tool"] if after_tool else script["user"] if functions else script["no_tools"])
    reasoning, content = turn.get("reasoning", ""), turn.get("content", "")
    text = reasoning + THINK_END + content
    wanted = turn.get("tool")
    calls: Mapping[str, Any] = turn.get("calls") or {}
    offered = [f.get("name") for f in functions]
    if wanted is None and calls:
        wanted = next((name for name in calls if name in offered), None)
    if not after_tool and functions and wanted is not False:
        function = next((f for f in functions if f.get("name") == wanted), functions[0])
        arguments = calls.get(function["name"], turn.get("arguments"))
        if arguments is None:
            arguments = example_arguments(function.get("parameters") or {})
        text += TOOL_CALLS_SEPARATOR + dsml_block(function["name"], arguments)
    return reasoning, text


# -- usage -------------------------------------------------------------------------------------------
def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


@dataclass(slots=True)
class PromptCache:
    """Remembers the last prompt, so a request that extends it reports its shared prefix as cache hits."""

    last: str = ""

    def usage(self, body: Mapping[str, Any], reasoning: str, text: str) -> dict[str, Any]:
        prompt = json.dumps([body.get("tools"), body.get("messages")], ensure_ascii=False, sort_keys=True)
        shared = len(os.path.commonprefix([prompt, self.last]))
        self.last = prompt
        prompt_tokens = _tokens(prompt)
        hit = min(shared // 4 // 64 * 64, prompt_tokens)
        completion = _tokens(text)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt_tokens - hit,
                "completion_tokens_details": {"reasoning_tokens": _tokens(reasoning) if reasoning else 0}}


# -- the wire ----------------------------------------------------------------------------------------
def completion_chunks(body: Mapping[str, Any], script: Mapping[str, Any], cache: PromptCache) -> Iterator[str]:
    """The SSE lines of a streamed answer, `data: [DONE]` included."""
    reasoning, text = scripted_text(body, script)
    ident, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model") or script["model"]

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "system_fingerprint": "fp_scripted_v4", "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    size = max(1, int(script.get("chunk_chars") or 7))
    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for start in range(0, len(text), size):
        yield chunk([{"index": 0, "delta": {"content": text[start:start + size]}, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    usage = cache.usage(body, reasoning, text)
    if (body.get("stream_options") or {}).get("include_usage"):
        yield chunk([], usage)
    yield "data: [DONE]\n\n"


def completion(body: Mapping[str, Any], script: Mapping[str, Any], cache: PromptCache) -> dict[str, Any]:
    reasoning, text = scripted_text(body, script)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or script["model"], "system_fingerprint": "fp_scripted_v4",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": cache.usage(body, reasoning, text)}


def load_script(path: Path | None) -> dict[str, Any]:
    script = json.loads(json.dumps(DEFAULT_SCRIPT))
    if path is not None:
        for key, value in json.loads(path.read_text()).items():
            script[key] = dict(script[key], **value) if isinstance(script.get(key), dict) else value
    return script


def create_app(script: Mapping[str, Any], key: str | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    seen: list[dict[str, Any]] = []
    cache = PromptCache()

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": script["model"], "object": "model", "created": 0, "owned_by": "deepseek"}]})

    async def requests(_: Request) -> JSONResponse:
        return JSONResponse(seen)

    async def chat(request: Request) -> Any:
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "Authentication Fails", "type": "authentication_error",
                                           "param": None, "code": "invalid_api_key"}}, 401)
        try:
            body = await request.json()
            assert isinstance(body, dict) and isinstance(body.get("messages"), list) and body["messages"]
        except Exception:
            return JSONResponse({"error": {"message": "a JSON body with non-empty messages is required",
                                           "type": "invalid_request_error", "param": "messages", "code": None}}, 400)
        seen.append(body)
        if body.get("stream"):
            return StreamingResponse(completion_chunks(body, script, cache), media_type="text/event-stream")
        return JSONResponse(completion(body, script, cache))

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models), Route("/models", models),
                             Route("/requests", requests),
                             Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/chat/completions", chat, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--script", type=Path, default=None, help="JSON overriding the default turns")
    parser.add_argument("--key", default=None, help="require this Bearer key")
    args = parser.parse_args()

    import uvicorn

    uvicorn.run(create_app(load_script(args.script), args.key), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
